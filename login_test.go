package pop3

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
)

// TestAuthHTTPRefusesForeignAuthzid checks that an AUTH PLAIN authorization
// identity the auth server never saw cannot ride on the credentials it
// returns: with master credentials from Auth-User/Auth-Pass, "victim\0
// attacker\0attacker-pw" would open the victim's mailbox.
func TestAuthHTTPRefusesForeignAuthzid(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["master"] = "master-pw" })
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{
		"attacker": {Password: "attacker-pw", Server: addr, RewriteUser: "master", RewritePass: "master-pw"},
	}}
	url := as.Start(t)
	h, logs := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = nil
		h.AuthHTTP = &AuthHTTP{URL: url, Timeout: caddy.Duration(time.Second)}
	})
	ts := startSession(t, h, logs, false)
	ts.send("AUTH PLAIN " + b64("victim\x00attacker\x00attacker-pw"))
	ts.expect("-ERR [AUTH] Authorization identity not allowed")
	if reqs := as.Requests(); len(reqs) != 0 {
		t.Errorf("auth server asked: %+v", reqs)
	}
	for _, l := range up.Lines() {
		if strings.HasPrefix(l, "AUTH") {
			t.Errorf("upstream got %q", l)
		}
	}

	// An authzid equal to the user is no other identity: it is dropped.
	ts.send("AUTH PLAIN " + b64("attacker\x00attacker\x00attacker-pw"))
	ts.expect("+OK Logged in.")
	if want := "AUTH PLAIN " + b64("\x00master\x00master-pw"); !slices.Contains(up.Lines(), want) {
		t.Errorf("upstream got %q, want %q", up.Lines(), want)
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	ts.assertNoSecret("attacker-pw", "master-pw")
	// The session line names both the login and the mailbox it acts as.
	lines := logs.FilterMessage("session").All()
	if len(lines) != 1 {
		t.Fatalf("%d session lines", len(lines))
	}
	if f := lines[0].ContextMap(); f["user"] != "attacker" || f["upstream_user"] != "master" {
		t.Errorf("session line user %v, upstream_user %v; want attacker, master", f["user"], f["upstream_user"])
	}
}

// TestPassThroughKeepsAuthzid checks that without auth_http the authzid goes
// to the upstream, which decides about it itself.
func TestPassThroughKeepsAuthzid(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ts.send("AUTH PLAIN " + b64("bob@example.com\x00alice\x00secret-pw"))
	ts.expect("+OK Logged in.")
	if want := "AUTH PLAIN " + b64("bob@example.com\x00alice\x00secret-pw"); !slices.Contains(up.Lines(), want) {
		t.Errorf("upstream got %q", up.Lines())
	}
}

// TestNonCredentialRefusals checks that an upstream or auth server saying
// the mailbox is locked or the server is unwell does not count as a wrong
// password: the client sees the code, but no penalty, no failure delay and
// no "failed" login are recorded.
func TestNonCredentialRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, failText, want, result string
		authServer                   bool
	}{
		{"in-use", "-ERR [IN-USE] Unable to lock maildrop", "-ERR [IN-USE] Mailbox in use by another session, try again later", "in_use", false},
		{"login-delay", "-ERR [LOGIN-DELAY] wait", "-ERR [LOGIN-DELAY] Logging in again so soon", "login_delay", false},
		{"sys-temp", "-ERR [SYS/TEMP] backend trouble", "-ERR [SYS/TEMP] Service temporarily unavailable", "unavailable", false},
		{"sys-perm", "-ERR [SYS/PERM] gone", "-ERR [SYS/PERM] Mailbox not available", "unavailable", false},
		{"auth server sys-temp", "[SYS/TEMP] Database down", "-ERR [SYS/TEMP] Database down", "unavailable", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.FailText = tc.failText })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.AuthFailureDelay = caddy.Duration(10 * time.Second) // would make the reply time out
				if tc.authServer {
					as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{}, FailText: tc.failText, NoWait: true}
					h.Upstream = nil
					h.AuthHTTP = &AuthHTTP{URL: as.Start(t), Timeout: caddy.Duration(time.Second)}
				}
			})
			rec := recordEvents(t, h)
			h.proc.penalties.forget(netip.MustParseAddr("127.0.0.1"))
			failed := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed"))
			other := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", tc.result))

			ts := startSessionGreeting(t, h, logs)
			start := time.Now()
			ts.send("USER alice", "PASS wrong-pw")
			ts.expect("+OK")
			ts.expect(tc.want)
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("refusal took %v: a failure delay was applied", d)
			}
			ts.send("NOOP") // not fatal
			ts.expect("+OK")
			ts.send("QUIT")
			ts.expect("+OK Logging out")
			ts.closed()

			h.proc.penalties.mu.Lock()
			_, penalised := h.proc.penalties.m[netip.MustParseAddr("127.0.0.1")]
			h.proc.penalties.mu.Unlock()
			if penalised {
				t.Error("the client address got a login penalty")
			}
			if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed")) - failed; d != 0 {
				t.Errorf("logins failed +%v", d)
			}
			if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", tc.result)) - other; d != 1 {
				t.Errorf("logins %s +%v, want +1", tc.result, d)
			}
			if got := rec.wait(t, 0); len(got) != 0 {
				t.Errorf("events %v, want none", got)
			}
		})
	}
}

// TestCredentialRefusalStillPenalised is the counterpart: [AUTH], no code
// and a code the client does not know blame the credentials.
func TestCredentialRefusalStillPenalised(t *testing.T) {
	t.Parallel()
	for _, failText := range []string{"-ERR [AUTH] Authentication failed.", "-ERR bad password", "-ERR [X-VENDOR] no"} {
		_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.FailText = failText })
		h, logs := newTestHandler(t, addr, nil)
		rec := recordEvents(t, h)
		failed := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed"))
		ts := startSessionGreeting(t, h, logs)
		ts.send("USER alice", "PASS wrong-pw")
		ts.expect("+OK")
		ts.expect("-ERR [")
		if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed")) - failed; d != 1 {
			t.Errorf("%q: logins failed +%v", failText, d)
		}
		if got := rec.wait(t, 1); len(got) != 1 || got[0].name != "pop3_auth_failed" {
			t.Errorf("%q: events %v", failText, got)
		}
		ts.send("QUIT")
		ts.expect("+OK Logging out")
		ts.closed()
	}
}

// TestChallengeUpstreamLostNeverSendsDigest checks that once the upstream
// whose challenge was relayed is gone, an APOP or CRAM-MD5 digest goes
// nowhere: not as a password to a new upstream connection.
func TestChallengeUpstreamLostNeverSendsDigest(t *testing.T) {
	t.Parallel()
	for _, second := range []string{"APOP", "CRAM-MD5"} {
		t.Run(second, func(t *testing.T) {
			// The upstream closes at the client's cancel of AUTH CRAM-MD5.
			up, addr := challengeUpstream(t)
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.Auth = []string{AuthAPOP, AuthCRAMMD5}
				h.Timeout = caddy.Duration(2 * time.Second)
			})
			ts := startSessionGreeting(t, h, logs)
			if !strings.HasPrefix(ts.greeting, "+OK") {
				t.Fatalf("greeting %q", ts.greeting)
			}
			ts.send("AUTH CRAM-MD5")
			ts.expect("+ " + base64.StdEncoding.EncodeToString([]byte(upstreamTimestamp)))
			up.CloseConnections() // the connection breaks before the cancel reaches it; new ones work
			ts.send("*")
			line := ts.readLine()
			if strings.HasPrefix(line, "-ERR [SYS/TEMP]") {
				ts.closed() // the session ends: nothing can check a digest now
			} else {
				// Were the session to go on, a digest must still go nowhere.
				switch second {
				case "APOP":
					ts.send("APOP alice " + apopDigest(upstreamTimestamp, "secret-pw"))
				default:
					ts.send("AUTH CRAM-MD5")
					if l := ts.readLine(); strings.HasPrefix(l, "+ ") {
						ch, _ := b64decode(strings.TrimPrefix(l, "+ "))
						ts.send(cramResponse("alice", "secret-pw", ch))
					}
				}
				ts.readLine()
				t.Errorf("after the lost upstream, the cancel got %q and the session went on", line)
			}
			for _, l := range up.Lines() {
				if strings.HasPrefix(l, "PASS") || strings.HasPrefix(l, "AUTH PLAIN") || strings.HasPrefix(l, "USER") {
					t.Errorf("digest sent as a password: %q", l)
				}
			}
		})
	}
}

// TestPassThroughRefusesDigests checks the guard itself: without an auth
// server an APOP or CRAM-MD5 login never becomes USER/PASS.
func TestPassThroughRefusesDigests(t *testing.T) {
	t.Parallel()
	for _, method := range []string{AuthAPOP, AuthCRAMMD5} {
		_, err := passThrough{}.authenticate(t.Context(), loginRequest{method: method})
		if err == nil {
			t.Errorf("%s passed through", method)
		}
	}
}

// TestUpstreamReplyTextChecked checks that the upstream's +OK code and text
// reach the client only as one clean line with a well-formed code.
func TestUpstreamReplyTextChecked(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ resp, want string }{
		{"+OK [X-FOO] Logged in.", "[X-FOO] Logged in."},
		{"+OK [bad code\x01 with space] hi", "hi"},
		{"+OK [" + strings.Repeat("A", 100) + "] hi", "hi"},
		{"+OK Logged\x00 in\x1b[2J" + strings.Repeat("x", 1000), "Logged in[2J" + strings.Repeat("x", 200-len("Logged in[2J"))},
	} {
		got, err := loginResult(pop3wire.ParseResponse([]byte(tc.resp)))
		if err != nil || got != tc.want {
			t.Errorf("%q: got %q, %v; want %q", tc.resp, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ resp, code string }{
		{"-ERR [IN-USE] locked", "IN-USE"},
		{"-ERR [IN USE\x7f] locked", ""},
		{"-ERR [" + strings.Repeat("A", 100) + "] x", ""},
	} {
		_, err := loginResult(pop3wire.ParseResponse([]byte(tc.resp)))
		rej, ok := err.(*upstreamRejection)
		if !ok || rej.code != tc.code || len(rej.text) > 200 {
			t.Errorf("%q: got %#v, want code %q", tc.resp, err, tc.code)
		}
	}
}

// TestControlBytesInUserNameRefused checks that a user name or authzid with
// a control byte goes nowhere: not upstream, not to the auth server, not
// into an event.
func TestControlBytesInUserNameRefused(t *testing.T) {
	t.Parallel()
	up, addr := challengeUpstream(t)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthAPOP, AuthCRAMMD5} })
	rec := recordEvents(t, h)
	ts := startSessionGreeting(t, h, logs)
	for _, lines := range [][]string{
		{"USER al\x1b[2Jice", "PASS secret-pw"},
		{"AUTH PLAIN " + b64("\x00al\tice\x00secret-pw")},
		{"AUTH PLAIN " + b64("bo\x7fb\x00alice\x00secret-pw")},
		{"APOP al\x01ice " + apopDigest(upstreamTimestamp, "secret-pw")},
		{"AUTH CRAM-MD5", cramResponse("al\x1bice", "secret-pw", upstreamTimestamp)},
	} {
		ts.send(lines...)
		if strings.HasPrefix(lines[0], "USER") || strings.HasPrefix(lines[0], "AUTH CRAM") {
			ts.expect("+")
		}
		ts.expect("-ERR [AUTH] Invalid credentials syntax")
		if len(rec.wait(t, 0)) != 0 {
			t.Errorf("%q: an event was emitted", lines[0])
		}
	}
	for _, l := range up.Lines() {
		if strings.HasPrefix(l, "USER") || strings.HasPrefix(l, "AUTH PLAIN") || strings.HasPrefix(l, "APOP") {
			t.Errorf("upstream got %q", l)
		}
	}
	if l := up.Lines(); len(l) == 0 || l[len(l)-1] != "*" {
		t.Errorf("the relayed CRAM-MD5 was not cancelled upstream: %q", l)
	}
}

func TestAPOPTimestampChecked(t *testing.T) {
	t.Parallel()
	for greeting, want := range map[string]string{
		"Dovecot ready. <1896.697170952@dbc.mtview.ca.us>": "<1896.697170952@dbc.mtview.ca.us>",
		"ready <no-at-sign>":                         "",
		"ready <a b@c>":                              "",
		"ready <a\x1b[2J@c>":                         "",
		"ready <" + strings.Repeat("x", 300) + "@c>": "",
	} {
		if got := apopTimestamp(greeting); got != want {
			t.Errorf("%q: got %q, want %q", greeting, got, want)
		}
	}
}

// TestAuthzidWithoutUpstreamPlain checks that an authzid the upstream
// cannot take (no AUTH PLAIN) is refused as not supported, not counted as
// a wrong password.
func TestAuthzidWithoutUpstreamPlain(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.SASL = nil })
	h, logs := newTestHandler(t, addr, nil)
	rec := recordEvents(t, h)
	failed := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed"))
	ts := startSession(t, h, logs, false)
	ts.send("AUTH PLAIN " + b64("bob@example.com\x00alice\x00secret-pw"))
	ts.expect("-ERR [AUTH] Authorization identity not supported")
	if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed")) - failed; d != 0 {
		t.Errorf("logins failed +%v", d)
	}
	if got := rec.wait(t, 0); len(got) != 0 {
		t.Errorf("events %v", got)
	}
	for _, l := range up.Lines() {
		if strings.HasPrefix(l, "USER") || strings.HasPrefix(l, "PASS") {
			t.Errorf("upstream got %q", l)
		}
	}
	ts.send("AUTH PLAIN " + b64("\x00alice\x00secret-pw")) // the session goes on
	ts.expect("+OK Logged in.")
}

// TestPassThroughAuthzidChoosesUpstream checks that without auth_http the
// mailbox of the authorization identity decides the upstream ({pop3.user},
// user_hash) and is logged as the user acted as.
func TestPassThroughAuthzidChoosesUpstream(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	_, port, _ := strings.Cut(addr, ":")
	h, logs := newTestHandler(t, "{pop3.user}:"+port, nil)
	ts := startSession(t, h, logs, false)
	ts.send("AUTH PLAIN " + b64("localhost\x00alice\x00secret-pw"))
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	if want := "AUTH PLAIN " + b64("localhost\x00alice\x00secret-pw"); !slices.Contains(up.Lines(), want) {
		t.Errorf("upstream got %q", up.Lines())
	}
	lines := logs.FilterMessage("session").All()
	if len(lines) != 1 {
		t.Fatalf("%d session lines", len(lines))
	}
	if f := lines[0].ContextMap(); f["user"] != "alice" || f["upstream_user"] != "localhost" {
		t.Errorf("session line user %v, upstream_user %v; want alice, localhost", f["user"], f["upstream_user"])
	}
}

// TestRelayedCRAMMD5RefusedUpstream checks that an upstream refusing to
// start CRAM-MD5 is no wrong password: the client has sent none.
func TestRelayedCRAMMD5RefusedUpstream(t *testing.T) {
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
		u.Greeting = "+OK ready " + upstreamTimestamp // a timestamp, but AUTH CRAM-MD5 gets -ERR
		u.SASL = []string{"PLAIN", "CRAM-MD5"}
	})
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthCRAMMD5} })
	rec := recordEvents(t, h)
	failed := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues(AuthCRAMMD5, "failed"))
	ts := startSessionGreeting(t, h, logs)
	ts.send("AUTH CRAM-MD5")
	ts.expect("-ERR [SYS/TEMP] CRAM-MD5 is not available now")
	if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues(AuthCRAMMD5, "failed")) - failed; d != 0 {
		t.Errorf("logins failed +%v", d)
	}
	if got := rec.wait(t, 0); len(got) != 0 {
		t.Errorf("events %v", got)
	}
	ts.send("USER alice", "PASS secret-pw") // the early upstream still serves
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT") // a relay left running would race with the next test's parkAfter
	ts.expect("+OK")
	ts.closed()
}

// TestEarlyUpstreamInUseEndsSession checks that an [IN-USE] from the
// upstream dialled at accept ends the session: Dovecot closes that
// connection, and no other upstream could check a digest made over its
// timestamp.
func TestEarlyUpstreamInUseEndsSession(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
		u.Timestamp = upstreamTimestamp
		u.FailText = "-ERR [IN-USE] Unable to lock maildrop"
	})
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthAPOP} })
	ts := startSessionGreeting(t, h, logs)
	ts.send("USER alice", "PASS wrong-pw")
	ts.expect("+OK")
	ts.expect("-ERR [IN-USE] Mailbox in use")
	ts.closed()
	if n := strings.Count(strings.Join(up.Lines(), "\n"), "CAPA"); n != 1 {
		t.Errorf("upstream connected %d times: %q", n, up.Lines())
	}
}

// TestUpstreamGreetingTextBoundedInLog checks that an upstream's -ERR
// greeting reaches the log as one short clean line.
func TestUpstreamGreetingTextBoundedInLog(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
		u.Greeting = "-ERR [SYS/TEMP] \x1b[2J" + strings.Repeat("x", 8000)
	})
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.LBTryDuration = caddy.Duration(time.Millisecond) })
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("-ERR [SYS/TEMP]")
	ts.closed()
	found := false
	for _, e := range logs.All() {
		if msg, ok := e.ContextMap()["error"].(string); ok && strings.Contains(msg, "greeting") {
			found = true
			if len(msg) > 400 || strings.Contains(msg, "\x1b") {
				t.Errorf("logged greeting error of %d bytes: %.80q", len(msg), msg)
			}
		}
	}
	if !found {
		t.Error("no log entry names the greeting")
	}
}

// TestLongUserNameRefused: a user name or authzid longer than a command
// line may be (max_command_length), which only a SASL exchange can carry,
// goes nowhere: not upstream, not into an event, and not whole into the log.
func TestLongUserNameRefused(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	rec := recordEvents(t, h)
	ts := startSession(t, h, logs, false)
	long := strings.Repeat("a", 300)
	for _, lines := range [][]string{
		{"AUTH PLAIN " + b64("\x00"+long+"\x00secret-pw")},
		{"AUTH PLAIN " + b64(long+"\x00alice\x00secret-pw")},
		{"AUTH LOGIN", b64(long), b64("secret-pw")},
	} {
		ts.send(lines...)
		for range lines[1:] {
			ts.expect("+")
		}
		ts.expect("-ERR [AUTH] Invalid credentials syntax")
	}
	if len(rec.wait(t, 0)) != 0 {
		t.Error("an event was emitted")
	}
	for _, l := range up.Lines() {
		if strings.HasPrefix(l, "AUTH PLAIN") || strings.HasPrefix(l, "USER") {
			t.Errorf("upstream got %q", l)
		}
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.ContextMap()), long) {
			t.Errorf("log line %q holds the whole user name", e.Message)
		}
	}
}

// TestStripControl: the one filter for text crossing from one peer to
// another drops exactly the control bytes and keeps every other byte as it
// is, invalid UTF-8 included: a user name in Auth-User must reach the auth
// server as the client sent it, not with U+FFFD in place of its bytes.
func TestStripControl(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"plain text", "plain text"},
		{"a\r\nb\x00c\x7fd\te", "abcde"},
		{"caf\xe9\r\n", "caf\xe9"},         // Latin-1, not UTF-8
		{"\xff\xfe", "\xff\xfe"},           // no control byte: the same string
		{"ünïcode\x1b[31m", "ünïcode[31m"}, // an escape sequence loses its ESC
	} {
		if got := stripControl(tc.in); got != tc.want {
			t.Errorf("stripControl(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if hasControl(stripControl(tc.in)) {
			t.Errorf("stripControl(%q) keeps a control byte", tc.in)
		}
	}
	long := strings.Repeat("x", 300) + "\r\n"
	if got := sanitizeReplyText(long); len(got) != 200 || hasControl(got) {
		t.Errorf("sanitizeReplyText: %d bytes, control bytes %v", len(got), hasControl(got))
	}
}
