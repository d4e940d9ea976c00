package pop3

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestAuthCache: a login with the same user and password is answered from
// the cache, a refusal that blames the credentials too; a refusal that
// does not ([IN-USE]) and another password are asked again; entries
// expire and the table is bounded; no entry holds the client's password.
func TestAuthCache(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	table := map[string]any{"authenticator": "test_table", "upstream": addr, "users": map[string]tableUser{
		"alice": {Password: "secret-pw", Address: "{upstream}"},
		"carol": {Refuse: "IN-USE"},
	}}
	h, logs := authenticatorsHandler(t, "", func(h *Handler) {
		h.AuthCache = &AuthCache{NegativeTTL: caddy.Duration(200 * time.Millisecond), Size: 3}
	}, table)
	ta := h.authenticators[0].(moduleAuthenticator).a.(*tableAuthenticator)
	cache := h.authenticator.(authChain)[0].(cachedAuthenticator).cache
	login := func(user, pass string) string {
		ts := startSession(t, h, logs, false)
		defer ts.conn.Close()
		ts.send("USER "+user, "PASS "+pass)
		ts.expect("+OK")
		return ts.readLine()
	}
	hits := func(result string) float64 {
		return testutil.ToFloat64(h.proc.metrics.authCache.WithLabelValues(result))
	}

	for i := 0; i < 3; i++ {
		if got := login("alice", "secret-pw"); !strings.HasPrefix(got, "+OK") {
			t.Fatalf("alice %d: %q", i, got)
		}
	}
	if n := ta.calls.Load(); n != 1 {
		t.Errorf("authenticator asked %d times for three logins, want 1", n)
	}
	if hits("hit") != 2 || hits("miss") != 1 {
		t.Errorf("hits %v, misses %v; want 2 and 1", hits("hit"), hits("miss"))
	}
	for i := 0; i < 2; i++ {
		if got := login("alice", "wrong-pw"); !strings.HasPrefix(got, "-ERR [AUTH]") {
			t.Fatalf("wrong password %d: %q", i, got)
		}
	}
	if n := ta.calls.Load(); n != 2 {
		t.Errorf("authenticator asked %d times, want 2 (the wrong password once)", n)
	}
	for i := 0; i < 2; i++ {
		if got := login("carol", "carol-pw"); !strings.HasPrefix(got, "-ERR [IN-USE]") {
			t.Fatalf("carol %d: %q", i, got)
		}
	}
	if n := ta.calls.Load(); n != 4 {
		t.Errorf("authenticator asked %d times, want 4 ([IN-USE] is never cached)", n)
	}
	time.Sleep(300 * time.Millisecond) // past negative_ttl
	if got := login("alice", "wrong-pw"); !strings.HasPrefix(got, "-ERR [AUTH]") {
		t.Fatalf("wrong password after negative_ttl: %q", got)
	}
	if n := ta.calls.Load(); n != 5 {
		t.Errorf("authenticator asked %d times, want 5 (the refusal expired)", n)
	}
	for _, u := range []string{"u1", "u2", "u3", "u4"} {
		login(u, "pw")
	}
	if n := cache.len(); n > 3 {
		t.Errorf("%d entries, want at most size 3", n)
	}
	cache.mu.Lock()
	for el := cache.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*authCacheEntry); e.target.creds.Password != "" {
			t.Errorf("an entry holds a password: %+v", e.target.creds)
		}
	}
	cache.mu.Unlock()
}

// TestAuthCachePasswdFileChange: a changed passwd_file entry misses the
// cache, so an old password stops working as soon as the file is read.
func TestAuthCachePasswdFileChange(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, _, path := passwdHandler(t, addr, "alice:{PLAIN}old-pw::::::pass=secret-pw\n", nil, func(h *Handler) {
		h.AuthCache = &AuthCache{}
	})
	p := h.authenticators[0].(*PasswdFile)
	login := func(pass string) string {
		ts := startSession(t, h, nil, false)
		defer ts.conn.Close()
		ts.send("USER alice", "PASS "+pass)
		ts.expect("+OK")
		return ts.readLine()
	}
	if got := login("old-pw"); !strings.HasPrefix(got, "+OK") {
		t.Fatalf("old password: %q", got)
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte("alice:{PLAIN}new-pw::::::pass=secret-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new file", func() bool { e, _ := p.lookup("alice"); return e != nil && e.Verify("new-pw") })
	if got := login("old-pw"); !strings.HasPrefix(got, "-ERR [AUTH]") {
		t.Errorf("old password after the change: %q (answered from the cache)", got)
	}
	if got := login("new-pw"); !strings.HasPrefix(got, "+OK") {
		t.Errorf("new password: %q", got)
	}
}

// countingAuthenticator accepts every login and counts the calls.
type countingAuthenticator struct{ calls int }

func (c *countingAuthenticator) authenticate(context.Context, loginRequest) (loginTarget, error) {
	c.calls++
	return loginTarget{address: "192.0.2.9:110"}, nil
}

// TestAuthCacheKeyedByClientForAuthServers: an auth server may decide by
// Client-IP and Auth-SSL, so its answer for one client address, or for a
// plaintext connection, is never reused for another; the same client gets
// the cached answer.
func TestAuthCacheKeyedByClientForAuthServers(t *testing.T) {
	t.Parallel()
	cache, err := (&AuthCache{}).newCache(nil)
	if err != nil {
		t.Fatal(err)
	}
	inner := &countingAuthenticator{}
	c := cachedAuthenticator{a: inner, cache: cache}
	req := func(remote string, tlsOn bool) loginRequest {
		r := loginRequest{method: AuthPlain, creds: sasl.Credentials{Username: "alice", Password: "pw"},
			remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(remote))}
		if tlsOn {
			r.tls = &tls.ConnectionState{}
		}
		return r
	}
	for i, tc := range []struct {
		remote string
		tls    bool
		calls  int
	}{
		{"192.0.2.1:1000", false, 1},
		{"192.0.2.1:2000", false, 1}, // another port of the same client: cached
		{"192.0.2.2:1000", false, 2}, // another client
		{"192.0.2.1:1000", true, 3},  // the same client over TLS
		{"[::ffff:192.0.2.1]:1000", false, 3},
	} {
		if _, err := c.authenticate(context.Background(), req(tc.remote, tc.tls)); err != nil {
			t.Fatal(err)
		}
		if inner.calls != tc.calls {
			t.Errorf("step %d (%s, tls %v): authenticator asked %d times, want %d", i, tc.remote, tc.tls, inner.calls, tc.calls)
		}
	}
}
