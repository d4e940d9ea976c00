package pop3

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// stlsUpstream starts a fake upstream that offers STLS with a certificate
// for "localhost" only, and returns it, its port and roots that trust it.
func stlsUpstream(t *testing.T) (*pop3test.Upstream, string, *x509.CertPool) {
	t.Helper()
	cert := testCertificate(t)
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	fake, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
		u.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		u.STLS = true
	})
	_, port, _ := net.SplitHostPort(addr)
	return fake, port, roots
}

// namedHandler is a handler whose auth server sends alice to server (an
// IP:port), with the given configured upstreams.
func namedHandler(t *testing.T, server string, ups []*Upstream, mod func(*Handler)) *Handler {
	t.Helper()
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{"alice": {Password: "secret-pw", Server: server}}}
	url := as.Start(t)
	h, _ := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = ups
		h.AuthHTTP = &AuthHTTP{URL: url, Timeout: caddy.Duration(time.Second)}
		if mod != nil {
			mod(h)
		}
	})
	return h
}

// namedLogin logs in as alice and returns the reply to PASS; the session
// stays open when it is +OK.
func namedLogin(t *testing.T, h *Handler) (*testSession, string) {
	t.Helper()
	ts := startSession(t, h, nil, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	return ts, ts.readLine()
}

// An auth server answers an IP address; the config names the upstream by
// its host name with STLS. The login must go over STLS, verified against
// the configured name (the certificate has no IP address in it).
func TestAuthNamedUpstreamGetsItsTLS(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		serverName string
		ok         bool
	}{
		{"by configured name", "", true},
		{"tls_server_name still wins", "wrong.example", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake, port, roots := stlsUpstream(t)
			h := namedHandler(t, "127.0.0.1:"+port, []*Upstream{{Address: "localhost:" + port, StartTLS: true, TLS: &reverseproxy.TLSConfig{ServerName: tc.serverName}}}, nil)
			h.pool.upstreams[0].tlsConfig.RootCAs = roots
			ts, reply := namedLogin(t, h)
			if !tc.ok {
				if !hasPrefix(reply, "-ERR [SYS/TEMP]") {
					t.Fatalf("PASS: %q, want -ERR [SYS/TEMP]", reply)
				}
				for _, l := range fake.Lines() {
					if l != "STLS" {
						t.Fatalf("upstream got %q after a failed handshake", fake.Lines())
					}
				}
				return
			}
			if !hasPrefix(reply, "+OK Logged in") {
				t.Fatalf("PASS: %q", reply)
			}
			if lines := fake.Lines(); len(lines) == 0 || lines[0] != "STLS" {
				t.Fatalf("upstream lines %q: the password went without STLS", lines)
			}
			ts.send("QUIT")
			ts.expect("+OK")
		})
	}
}

func hasPrefix(s, p string) bool { return len(s) >= len(p) && s[:len(p)] == p }

// max_connections, the health state and passive failures of the configured
// upstream apply when the auth server names it by IP address.
func TestAuthNamedUpstreamGetsItsLimitsAndHealth(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	_, port, _ := net.SplitHostPort(addr)
	h := namedHandler(t, addr, []*Upstream{{Address: "localhost:" + port, MaxConnections: 1}}, nil)
	held, reply := namedLogin(t, h)
	if !hasPrefix(reply, "+OK Logged in") {
		t.Fatalf("first login: %q", reply)
	}
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Errorf("second login with max_connections 1: %q, want -ERR [SYS/TEMP]", reply)
	}
	held.send("QUIT")
	held.expect("+OK")
	held.closed()
	waitFor(t, "the upstream's count to drop", func() bool { return h.pool.upstreams[0].peer.active.Load() == 0 })
	ts, reply := namedLogin(t, h)
	if !hasPrefix(reply, "+OK Logged in") {
		t.Fatalf("login after the slot was freed: %q", reply)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()

	h.pool.upstreams[0].peer.unhealthy.Store(true)
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Errorf("login to an unhealthy upstream: %q, want -ERR [SYS/TEMP]", reply)
	}
	h.pool.upstreams[0].peer.unhealthy.Store(false)

	dead := closedPort(t)
	_, deadPort, _ := net.SplitHostPort(dead)
	h = namedHandler(t, dead, []*Upstream{{Address: "localhost:" + deadPort}}, func(h *Handler) { h.FailDuration = caddy.Duration(time.Minute) })
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Fatalf("login to a closed port: %q", reply)
	}
	if n := h.pool.upstreams[0].peer.fails.since(time.Now().Add(-time.Minute)); n != 1 {
		t.Errorf("passive failures %d, want 1", n)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// An address that is no configured upstream: refused when every configured
// upstream uses TLS (plaintext there would be a downgrade), dialled in
// plaintext as NGINX does otherwise.
func TestAuthNamedUnknownAddress(t *testing.T) {
	t.Parallel()
	fake, addr := fakeUpstream(t, nil)
	h := namedHandler(t, addr, []*Upstream{{Address: "localhost:1", StartTLS: true, TLS: &reverseproxy.TLSConfig{}}}, nil)
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Errorf("all upstreams TLS, unknown address: %q, want -ERR [SYS/TEMP]", reply)
	}
	if lines := fake.Lines(); len(lines) > 0 {
		t.Errorf("the unknown upstream got %q", lines)
	}
	for name, ups := range map[string][]*Upstream{
		"none configured": nil,
		"mixed":           {{Address: "localhost:1", StartTLS: true, TLS: &reverseproxy.TLSConfig{}}, {Address: "127.0.0.1:2"}},
	} {
		h := namedHandler(t, addr, ups, nil)
		ts, reply := namedLogin(t, h)
		if !hasPrefix(reply, "+OK Logged in") {
			t.Errorf("%s: %q", name, reply)
			continue
		}
		ts.send("QUIT")
		ts.expect("+OK")
	}
}

// Configured host names are resolved again: after namedTTL for an address
// found, after namedRetry (not per login) for one not found, and a name
// that fails to resolve keeps the addresses it had.
func TestAuthNamedResolvesAgain(t *testing.T) {
	t.Parallel()
	fake, port, roots := stlsUpstream(t)
	var mu sync.Mutex
	answer, failing := netip.MustParseAddr("192.0.2.1"), false
	var lookups atomic.Int64
	lookupHost := func(_ context.Context, _, host string) ([]netip.Addr, error) {
		lookups.Add(1)
		mu.Lock()
		defer mu.Unlock()
		if host != "mail.test" || failing {
			return nil, errors.New("no such host")
		}
		return []netip.Addr{answer}, nil
	}
	h := namedHandler(t, "127.0.0.1:"+port, []*Upstream{{Address: "mail.test:" + port, StartTLS: true, TLS: &reverseproxy.TLSConfig{ServerName: "localhost"}}}, func(h *Handler) { h.proc.lookupHost = lookupHost })
	h.pool.upstreams[0].tlsConfig.RootCAs = roots
	ix := h.pool.named
	age := func(d time.Duration) {
		ix.mu.Lock()
		ix.at = ix.at.Add(-d)
		ix.mu.Unlock()
	}

	// mail.test is 192.0.2.1: the auth server's 127.0.0.1 is unknown, and
	// with every upstream on TLS it is refused.
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Fatalf("login: %q", reply)
	}
	n := lookups.Load()
	namedLogin(t, h)
	if lookups.Load() != n {
		t.Errorf("an unknown address looked the names up again within namedRetry")
	}

	mu.Lock()
	answer = netip.MustParseAddr("127.0.0.1")
	mu.Unlock()
	age(namedRetry)
	ts, reply := namedLogin(t, h)
	if !hasPrefix(reply, "+OK Logged in") {
		t.Fatalf("login after mail.test moved to 127.0.0.1: %q", reply)
	}
	if lines := fake.Lines(); len(lines) == 0 || lines[0] != "STLS" {
		t.Fatalf("upstream lines %q: no STLS", lines)
	}
	ts.send("QUIT")
	ts.expect("+OK")

	// DNS fails: the address found before still maps to the upstream.
	mu.Lock()
	failing = true
	mu.Unlock()
	age(namedTTL)
	n = lookups.Load()
	for i := 0; i < 2; i++ {
		ts, reply := namedLogin(t, h)
		if !hasPrefix(reply, "+OK Logged in") {
			t.Fatalf("login %d while DNS fails: %q", i, reply)
		}
		ts.send("QUIT")
		ts.expect("+OK")
		waitFor(t, "the refresh", func() bool {
			ix.mu.Lock()
			defer ix.mu.Unlock()
			return ix.running == nil
		})
	}
	if lookups.Load() == n {
		t.Error("a stale entry was not looked up again")
	}
}

// A configured upstream with TLS whose name does not resolve may be the
// address the auth server names: with other upstreams in plaintext, that
// address is refused, not sent the password in plaintext, until the name
// resolves.
func TestAuthNamedUnresolvedTLSUpstream(t *testing.T) {
	t.Parallel()
	fake, port, roots := stlsUpstream(t)
	var mu sync.Mutex
	failing := true
	lookupHost := func(_ context.Context, _, host string) ([]netip.Addr, error) {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return nil, errors.New("server misbehaving")
		}
		return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
	}
	h := namedHandler(t, "127.0.0.1:"+port, []*Upstream{
		{Address: "mail.test:" + port, StartTLS: true, TLS: &reverseproxy.TLSConfig{ServerName: "localhost"}},
		{Address: "127.0.0.1:1"},
	}, func(h *Handler) { h.proc.lookupHost = lookupHost })
	h.pool.upstreams[0].tlsConfig.RootCAs = roots
	if _, reply := namedLogin(t, h); !hasPrefix(reply, "-ERR [SYS/TEMP]") {
		t.Errorf("login while mail.test does not resolve: %q, want -ERR [SYS/TEMP]", reply)
	}
	if lines := fake.Lines(); len(lines) > 0 {
		t.Fatalf("the upstream got %q", lines)
	}
	mu.Lock()
	failing = false
	mu.Unlock()
	ix := h.pool.named
	ix.mu.Lock()
	ix.at = ix.at.Add(-namedRetry)
	ix.mu.Unlock()
	ts, reply := namedLogin(t, h)
	if !hasPrefix(reply, "+OK Logged in") {
		t.Fatalf("login once mail.test resolves: %q", reply)
	}
	if lines := fake.Lines(); len(lines) == 0 || lines[0] != "STLS" {
		t.Fatalf("upstream lines %q: no STLS", lines)
	}
	ts.send("QUIT")
	ts.expect("+OK")
}

// Options that an auth server's choice (or a missing fail_duration) makes
// useless are named in a WARN at start, and so is plaintext to addresses
// the auth server names that no TLS upstream matches, and a relayed APOP
// timestamp read before the upstream's STLS.
func TestProvisionWarnsOfPoolOptions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		h    Handler
		want []string
	}{
		{"auth_http with pool options", Handler{AuthHTTP: &AuthHTTP{}, LBPolicy: PolicyFirst, LBTryDuration: caddy.Duration(time.Second),
			Upstream: []*Upstream{{Address: "mail1:110", Weight: 3}, {Address: "{pop3.domain}:110"}}},
			[]string{"placeholders", "these options do not apply", "plaintext"}},
		{"auth_http, every upstream TLS", Handler{AuthHTTP: &AuthHTTP{}, Upstream: []*Upstream{{Address: "mail1:995", TLS: &reverseproxy.TLSConfig{}}}}, nil},
		{"auth_http alone", Handler{AuthHTTP: &AuthHTTP{}}, []string{"plaintext"}},
		{"max_fails alone", Handler{MaxFails: 3, Upstream: []*Upstream{{Address: "mail1:110"}}}, []string{"max_fails"}},
		{"health_interval, templates only", Handler{HealthInterval: caddy.Duration(time.Second), Upstream: []*Upstream{{Address: "{pop3.domain}"}}}, []string{"health_interval", "client's DNS"}},
		{"relayed apop, starttls upstream", Handler{Auth: []string{"APOP"}, Upstream: []*Upstream{{Address: "mail1:110", TLS: &reverseproxy.TLSConfig{}, StartTLS: true}}},
			[]string{"APOP timestamp"}},
		{"relayed apop, tls upstream", Handler{Auth: []string{AuthAPOP}, Upstream: []*Upstream{{Address: "mail1:995", TLS: &reverseproxy.TLSConfig{}}}}, nil},
		{"apop with auth_http, starttls upstream", Handler{Auth: []string{AuthAPOP}, AuthHTTP: &AuthHTTP{},
			Upstream: []*Upstream{{Address: "mail1:110", TLS: &reverseproxy.TLSConfig{}, StartTLS: true}}}, nil},
		{"client names the zone", Handler{Upstream: []*Upstream{{Address: "pop.{pop3.domain}:110"}, {Address: "{l4.tls.server_name}"}}},
			[]string{"client's DNS", "client's DNS"}},
		{"client names a label under ours", Handler{Upstream: []*Upstream{{Address: "{pop3.domain}.mail.example.net:110"}}}, nil},
		{"client names the zone, tls", Handler{Upstream: []*Upstream{{Address: "pop.{pop3.domain}:995", TLS: &reverseproxy.TLSConfig{}}}}, nil},
		{"nothing to warn of", Handler{LBPolicy: PolicyFirst, HealthInterval: caddy.Duration(time.Second), Upstream: []*Upstream{{Address: "mail1:110", Weight: 2}}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zap.WarnLevel)
			tc.h.logger = zap.New(core)
			tc.h.warnPoolOptions()
			var got []string
			for _, e := range logs.All() {
				got = append(got, e.Message)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("warnings %q, want %d: %q", got, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("warning %d: %q, want one with %q", i, got[i], w)
				}
			}
		})
	}
}

// TestNamedUpstreamSilentGreetingCounted: a configured upstream that an
// auth server names and that accepts but never greets fails the login
// after dial_timeout, as on the pool's own path, and counts as a failure;
// not after the session's timeout, and not uncounted.
func TestNamedUpstreamSilentGreetingCounted(t *testing.T) {
	t.Parallel()
	addr, _ := stuckUpstream(t, false)
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{"alice": {Password: "secret-pw", Server: addr}}}
	url := as.Start(t)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.AuthHTTP = &AuthHTTP{URL: url, Timeout: caddy.Duration(5 * time.Second)}
		h.Timeout = anHour
		h.DialTimeout = caddy.Duration(300 * time.Millisecond)
		h.FailDuration = caddy.Duration(time.Minute)
		h.MaxFails = 1
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("-ERR [SYS/TEMP]")
	if n := h.pool.upstreams[0].peer.fails.since(time.Time{}); n != 1 {
		t.Errorf("%d failures counted against the upstream, want 1", n)
	}
}
