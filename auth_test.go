package pop3

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

func TestLoginMethods(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		sasl     []string // upstream mechanisms
		user     string
		password string
		login    func(ts *testSession, user, pass string)
		upstream string // command the upstream must have received
	}{
		{"user pass to USER/PASS upstream", nil, "alice", "secret-pw", func(ts *testSession, u, p string) {
			ts.send("USER "+u, "PASS "+p)
			ts.expect("+OK") // USER
		}, "PASS secret-pw"},
		{"user pass to SASL upstream", []string{"PLAIN"}, "alice", "secret-pw", func(ts *testSession, u, p string) {
			ts.send("USER "+u, "PASS "+p)
			ts.expect("+OK") // USER
		}, "AUTH PLAIN " + b64("\x00alice\x00secret-pw")},
		{"utf-8 password with spaces via USER/PASS", nil, "bob@example.com", "p@ss wörd:%", func(ts *testSession, u, p string) {
			ts.send("USER "+u, "PASS "+p)
			ts.expect("+OK") // USER
		}, "PASS p@ss wörd:%"},
		{"auth plain initial response", []string{"PLAIN"}, "bob@example.com", "p@ss wörd:%", func(ts *testSession, u, p string) {
			ts.send("AUTH PLAIN " + b64("\x00"+u+"\x00"+p))
		}, "AUTH PLAIN " + b64("\x00bob@example.com\x00p@ss wörd:%")},
		{"auth plain continuation", nil, "bob@example.com", "p@ss wörd:%", func(ts *testSession, u, p string) {
			ts.send("auth plain")
			ts.expect("+ ")
			ts.send(b64("\x00" + u + "\x00" + p))
		}, "PASS p@ss wörd:%"},
		{"auth login", nil, "bob@example.com", "p@ss wörd:%", func(ts *testSession, u, p string) {
			ts.send("AUTH LOGIN")
			if got := ts.expect("+ "); got != "+ "+b64("Username:") {
				ts.t.Fatalf("challenge %q", got)
			}
			ts.send(b64(u))
			ts.expect("+ " + b64("Password:"))
			ts.send(b64(p))
		}, "USER bob@example.com"},
		{"auth login initial response", []string{"PLAIN"}, "bob@example.com", "p@ss wörd:%", func(ts *testSession, u, p string) {
			ts.send("AUTH LOGIN " + b64(u))
			ts.expect("+ " + b64("Password:"))
			ts.send(b64(p))
		}, "AUTH PLAIN " + b64("\x00bob@example.com\x00p@ss wörd:%")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.SASL = tc.sasl })
			h, logs := newTestHandler(t, addr, nil)
			ts := startSession(t, h, logs, false)
			tc.login(ts, tc.user, tc.password)
			ts.expect("+OK Logged in.")
			ts.send("STAT")
			ts.expect("+OK 1 ")
			ts.send("QUIT")
			ts.expect("+OK bye")
			ts.closed()
			if !slices.Contains(up.Lines(), tc.upstream) {
				t.Errorf("upstream got %q, want %q among them", up.Lines(), tc.upstream)
			}
			ts.assertNoSecret(tc.password, b64("\x00"+tc.user+"\x00"+tc.password), b64(tc.password))
			var sessionLog bool
			for _, e := range logs.FilterMessage("session").All() {
				m := e.ContextMap()
				sessionLog = m["user"] == tc.user && m["result"] == "ok" && m["upstream"] == addr
			}
			if !sessionLog {
				t.Errorf("no session log line with user, upstream and result ok: %v", logs.FilterMessage("session").All())
			}
		})
	}
}

func TestFailedLoginThenRetry(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS wrong-pw")
	ts.expect("+OK")
	if got := withoutSessionID(t, ts.readLine()); got != "-ERR [AUTH] Authentication failed" {
		t.Fatalf("got %q", got)
	}
	ts.send("AUTH PLAIN " + b64("\x00alice\x00also-wrong"))
	ts.expect("-ERR [AUTH] Authentication failed")
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	ts.assertNoSecret("wrong-pw", "also-wrong", "secret-pw")
	if n := strings.Count(strings.Join(up.Lines(), "\n"), "QUIT"); n < 2 {
		t.Errorf("failed upstream logins were not closed with QUIT: %q", up.Lines())
	}
}

func TestPassErrorMessage(t *testing.T) {
	t.Parallel()
	for _, pass := range []bool{false, true} {
		_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.FailText = "-ERR [IN-USE] Mailbox locked by backend" })
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.PassErrorMessage = pass })
		ts := startSession(t, h, logs, false)
		ts.send("USER alice", "PASS nope")
		ts.expect("+OK")
		want := "-ERR [IN-USE] Mailbox in use by another session, try again later"
		if pass {
			want = "-ERR [IN-USE] Mailbox locked by backend"
		}
		if got := withoutSessionID(t, ts.readLine()); got != want {
			t.Errorf("pass_error_message %v: got %q, want %q", pass, got, want)
		}
	}
}

func TestRefusedAuthInput(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		lines []string
		want  string
	}{
		{"bad base64", []string{"AUTH PLAIN !!!notbase64"}, "-ERR [AUTH] Invalid base64"},
		{"bad base64 continuation", []string{"AUTH PLAIN", "%%%"}, "-ERR [AUTH] Invalid base64"},
		{"cancel", []string{"AUTH LOGIN", "*"}, "-ERR [AUTH] Authentication cancelled"},
		{"CR in user", []string{"AUTH PLAIN " + b64("\x00al\rice\x00secret-pw")}, "-ERR [AUTH] Invalid credentials"},
		{"LF in password", []string{"AUTH PLAIN " + b64("\x00alice\x00pw\nDELE 1")}, "-ERR [AUTH] Invalid credentials"},
		{"NUL in login user", []string{"AUTH LOGIN " + b64("al\x00ice")}, "-ERR [AUTH] Invalid credentials"},
		{"plain with two fields", []string{"AUTH PLAIN " + b64("alice\x00pw")}, "-ERR [AUTH] Invalid credentials"},
		{"unknown mechanism", []string{"AUTH GSSAPI"}, "-ERR Unsupported"},
		{"PASS without USER", []string{"PASS secret-pw"}, "-ERR No user name"},
		{"APOP not enabled", []string{"APOP alice 0123456789abcdef0123456789abcdef"}, "-ERR APOP is not enabled"},
		{"NUL in command", []string{"US\x00ER alice"}, "-ERR Unknown command"},
		{"transaction command before login", []string{"STAT"}, "-ERR Unknown command"},
		{"binary junk", []string{"\xff\xfe\x01\x02"}, "-ERR Unknown command"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up, addr := fakeUpstream(t, nil)
			h, logs := newTestHandler(t, addr, nil)
			ts := startSession(t, h, logs, false)
			ts.send(tc.lines...)
			var got string
			for i := 0; i < len(tc.lines); i++ {
				got = ts.readLine()
				if strings.HasPrefix(got, "-ERR") {
					break
				}
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			ts.send("NOOP") // the session goes on
			ts.expect("+OK")
			if len(up.Lines()) != 0 {
				t.Errorf("upstream was contacted: %q", up.Lines())
			}
		})
	}
}

func TestMaxErrors(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxErrors = 3 })
	ts := startSession(t, h, logs, false)
	ts.send("FOO", "BAR", "BAZ", "NOOP")
	ts.expect("-ERR Unknown command")
	ts.expect("-ERR Unknown command")
	ts.expect("-ERR Unknown command")
	ts.expect("-ERR Too many errors")
	ts.closed()
}

func TestLongLine(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxLineLength = 1024 })
	ts := startSession(t, h, logs, false)
	ts.send("USER " + strings.Repeat("a", 100000))
	ts.expect("-ERR Line too long")
	ts.send("NOOP")
	ts.expect("+OK")
}

func TestIdleClientBeforeLogin(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Timeout = caddy.Duration(200 * time.Millisecond) })
	ts := startSession(t, h, logs, false)
	ts.expect("-ERR Disconnected for inactivity")
	ts.closed()
}

func TestClientDisconnects(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	_, _ = ts.conn.Write([]byte("USER ali"))
	_ = ts.conn.Close()
	select {
	case err := <-ts.done:
		if err != nil {
			t.Fatalf("Handle: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("session did not end")
	}
}

func TestUpstreamFailures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		mod  func(*pop3test.Upstream)
	}{
		{"greeting -ERR", func(u *pop3test.Upstream) { u.Greeting = "-ERR [SYS/TEMP] overloaded" }},
		{"closes at PASS", func(u *pop3test.Upstream) { u.CloseAfter = "AUTH" }},
		{"closes at CAPA", func(u *pop3test.Upstream) { u.CloseAfter = "CAPA" }},
		{"never greets", func(u *pop3test.Upstream) { u.Silent = true }},
		{"garbage greeting", func(u *pop3test.Upstream) { u.Greeting = "220 smtp.example.com ESMTP" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, tc.mod)
			h, logs := newTestHandler(t, addr, func(h *Handler) { h.Timeout = caddy.Duration(time.Second) })
			ts := startSession(t, h, logs, false)
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			ts.expect("-ERR [SYS/TEMP]")
			ts.closed()
			ts.assertNoSecret("secret-pw")
		})
	}
	t.Run("down", func(t *testing.T) {
		_, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, closedPort(t), nil)
		_ = addr
		ts := startSession(t, h, logs, false)
		ts.send("AUTH PLAIN " + b64("\x00alice\x00secret-pw"))
		ts.expect("-ERR [SYS/TEMP]")
		ts.closed()
	})
}

func closedPort(t *testing.T) string {
	c, s := tcpPair(t)
	addr := s.LocalAddr().String()
	_ = c.Close()
	_ = s.Close()
	return addr
}

func TestPipelining(t *testing.T) {
	t.Parallel()
	for _, tcp := range []bool{false, true} {
		up, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, nil)
		ts := startSession(t, h, logs, tcp)
		ts.send("CAPA", "NOOP", "USER alice", "PASS secret-pw", "STAT", "RETR 1", "QUIT")
		ts.expect("+OK Capability list follows")
		ts.multiline()
		ts.expect("+OK")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		ts.expect("+OK 1 ")
		ts.expect("+OK")
		if got := ts.multiline(); strings.Join(got, "\n") != "Subject: hi\n\nhello" {
			t.Errorf("RETR got %q", got)
		}
		ts.expect("+OK bye")
		ts.closed()
		if l := up.Lines(); !slices.Contains(l, "STAT") || !slices.Contains(l, "RETR 1") {
			t.Errorf("pipelined commands did not reach the upstream: %q", l)
		}
	}
}

func TestIdleDuringSASL(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Timeout = caddy.Duration(300 * time.Millisecond) })
	ts := startSession(t, h, logs, false)
	ts.send("AUTH LOGIN")
	ts.expect("+ ")
	ts.expect("-ERR Disconnected for inactivity")
	ts.closed()
	if errs := logs.FilterLevelExact(zap.ErrorLevel).All(); len(errs) != 0 {
		t.Errorf("a client timeout was logged as an error: %v", errs)
	}
}
