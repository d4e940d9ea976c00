package pop3

import (
	"bufio"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

// limitedHandler is a handler on a fake upstream with the given limits.
func limitedHandler(t *testing.T, l *Limits, mod func(*Handler)) (*Handler, func() []string) {
	t.Helper()
	u, addr := fakeUpstream(t, nil)
	h, _ := newTestHandler(t, addr, func(h *Handler) {
		h.Limits = l
		if mod != nil {
			mod(h)
		}
	})
	return h, u.Lines
}

// sessionFrom runs Handle on a TCP connection from the loopback address
// from (all of 127.0.0.0/8 is on lo) and reads the greeting or refusal.
func sessionFrom(t *testing.T, h *Handler, from string) *testSession {
	t.Helper()
	client, server := tcpPairFrom(t, from)
	ts := &testSession{t: t, conn: client, r: bufio.NewReader(client), done: make(chan error, 1), handle: h}
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
	sessionFrom(t, h, "127.0.0.1").loginAndQuit()
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
	if !strings.Contains(strings.Join(upstreamLines(), "\n"), "QUIT") {
		t.Error("the refused session's upstream got no QUIT")
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
