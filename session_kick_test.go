package pop3

import (
	"bufio"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// A session must end promptly on kick or drain whatever it waits for; these
// tests give every other bound (timeout, dial_timeout, the auth server's
// timeout, the failure delay) an hour, so only the kick can end it.
const (
	anHour    = caddy.Duration(time.Hour)
	promptEnd = 3 * time.Second
)

// kickSessionsOf kicks every session of h through the admin API, by id.
func kickSessionsOf(t *testing.T, h *Handler) {
	t.Helper()
	ss := h.proc.sessions.matching(func(s *session) bool { return s.h == h })
	if len(ss) != 1 {
		t.Fatalf("%d live sessions of the handler, want 1", len(ss))
	}
	if body := adminRequest(t, h.proc, http.MethodDelete, "?id="+ss[0].id).Body.String(); !strings.Contains(body, `"closed":1`) {
		t.Fatalf("DELETE ?id=%s: %s", ss[0].id, body)
	}
}

// endsWithin waits for Handle to return.
func (ts *testSession) endsWithin(d time.Duration) {
	ts.t.Helper()
	select {
	case err := <-ts.done:
		if err != nil {
			ts.t.Fatalf("Handle returned %v, want nil", err)
		}
	case <-time.After(d):
		ts.t.Fatalf("session still running %v after it should have ended", d)
	}
}

func sessionResult(t *testing.T, logs *observer.ObservedLogs) string {
	t.Helper()
	entries := logs.FilterMessage("session").All()
	if len(entries) != 1 {
		t.Fatalf("%d session lines, want 1", len(entries))
	}
	r, _ := entries[0].ContextMap()["result"].(string)
	return r
}

// unreadReplies starts a session over a pipe whose client sends a command
// and never reads the reply: the session blocks in its write.
func unreadReplies(t *testing.T, mod func(*Handler)) (*testSession, *Handler, *observer.ObservedLogs) {
	t.Helper()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, mod)
	ts := startSession(t, h, logs, false)
	ts.send("CAPA") // the reply stays in the pipe: nobody reads it
	return ts, h, logs
}

func TestKickEndsSessionThatStopsReading(t *testing.T) {
	ts, h, logs := unreadReplies(t, func(h *Handler) { h.Timeout = anHour })
	time.Sleep(50 * time.Millisecond) // let it block in the write
	kickSessionsOf(t, h)
	ts.endsWithin(promptEnd)
	if r := sessionResult(t, logs); r != "closed_by_admin" {
		t.Errorf("result %q, want closed_by_admin", r)
	}
}

func TestDrainEndsSessionThatStopsReading(t *testing.T) {
	ts, h, _ := unreadReplies(t, func(h *Handler) {
		h.Timeout = anHour
		h.DrainTimeout = caddy.Duration(100 * time.Millisecond)
	})
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	ts.endsWithin(promptEnd)
}

// TestUnreadRepliesTimeOut: timeout bounds a write before login as it
// bounds a read.
func TestUnreadRepliesTimeOut(t *testing.T) {
	ts, _, logs := unreadReplies(t, func(h *Handler) { h.Timeout = caddy.Duration(300 * time.Millisecond) })
	ts.endsWithin(promptEnd)
	if r := sessionResult(t, logs); r != "timeout" {
		t.Errorf("result %q, want timeout", r)
	}
}

// TestKickDuringFailureDelay: the delay before the -ERR of a refused login
// is cut short by a kick, which the client then sees.
func TestKickDuringFailureDelay(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.Timeout = anHour
		h.AuthFailureDelay = anHour // capped at a minute
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice")
	ts.expect("+OK")
	ts.send("PASS wrong")
	waitFor(t, "the refused login", func() bool { return logs.FilterMessage("login failed").Len() == 1 })
	start := time.Now()
	kickSessionsOf(t, h)
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.endsWithin(promptEnd)
	if d := time.Since(start); d > promptEnd {
		t.Errorf("kick took %v", d)
	}
}

// TestKickDuringSlowAuthServer: a kick cancels the auth_http request, and
// the client sees the kick, not "authentication service unavailable".
func TestKickDuringSlowAuthServer(t *testing.T) {
	as, _, withAuth := authHTTPSetup(t, func(as *pop3test.AuthServer) { as.Delay = time.Hour })
	h, logs := newTestHandler(t, "", func(h *Handler) {
		withAuth(h)
		h.Timeout = anHour
		h.AuthHTTP.Timeout = anHour
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice")
	ts.expect("+OK")
	ts.send("PASS secret-pw")
	waitFor(t, "the auth request", func() bool { return len(as.Requests()) == 1 })
	kickSessionsOf(t, h)
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.endsWithin(promptEnd)
	if n := logs.FilterMessage("auth server unavailable").Len(); n != 0 {
		t.Errorf("a kick was logged as an unavailable auth server")
	}
}

// stuckUpstream greets and then reads without ever answering; got is
// closed when the first command arrives.
func stuckUpstream(t *testing.T, greet bool) (addr string, got chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	got = make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		t.Cleanup(func() { _ = c.Close() })
		if greet {
			_, _ = c.Write([]byte("+OK stuck <1.2@stuck>\r\n"))
		}
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			close(got)
		}
		_, _ = bufio.NewReader(c).ReadString(0)
	}()
	return ln.Addr().String(), got
}

// TestKickDuringUpstreamLogin: an upstream that greets and then never
// answers holds a login until the kick closes the connection.
func TestKickDuringUpstreamLogin(t *testing.T) {
	addr, got := stuckUpstream(t, true)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.Timeout = anHour
		h.DialTimeout = anHour
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice")
	ts.expect("+OK")
	ts.send("PASS secret-pw")
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream got no command")
	}
	kickSessionsOf(t, h)
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.endsWithin(promptEnd)
}

// TestKickDuringEarlyUpstream: with challenges relayed the greeting waits
// for the upstream's; a kick ends that wait, and the client's greeting is
// the kick's -ERR.
func TestKickDuringEarlyUpstream(t *testing.T) {
	addr, _ := stuckUpstream(t, false)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.Auth = []string{AuthPlain, AuthAPOP}
		h.Timeout = anHour
		h.DialTimeout = anHour
	})
	ts := handleOn(t, h, logs, false)
	waitFor(t, "the session", func() bool {
		return len(h.proc.sessions.matching(func(s *session) bool { return s.h == h })) == 1
	})
	time.Sleep(50 * time.Millisecond) // let it wait for the upstream's greeting
	kickSessionsOf(t, h)
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.endsWithin(promptEnd)
}

// TestLoginTimeout: a client that keeps the session busy without logging
// in is closed at login_timeout.
func TestLoginTimeout(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.LoginTimeout = caddy.Duration(600 * time.Millisecond) })
	ts := startSession(t, h, logs, true) // a pipe would block the NOOP behind the final -ERR
	start := time.Now()
	for {
		ts.send("NOOP")
		line := ts.readLine()
		if strings.HasPrefix(line, "-ERR Not logged in after 600ms, closing connection") {
			break
		}
		if line != "+OK" {
			t.Fatalf("reply %q", line)
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("still open after 5s of NOOPs")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("closed after %v, before login_timeout", d)
	}
	ts.endsWithin(promptEnd)
	if r := sessionResult(t, logs); r != "login_timeout" {
		t.Errorf("result %q, want login_timeout", r)
	}
}

// TestSessionAfterDrainEnds: a connection the replaced config accepts
// after its drain ran is closed at once, not served for ever.
func TestSessionAfterDrainEnds(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.DrainTimeout = caddy.Duration(time.Millisecond) })
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the drain", func() bool { return h.drained.Load() })
	ts := handleOn(t, h, logs, false)
	ts.expect("-ERR [SYS/TEMP] Server configuration changed")
	ts.endsWithin(promptEnd)
}

// TestKickDuringAuthServerWait: Auth-Status: WAIT makes the login wait
// before it asks again; a kick ends that wait.
func TestKickDuringAuthServerWait(t *testing.T) {
	asked := make(chan struct{}, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Auth-Status", "WAIT")
		w.Header().Set("Auth-Wait", "50")
		asked <- struct{}{}
	}))
	t.Cleanup(srv.Close)
	h, logs := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = nil
		h.AuthHTTP = &AuthHTTP{URL: srv.URL, Timeout: anHour}
		h.Timeout = anHour
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice")
	ts.expect("+OK")
	ts.send("PASS secret-pw")
	select {
	case <-asked:
	case <-time.After(5 * time.Second):
		t.Fatal("the auth server was not asked")
	}
	time.Sleep(50 * time.Millisecond) // let it wait for the retry
	kickSessionsOf(t, h)
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.endsWithin(promptEnd)
}

// TestKickDuringSTLSHandshake: a client that asked for STLS and sends no
// ClientHello is ended by a kick.
func TestKickDuringSTLSHandshake(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.StartTLS = StartTLSOnly
		h.Timeout = anHour
	})
	ts := startSession(t, h, logs, false)
	ts.send("STLS")
	ts.expect("+OK")
	time.Sleep(50 * time.Millisecond) // let it wait for the ClientHello
	kickSessionsOf(t, h)
	ts.endsWithin(promptEnd)
	if r := sessionResult(t, logs); r != "closed_by_admin" {
		t.Errorf("result %q, want closed_by_admin", r)
	}
}

// TestTLSEndBoundedForClientThatReadsNothing: a TLS session ended before
// login (kick, timeout, login_timeout, drain) whose client reads nothing
// ends within about a second: its last -ERR gets one, and tls.Conn's own
// 5 s for close_notify does not apply.
func TestTLSEndBoundedForClientThatReadsNothing(t *testing.T) {
	for _, tc := range []struct {
		name, result string
		mod          func(*Handler)
		end          func(*Handler, *testSession)
	}{
		{"kick", "closed_by_admin", func(h *Handler) { h.Timeout = anHour }, func(h *Handler, _ *testSession) { kickSessionsOf(t, h) }},
		{"timeout", "timeout", func(h *Handler) { h.Timeout = caddy.Duration(200 * time.Millisecond) }, func(*Handler, *testSession) {}},
		{"login_timeout", "login_timeout", func(h *Handler) { h.LoginTimeout = caddy.Duration(200 * time.Millisecond) }, func(*Handler, *testSession) {}},
		// No last words: the unread +OK times out, then close_notify has its second.
		{"quit", "quit", func(h *Handler) { h.Timeout = caddy.Duration(200 * time.Millisecond) }, func(_ *Handler, ts *testSession) { ts.send("QUIT") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, nil)
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.ImplicitTLS = true
				tc.mod(h)
			})
			ts := handleOn(t, h, logs, false) // a pipe: a write blocks until the client reads
			c := tls.Client(ts.conn, &tls.Config{InsecureSkipVerify: true})
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := c.Handshake(); err != nil {
				t.Fatalf("TLS handshake: %v", err)
			}
			ts.conn, ts.r = c, bufio.NewReader(c)
			ts.expect("+OK POP3 ready")
			// From here on the client reads nothing.
			start := time.Now()
			tc.end(h, ts)
			ts.endsWithin(10 * time.Second)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("session took %v to end, want about 1s", d)
			}
			if r := sessionResult(t, logs); r != tc.result {
				t.Errorf("result %q, want %s", r, tc.result)
			}
		})
	}
}

// TestKickBeforeRelayFlush: a kick that lands after the relay started and
// before it passed on the commands pipelined after the login is the
// administrator's, not an upstream error.
func TestKickBeforeRelayFlush(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	testHookRelayFlush = func(s *session) { s.kick("Session closed by the administrator") }
	t.Cleanup(func() { testHookRelayFlush = nil })
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw", "STAT") // STAT waits in the buffer at login
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.closed()
	if r := sessionResult(t, logs); r != "closed_by_admin" {
		t.Errorf("result %q, want closed_by_admin", r)
	}
}

// TestLoginTimeoutDuringDialCountsNoFailure: a login that runs into
// login_timeout while its upstream is still greeting ends the session; the
// upstream is not blamed, or a client timing its logins so could take
// every upstream out of service with max_fails.
func TestLoginTimeoutDuringDialCountsNoFailure(t *testing.T) {
	for range 5 { // the session's deadline and its context end together: either may wake the dial first
		addr, _ := stuckUpstream(t, false)
		h, logs := newTestHandler(t, addr, func(h *Handler) {
			h.Timeout = anHour
			h.DialTimeout = anHour
			h.LoginTimeout = caddy.Duration(200 * time.Millisecond)
			h.FailDuration = caddy.Duration(time.Minute)
			h.MaxFails = 1
		})
		ts := startSession(t, h, logs, true)
		ts.send("USER alice", "PASS secret-pw")
		ts.expect("+OK")
		ts.endsWithin(promptEnd)
		if r := sessionResult(t, logs); r != "login_timeout" {
			t.Errorf("result %q, want login_timeout", r)
		}
		if n := h.pool.upstreams[0].peer.fails.since(time.Time{}); n != 0 {
			t.Fatalf("%d failures counted against the upstream", n)
		}
	}
}
