package pop3

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// limitedHandler is a handler on a fake upstream with the given limits.
func limitedHandler(t *testing.T, l *Limits, mod func(*Handler)) (*Handler, func() []string) {
	t.Helper()
	u, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.Limits = l
		if mod != nil {
			mod(h)
		}
	})
	limitedLogs.Store(h, logs)
	return h, u.Lines
}

var limitedLogs sync.Map // *Handler → *observer.ObservedLogs

// sessionFrom runs Handle on a TCP connection from the loopback address
// from (all of 127.0.0.0/8 is on lo) and reads the greeting or refusal.
func sessionFrom(t *testing.T, h *Handler, from string) *testSession {
	t.Helper()
	client, server := tcpPairFrom(t, from)
	ts := &testSession{t: t, conn: client, r: bufio.NewReader(client), done: make(chan error, 1), handle: h}
	if logs, ok := limitedLogs.Load(h); ok {
		ts.logs = logs.(*observer.ObservedLogs)
	}
	go func() {
		err := h.Handle(layer4.WrapConnection(server, nil, zap.NewNop()), nil)
		_ = server.Close()
		ts.done <- err
	}()
	t.Cleanup(func() { _ = client.Close() })
	ts.greeting = ts.readLine()
	return ts
}

func TestLimitsSessionsPerIP(t *testing.T) {
	t.Parallel()
	h, _ := limitedHandler(t, &Limits{SessionsPerIP: 2, Exempt: []string{"127.0.0.9"}}, nil)
	a := sessionFrom(t, h, "127.0.0.1")
	b := sessionFrom(t, h, "127.0.0.1")
	if !strings.HasPrefix(a.greeting, "+OK") || !strings.HasPrefix(b.greeting, "+OK") {
		t.Fatalf("greetings %q, %q", a.greeting, b.greeting)
	}
	c := sessionFrom(t, h, "127.0.0.1")
	if c.greeting != "-ERR [SYS/TEMP] Too many sessions from your address, try again later" {
		t.Fatalf("third session: %q", c.greeting)
	}
	c.closed()
	// Another address, and an exempt one, are not limited by these.
	for _, from := range []string{"127.0.0.2", "127.0.0.9", "127.0.0.9", "127.0.0.9"} {
		if s := sessionFrom(t, h, from); !strings.HasPrefix(s.greeting, "+OK") {
			t.Fatalf("from %s: %q", from, s.greeting)
		}
	}
	a.loginAndQuit()
	if d := sessionFrom(t, h, "127.0.0.1"); !strings.HasPrefix(d.greeting, "+OK") {
		t.Fatalf("after a session ended: %q", d.greeting)
	}
}

func TestLimitsConnectionsPerIP(t *testing.T) {
	t.Parallel()
	h, _ := limitedHandler(t, &Limits{ConnectionsPerIP: &RateLimit{Count: 2, Window: caddy.Duration(time.Hour)}}, func(h *Handler) {
		h.Timeout = caddy.Duration(5 * time.Second)
	})
	for range 2 {
		s := sessionFrom(t, h, "127.0.0.1")
		s.send("QUIT")
		s.expect("+OK")
		s.closed()
	}
	s := sessionFrom(t, h, "127.0.0.1")
	if s.greeting != "-ERR [SYS/TEMP] Too many connections from your address, try again later" {
		t.Fatalf("third connection: %q", s.greeting)
	}
	s.closed()
}

func TestLimitsBlockAnswersLikeAWrongPassword(t *testing.T) {
	t.Parallel()
	h, upstreamLines := limitedHandler(t, &Limits{FailuresPerUserIP: &FailureLimit{Count: 2, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Hour)}}, nil)
	s := sessionFrom(t, h, "127.0.0.1")
	s.send("USER alice", "PASS wrong")
	s.expect("+OK")
	wrong := withoutSessionID(t, s.expect("-ERR"))
	s.send("USER alice", "PASS wrong")
	s.expect("+OK")
	s.expect("-ERR")
	logins := strings.Count(strings.Join(upstreamLines(), "\n"), "PASS ")

	s.send("USER alice", "PASS secret-pw")
	s.expect("+OK")
	if got := withoutSessionID(t, s.expect("-ERR")); got != wrong {
		t.Fatalf("blocked login answered %q, a wrong password %q", got, wrong)
	}
	if n := strings.Count(strings.Join(upstreamLines(), "\n"), "PASS "); n != logins {
		t.Fatalf("the blocked login reached the upstream (%d logins, want %d)", n, logins)
	}
	// Another user from the address, and the user from another address,
	// are not blocked.
	s.send("USER bob@example.com", "PASS p@ss wörd:%", "QUIT")
	s.expect("+OK")
	s.expect("+OK")
	s.expect("+OK")
	s.closed()
	sessionFrom(t, h, "127.0.0.2").loginAndQuit()

	rec := blocksRequest(t, h.proc, "GET", "")
	var blocks []blockView
	if err := json.Unmarshal(rec.Body.Bytes(), &blocks); err != nil || len(blocks) != 1 {
		t.Fatalf("GET /pop3/blocks: %v %s", err, rec.Body)
	}
	if b := blocks[0]; b.Limit != limitFailuresPerUserIP || b.Address != "127.0.0.1" || b.User != "alice" {
		t.Fatalf("block %+v", b)
	}
	if rec := blocksRequest(t, h.proc, "DELETE", "?user=ALICE&address=127.0.0.1"); !strings.Contains(rec.Body.String(), `"removed":1`) {
		t.Fatalf("DELETE: %s", rec.Body)
	}
	last := sessionFrom(t, h, "127.0.0.1")
	last.loginAndQuit()
	last.assertNoSecret("secret-pw", "wrong", "p@ss")
	if !strings.Contains(fmt.Sprint(last.logs.FilterMessage("login blocked").All()), "failures_per_user_ip") {
		t.Error("no login blocked line naming the limit")
	}
	if n := last.logs.FilterMessage("blocked").Len(); n != 1 {
		t.Errorf("%d lines of a block starting, want 1", n)
	}
}

func blocksRequest(t *testing.T, proc *processState, method, query string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	if err := (adminAPI{proc: proc}).handleBlocks(rec, httptest.NewRequest(method, "/pop3/blocks"+query, nil)); err != nil {
		t.Fatalf("%s /pop3/blocks%s: %v", method, query, err)
	}
	return rec
}

func TestLimitsBlocksDeleteNeedsAFilter(t *testing.T) {
	t.Parallel()
	rec := httptest.NewRecorder()
	err := (adminAPI{proc: newTestProcess()}).handleBlocks(rec, httptest.NewRequest("DELETE", "/pop3/blocks", nil))
	if ae, ok := err.(caddy.APIError); !ok || ae.HTTPStatus != 400 {
		t.Fatalf("DELETE without a filter: %v", err)
	}
}

// The per-user block spares the address the user logged in from before,
// and blocks expire.
func TestLimitsFailuresPerUserSparesAKnownAddress(t *testing.T) {
	t.Parallel()
	clock := time.Now()
	h, _ := limitedHandler(t, &Limits{FailuresPerUser: &FailureLimit{Count: 3, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Minute)}}, nil)
	sessionFrom(t, h, "127.0.0.1").loginAndQuit() // the owner's address
	for i := range 3 {
		s := sessionFrom(t, h, "127.0.0.1"+string(rune('1'+i)))
		s.send("USER alice", "PASS guess")
		s.expect("+OK")
		s.expect("-ERR [AUTH]")
	}
	s := sessionFrom(t, h, "127.0.0.20")
	s.send("USER alice", "PASS secret-pw")
	s.expect("+OK")
	s.expect("-ERR [AUTH] Authentication failed")
	sessionFrom(t, h, "127.0.0.1").loginAndQuit()

	blocks, _ := h.Limits.zone.store.Blocks(t.Context(), clock.Add(2*time.Minute))
	if len(blocks) != 0 {
		t.Fatalf("blocks after their time: %v", blocks)
	}
}

func TestLimitsSessionsPerUser(t *testing.T) {
	t.Parallel()
	h, upstreamLines := limitedHandler(t, &Limits{SessionsPerUser: 1}, nil)
	a := sessionFrom(t, h, "127.0.0.1")
	a.send("USER alice", "PASS secret-pw")
	a.expect("+OK")
	a.expect("+OK")
	b := sessionFrom(t, h, "127.0.0.2")
	b.send("USER alice", "PASS secret-pw")
	b.expect("+OK")
	if got := b.expect("-ERR"); !strings.HasPrefix(got, "-ERR [IN-USE] Too many sessions for this user, try again later") {
		t.Fatalf("second session of the user: %q", got)
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(strings.Join(upstreamLines(), "\n"), "QUIT"); {
		if time.Now().After(deadline) {
			t.Fatal("the refused session's upstream got no QUIT")
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.send("QUIT")
	a.expect("+OK")
	a.closed()
	b.send("USER alice", "PASS secret-pw", "QUIT")
	b.expect("+OK")
	b.expect("+OK")
	b.expect("+OK")
	b.closed()
}

func TestLimitsMinInputRate(t *testing.T) {
	t.Parallel()
	h, _ := limitedHandler(t, &Limits{MinInputRate: &InputRate{Bytes: 8, Window: caddy.Duration(300 * time.Millisecond)}}, func(h *Handler) {
		h.AuthFailureDelay = caddy.Duration(500 * time.Millisecond) // longer than the window: the proxy's own time does not count
	})
	ok := sessionFrom(t, h, "127.0.0.1")
	ok.send("USER alice", "PASS wrong")
	ok.expect("+OK")
	ok.expect("-ERR [AUTH]")
	ok.loginAndQuit()

	slow := sessionFrom(t, h, "127.0.0.1")
	start := time.Now()
	for _, c := range "USER alice" {
		if _, err := slow.conn.Write([]byte{byte(c)}); err != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
		if time.Since(start) > 2*time.Second {
			break
		}
	}
	if got := withoutSessionID(t, slow.expect("-ERR")); got != "-ERR Input too slow, closing connection" {
		t.Fatalf("slow client: %q", got)
	}
	slow.closed()
	if time.Since(start) > 2*time.Second {
		t.Fatalf("slow client closed after %v", time.Since(start))
	}
}

func TestLimitsMaxSessionLifetime(t *testing.T) {
	t.Parallel()
	h, _ := limitedHandler(t, &Limits{MaxSessionLifetime: caddy.Duration(300 * time.Millisecond)}, nil)
	pre := sessionFrom(t, h, "127.0.0.1")
	if got := withoutSessionID(t, pre.expect("-ERR")); got != "-ERR [SYS/TEMP] Session lifetime exceeded" {
		t.Fatalf("before login: %q", got)
	}
	pre.closed()
	in := sessionFrom(t, h, "127.0.0.1")
	in.send("USER alice", "PASS secret-pw")
	in.expect("+OK")
	in.expect("+OK")
	in.closed()
	n := 0
	for _, e := range in.logs.FilterMessage("session").All() {
		if e.ContextMap()["result"] == "lifetime" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d sessions ended with result lifetime, want 2", n)
	}
}

func TestLimitsCaddyfile(t *testing.T) {
	t.Parallel()
	d := caddyfile.NewTestDispenser(`pop3 127.0.0.1:110 {
		limits edge {
			sessions_per_ip 10
			sessions_per_user 5
			sessions_per_user_ip 3
			connections_per_ip 20 1m
			failures_per_user_ip 5 15m 15m
			failures_per_ip 50 15m 1h
			failures_per_user 20 15m 30m
			ipv6_prefix 56
			exempt 10.0.0.0/8 192.0.2.7
			exempt 2001:db8::/32
			min_input_rate 100 10s
			max_session_lifetime 2h
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(h.Limits)
	want := `{"zone":"edge","sessions_per_ip":10,"sessions_per_user":5,"sessions_per_user_ip":3,"connections_per_ip":{"count":20,"window":60000000000},"failures_per_user_ip":{"count":5,"window":900000000000,"block":900000000000},"failures_per_ip":{"count":50,"window":900000000000,"block":3600000000000},"failures_per_user":{"count":20,"window":900000000000,"block":1800000000000},"ipv6_prefix":56,"exempt":["10.0.0.0/8","192.0.2.7","2001:db8::/32"],"min_input_rate":{"bytes":100,"window":10000000000},"max_session_lifetime":7200000000000}`
	if string(got) != want {
		t.Fatalf("limits:\n got %s\nwant %s", got, want)
	}
	for _, bad := range []string{
		"limits { sessions_per_ip 0 }",
		"limits { sessions_per_ip x }",
		"limits { connections_per_ip 5 }",
		"limits { failures_per_ip 5 1m }",
		"limits { failures_per_ip 5 1m 0s }",
		"limits { ipv6_prefix 129 }",
		"limits { exempt 10.0.0.0/33 }",
		"limits { exempt }",
		"limits { min_input_rate 0 1s }",
		"limits { max_session_lifetime -1s }",
		"limits { sessions_per_ip 1\nsessions_per_ip 2 }",
		"limits a b { }",
		"limits { frobnicate 1 }",
	} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("pop3 127.0.0.1:110 {\n" + bad + "\n}")); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestLimitsValidate(t *testing.T) {
	t.Parallel()
	for _, l := range []*Limits{
		{SessionsPerIP: -1},
		{ConnectionsPerIP: &RateLimit{Count: 1}},
		{FailuresPerUser: &FailureLimit{Count: 1, Window: 1}},
		{IPv6Prefix: 200},
		{Exempt: []string{"nonsense"}},
		{MinInputRate: &InputRate{Window: 1}},
	} {
		if err := l.validate(); err == nil {
			t.Errorf("%+v: no error", l)
		}
	}
}

// After STLS the guard reads through TLS: a client that logs in works, one
// that goes quiet is closed, and the session line says why.
func TestLimitsMinInputRateAfterSTLS(t *testing.T) {
	t.Parallel()
	h, _ := limitedHandler(t, &Limits{MinInputRate: &InputRate{Bytes: 8, Window: caddy.Duration(300 * time.Millisecond)}}, func(h *Handler) {
		h.StartTLS = StartTLSOn
	})
	ok := sessionFrom(t, h, "127.0.0.1")
	ok.startTLS()
	ok.loginAndQuit()

	quiet := sessionFrom(t, h, "127.0.0.1")
	quiet.startTLS()
	if got := withoutSessionID(t, quiet.expect("-ERR")); got != "-ERR Input too slow, closing connection" {
		t.Fatalf("quiet client after STLS: %q", got)
	}
	quiet.closed()
	var results []string
	for _, e := range quiet.logs.FilterMessage("session").All() {
		results = append(results, e.ContextMap()["result"].(string))
	}
	if !slices.Contains(results, "too_slow") {
		t.Errorf("session results %v, want one too_slow", results)
	}

	// A client that sends STLS and then no handshake is closed at the
	// window, not at timeout (5s here).
	silent := sessionFrom(t, h, "127.0.0.1")
	silent.send("STLS")
	silent.expect("+OK")
	start := time.Now()
	silent.closed()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a client silent in the TLS handshake was closed after %v", d)
	}
}

// A relayed APOP login refused by sessions_per_user ends the session: its
// digest was made over the one upstream connection that now got QUIT.
func TestLimitsSessionsPerUserWithRelayedAPOP(t *testing.T) {
	t.Parallel()
	_, addr := challengeUpstream(t)
	h, _ := newTestHandler(t, addr, func(h *Handler) {
		h.Auth = []string{AuthAPOP}
		h.Limits = &Limits{SessionsPerUser: 1}
	})
	first := sessionFrom(t, h, "127.0.0.1")
	first.send("APOP alice " + apopDigest(upstreamTimestamp, "secret-pw"))
	first.expect("+OK")
	second := sessionFrom(t, h, "127.0.0.1")
	second.send("APOP alice " + apopDigest(upstreamTimestamp, "secret-pw"))
	second.expect("-ERR [IN-USE] Too many sessions for this user")
	second.closed()
}

// Handlers of one process share the default zone (a reload keeps its
// counts and blocks); a named zone counts apart.
func TestLimitsZones(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	block := &FailureLimit{Count: 1, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Hour)}
	before, _ := newTestHandler(t, addr, func(h *Handler) { h.Limits = &Limits{FailuresPerIP: block, SessionsPerIP: 1} })
	held := sessionFrom(t, before, "127.0.0.1")
	held.send("USER alice", "PASS wrong")
	held.expect("+OK")
	held.expect("-ERR [AUTH]")

	after, _ := newTestHandler(t, addr, func(h *Handler) {
		h.proc = before.proc // a reload: the process's state
		h.Limits = &Limits{FailuresPerIP: block, SessionsPerIP: 1}
	})
	if s := sessionFrom(t, after, "127.0.0.1"); !strings.HasPrefix(s.greeting, "-ERR [SYS/TEMP] Too many sessions") {
		t.Fatalf("the new config's session beside the old one's: %q", s.greeting)
	}
	held.send("QUIT")
	held.expect("+OK")
	held.closed()
	s := sessionFrom(t, after, "127.0.0.1")
	s.send("USER alice", "PASS secret-pw")
	s.expect("+OK")
	s.expect("-ERR [AUTH] Authentication failed")

	other, _ := newTestHandler(t, addr, func(h *Handler) {
		h.proc = before.proc
		h.Limits = &Limits{Zone: "other", FailuresPerIP: block, SessionsPerIP: 1}
	})
	sessionFrom(t, other, "127.0.0.1").loginAndQuit()
}

// The proxy's own time between two reads (a CRAM-MD5 challenge fetched
// from the upstream, an auth server) is not held against the client.
func TestInputGuardCountsOnlyTheClientsTime(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	defer server.Close()
	g := &inputGuard{Conn: server, bytes: 8, window: 200 * time.Millisecond}
	buf := make([]byte, 16)
	_, _ = client.Write([]byte("AUTH"))
	if n, err := g.Read(buf); n != 4 || err != nil {
		t.Fatalf("first read: %d, %v", n, err)
	}
	time.Sleep(300 * time.Millisecond) // the proxy is busy
	_, _ = client.Write([]byte("+ xy"))
	if n, err := g.Read(buf); n != 4 || err != nil {
		t.Fatalf("read after the proxy was busy: %d, %v", n, err)
	}
	start := time.Now()
	if _, err := g.Read(buf); !errors.Is(err, errInputTooSlow) {
		t.Fatalf("a quiet client: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Fatalf("quiet client refused after %v, want about the window", d)
	}
	// The session's own deadline, when earlier, is a plain timeout.
	g.waiting()
	g.deadline = time.Now().Add(50 * time.Millisecond)
	var ne net.Error
	if _, err := g.Read(buf); !errors.As(err, &ne) || !ne.Timeout() || errors.Is(err, errInputTooSlow) {
		t.Fatalf("at the session's deadline: %v", err)
	}
}

func TestAddressMatches(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		blocked, named string
		want           bool
	}{
		{"192.0.2.7", "192.0.2.7", true},
		{"192.0.2.7", "192.0.2.0/24", true},
		{"192.0.2.7", "192.0.3.0/24", false},
		{"192.0.2.7", "192.0.2.8", false},
		{"2001:db8::/64", "2001:db8::1", true},
		{"2001:db8::/64", "2001:db8::/48", true},
		{"2001:db8::/64", "2001:db8:1::/64", false},
		{"2001:db8::/64", "nonsense", false},
	} {
		if got := addressMatches(c.blocked, c.named); got != c.want {
			t.Errorf("addressMatches(%q, %q) = %v", c.blocked, c.named, got)
		}
	}
}
