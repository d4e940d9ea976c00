//go:build integration

package integration

// Tests of the pop3 handler inside a real Caddy in front of a real
// Dovecot. Where it makes sense each runs the same steps directly against
// Dovecot and compares. harness_test.go has TestMain and the helpers.

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	replyAuthFailed  = "-ERR [AUTH] Authentication failed"
	replyNeedsTLS    = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connection, use STLS first"
	replyInjection   = "-ERR Commands sent after STLS before the TLS handshake, closing"
	replyUnavailable = "-ERR [SYS/TEMP] Service temporarily unavailable, try again later"
)

// TestLoginMethods logs in with every method, as alice and as bob (whose
// name and password hold '@', ' ', ':', '%' and UTF-8), first with a wrong
// password and then, in the same session, with the right one. Through the
// proxy the wrong password gets -ERR [AUTH], the retry succeeds with
// Dovecot's own +OK text, and STAT matches a direct session.
func TestLoginMethods(t *testing.T) {
	need(t)
	targets := []target{proxyPlain("proxy-starttls-on", env.on), proxyPlain("proxy-starttls-off", env.off), proxySTLS(), proxyImplicit(), proxyImplicitOpt()}
	users := []struct{ name, pass string }{{alice, alicePass}, {bob, bobPass}}
	for _, u := range users {
		usedSecret(u.name, u.pass)
		usedSecret(u.name, wrongPass)
		for _, m := range loginMethods {
			t.Run(u.name+"/"+m.name, func(t *testing.T) {
				// Dovecot itself, for the replies to compare with.
				c := directPlain().dial(t)
				badDirect := m.login(c, u.name, wrongPass)
				if !strings.HasPrefix(badDirect, "-ERR [AUTH]") {
					t.Fatalf("direct: wrong password: got %q, want -ERR [AUTH] ...", badDirect)
				}
				goodDirect := m.login(c, u.name, u.pass)
				if !strings.HasPrefix(goodDirect, "+OK") {
					t.Fatalf("direct: retry with the right password: got %q", goodDirect)
				}
				statDirect := c.ok("STAT")
				c.quit()

				for _, tg := range targets {
					t.Run(tg.name, func(t *testing.T) {
						c := tg.dial(t)
						if got := m.login(c, u.name, wrongPass); sansID(got) != replyAuthFailed {
							t.Errorf("wrong password: got %q, want %q (Dovecot said %q)", got, replyAuthFailed, badDirect)
						}
						if got := m.login(c, u.name, u.pass); got != goodDirect {
							t.Fatalf("retry with the right password: got %q, want Dovecot's %q", got, goodDirect)
						}
						if got := c.cmd("STAT"); got != statDirect {
							t.Errorf("STAT: got %q, want %q", got, statDirect)
						}
						c.quit()
					})
				}
			})
		}
	}
}

// TestLoginFailuresInARow checks that wrong passwords are counted against
// max_errors (default 5): the fifth failure closes the session.
func TestLoginFailuresInARow(t *testing.T) {
	need(t)
	usedSecret(alice, wrongPass)
	c := proxySTLS().dial(t)
	for i := 1; i <= 4; i++ {
		if got := loginMethods[i%len(loginMethods)].login(c, alice, wrongPass); sansID(got) != replyAuthFailed {
			t.Fatalf("failure %d: got %q, want %q", i, got, replyAuthFailed)
		}
	}
	c.ok("USER " + alice)
	if got := c.cmd("PASS " + wrongPass); sansID(got) != replyAuthFailed {
		t.Fatalf("failure 5: got %q", got)
	}
	if got := c.line(); sansID(got) != "-ERR Too many errors, closing connection" {
		t.Fatalf("after failure 5: got %q", got)
	}
	c.expectClosed()
}

// dovecotLines counts the lines of Dovecot's log that mention s.
func dovecotLines(s string) int {
	n := 0
	for _, l := range strings.Split(env.dc.Log(), "\n") {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

// waitDovecotLines waits until Dovecot's log has more than n lines
// mentioning s (its log process writes a little later).
func waitDovecotLines(t *testing.T, s string, n int) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := dovecotLines(s)
		if got > n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPlaintextLoginRefused checks `starttls only` (the default): every way
// to send credentials before STLS gets -ERR [AUTH] and never reaches
// Dovecot; after STLS the same user logs in, which Dovecot's log shows.
func TestPlaintextLoginRefused(t *testing.T) {
	need(t)
	usedSecret(carol, carolPass)
	loginLine := "Login: user=<" + carol + ">"
	before := dovecotLines(loginLine)
	if attempts := dovecotAttempts(carol); attempts != before {
		t.Fatalf("Dovecot's log has %d lines about carol, %d of them logins: another test used carol", attempts, before)
	}

	attempts := map[string][]string{
		"USER":                {"USER " + carol},
		"PASS-after-USER":     {"USER " + carol, "PASS " + carolPass},
		"PASS":                {"PASS " + carolPass},
		"AUTH-PLAIN-initial":  {"AUTH PLAIN " + b64("\x00"+carol+"\x00"+carolPass)},
		"AUTH-PLAIN":          {"AUTH PLAIN"},
		"AUTH-LOGIN-initial":  {"AUTH LOGIN " + b64(carol)},
		"AUTH-LOGIN":          {"AUTH LOGIN"},
		"auth-plain-lower":    {"auth plain " + b64("\x00"+carol+"\x00"+carolPass)},
		"APOP":                {"APOP " + carol + " 0123456789abcdef0123456789abcdef"},
		"AUTH-CRAM-MD5":       {"AUTH CRAM-MD5"},
		"AUTH-PLAIN-then-b64": {"AUTH PLAIN", b64("\x00" + carol + "\x00" + carolPass)},
	}
	for name, cmds := range attempts {
		t.Run(name, func(t *testing.T) {
			c := dialPOP3(t, env.only, nil)
			for i, cmd := range cmds {
				got := c.cmd(cmd)
				switch {
				case strings.HasPrefix(strings.ToUpper(cmd), "APOP"):
					if got != "-ERR APOP is not enabled" {
						t.Errorf("%s: got %q", redact(cmd), got)
					}
				case strings.HasPrefix(cmd, "AUTH CRAM-MD5"):
					if sansID(got) != replyNeedsTLS && got != "-ERR Unsupported authentication mechanism" {
						t.Errorf("%s: got %q", redact(cmd), got)
					}
				case i == 1 && name == "AUTH-PLAIN-then-b64":
					// The refused AUTH sent no "+", so this line is an
					// unknown command and must not be taken as a response.
					if got != "-ERR Unknown command" {
						t.Errorf("base64 line after a refused AUTH: got %q", got)
					}
				case sansID(got) != replyNeedsTLS:
					t.Errorf("%s: got %q, want %q", redact(cmd), got, replyNeedsTLS)
				}
			}
			// The session is still usable: STLS and log in.
			c.stls(caddyTLS(t))
			c.login(carol, carolPass)
			c.ok("STAT")
			c.quit()
		})
	}

	// Each subtest logged in once after STLS; those logins must be all that
	// Dovecot saw of carol.
	want := before + len(attempts)
	if got := waitDovecotLines(t, loginLine, want-1); got != want {
		t.Errorf("Dovecot logged %d logins of carol, want %d (one per subtest, after STLS)", got-before, len(attempts))
	}
	if got := dovecotAttempts(carol); got != want {
		t.Errorf("Dovecot logged %d lines about carol's logins, want only the %d successful ones:\n%s", got, want, env.dc.Log())
	}
}

// dovecotAttempts counts the lines of Dovecot's log about logins or login
// attempts of user: all lines naming the user except those of the mail
// process after a login ("pop3(user)...").
func dovecotAttempts(user string) int {
	n := 0
	for _, l := range strings.Split(env.dc.Log(), "\n") {
		if strings.Contains(l, user) && !strings.Contains(l, "pop3("+user+")") {
			n++
		}
	}
	return n
}

// TestCapa checks what CAPA lists on each listener, before and after TLS:
// STLS only while it can be used, USER and SASL only while a login would be
// accepted.
func TestCapa(t *testing.T) {
	need(t)
	cases := []struct {
		name      string
		dial      func(t *testing.T) *client
		stls      bool // listed
		login     bool // USER and SASL PLAIN LOGIN listed
		stlsReply string
	}{
		{"only/plain", func(t *testing.T) *client { return dialPOP3(t, env.only, nil) }, true, false, ""},
		{"only/after-STLS", proxySTLS().dial, false, true, "-ERR Already using TLS"},
		{"on/plain", func(t *testing.T) *client { return dialPOP3(t, env.on, nil) }, true, true, ""},
		{"off/plain", func(t *testing.T) *client { return dialPOP3(t, env.off, nil) }, false, true, "-ERR STLS not available"},
		{"implicit-tls", proxyImplicit().dial, false, true, "-ERR Already using TLS"},
		{"implicit_tls", proxyImplicitOpt().dial, false, true, "-ERR Already using TLS"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.dial(t)
			if c.greeting != "+OK POP3 ready" {
				t.Errorf("greeting %q", c.greeting)
			}
			c.ok("CAPA")
			caps := c.multi()
			has := func(s string) bool { return slices.Contains(caps, s) }
			if has("STLS") != tc.stls {
				t.Errorf("CAPA %q: STLS listed = %v, want %v", caps, has("STLS"), tc.stls)
			}
			if has("USER") != tc.login {
				t.Errorf("CAPA %q: USER listed = %v, want %v", caps, has("USER"), tc.login)
			}
			sasl := slices.ContainsFunc(caps, func(s string) bool { return strings.HasPrefix(s, "SASL") })
			if sasl != tc.login || (tc.login && !has("SASL PLAIN LOGIN")) {
				t.Errorf("CAPA %q: want SASL PLAIN LOGIN listed = %v", caps, tc.login)
			}
			for _, want := range []string{"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"} {
				if !has(want) {
					t.Errorf("CAPA %q: %s missing", caps, want)
				}
			}
			// AUTH without a mechanism lists what AUTH accepts (RFC 5034 §4).
			c.ok("AUTH")
			mechs := c.multi()
			if want := map[bool][]string{true: {"PLAIN", "LOGIN"}, false: nil}[tc.login]; !slices.Equal(mechs, want) {
				t.Errorf("AUTH list: got %q, want %q", mechs, want)
			}
			if tc.stlsReply != "" {
				if got := c.cmd("STLS"); got != tc.stlsReply {
					t.Errorf("STLS: got %q, want %q", got, tc.stlsReply)
				}
			}
			c.quit()
		})
	}
}

// TestSTLS upgrades with a client that trusts only Caddy's local root and
// checks the name localhost, with and without SNI and ALPN, and checks that
// a client trusting another CA fails.
func TestSTLS(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	root := caddyTLS(t)
	roots := root.RootCAs

	t.Run("verified-alpn-pop3", func(t *testing.T) {
		cfg := root.Clone()
		cfg.NextProtos = []string{"pop3"}
		c := dialPOP3(t, env.only, nil)
		st := c.stls(cfg)
		if st.NegotiatedProtocol != "pop3" {
			t.Errorf("ALPN: got %q, want pop3", st.NegotiatedProtocol)
		}
		if len(st.VerifiedChains) == 0 || !slices.Contains(st.PeerCertificates[0].DNSNames, "localhost") {
			t.Errorf("certificate not verified for localhost: chains %d, names %q", len(st.VerifiedChains), st.PeerCertificates[0].DNSNames)
		}
		if issuer := st.VerifiedChains[0][len(st.VerifiedChains[0])-1].Subject.CommonName; !strings.Contains(issuer, "Caddy Local Authority") {
			t.Errorf("root %q, want Caddy's local authority", issuer)
		}
		c.login(alice, alicePass)
		compareRetr(t, c, 2, env.aliceMsgs[1])
		c.quit()
	})
	t.Run("no-sni-default_sni", func(t *testing.T) {
		// Without SNI the handler's connection_policy default_sni picks the
		// certificate; verify it by hand since crypto/tls needs a name.
		cfg := &tls.Config{
			InsecureSkipVerify: true, // verified in VerifyConnection below
			VerifyConnection: func(cs tls.ConnectionState) error {
				inter := x509.NewCertPool()
				for _, c := range cs.PeerCertificates[1:] {
					inter.AddCert(c)
				}
				_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: "localhost", Roots: roots, Intermediates: inter})
				return err
			},
		}
		c := dialPOP3(t, env.only, nil)
		c.stls(cfg)
		c.login(alice, alicePass)
		c.ok("STAT")
		c.quit()
	})
	t.Run("forgets-USER-from-before-TLS", func(t *testing.T) {
		// RFC 2595 §4: after STLS the client starts over; a USER sent in
		// plaintext must not pair with a PASS sent inside TLS.
		c := dialPOP3(t, env.on, nil)
		c.ok("USER " + alice)
		c.stls(root)
		if got := c.cmd("PASS " + alicePass); got != "-ERR No user name given, send USER first" {
			t.Errorf("PASS after STLS without a new USER: got %q", got)
		}
		c.login(alice, alicePass)
		c.quit()
	})
	t.Run("untrusted-ca-fails", func(t *testing.T) {
		pool, err := certPool(env.dc.CACertFile)
		if err != nil {
			t.Fatal(err)
		}
		c := dialPOP3(t, env.only, nil)
		c.ok("STLS")
		tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: "localhost"})
		if err := tc.Handshake(); err == nil {
			t.Fatal("handshake with a client that trusts only Dovecot's certificate succeeded")
		}
	})
}

// TestImplicitTLS logs in on both port 995 styles: the tls-then-pop3 route
// and pop3 with implicit_tls, whose connection_policy has no alpn and so
// gets the default, pop3.
func TestImplicitTLS(t *testing.T) {
	need(t)
	usedSecret(bob, bobPass)
	for name, addr := range map[string]string{"tls-handler": env.implicit, "implicit_tls": env.implicitOpt} {
		t.Run(name, func(t *testing.T) {
			cfg := caddyTLS(t)
			cfg.NextProtos = []string{"pop3"}
			c := dialPOP3(t, addr, cfg)
			st := c.conn.(*tls.Conn).ConnectionState()
			if st.NegotiatedProtocol != "pop3" || len(st.VerifiedChains) == 0 {
				t.Errorf("ALPN %q, verified chains %d", st.NegotiatedProtocol, len(st.VerifiedChains))
			}
			c.login(bob, bobPass)
			compareRetr(t, c, 1, env.aliceMsgs[0])
			c.quit()
		})
	}
}

// TestImplicitTLSResumption: pop3 with implicit_tls keeps one TLS config,
// so a client resumes its TLS session on the next connection, seen by Go's
// client and by openssl s_client (-sess_out, then -sess_in says Reused).
// caddy-l4's tls handler builds a config per connection: its rate is only
// logged, for comparison.
func TestImplicitTLSResumption(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	resumed := func(t *testing.T, addr string) int {
		cfg := caddyTLS(t)
		cfg.MinVersion = tls.VersionTLS13
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		n := 0
		for range 4 {
			c := dialPOP3(t, addr, cfg) // the greeting read takes in the tickets
			if c.conn.(*tls.Conn).ConnectionState().DidResume {
				n++
			}
			c.login(alice, alicePass)
			c.ok("STAT")
			c.quit()
		}
		return n
	}
	if n := resumed(t, env.implicitOpt); n != 3 {
		t.Errorf("implicit_tls: %d of the 3 connections after the first resumed, want all", n)
	}
	t.Logf("tls handler, then pop3: %d of 3 resumed", resumed(t, env.implicit))

	t.Run("openssl", func(t *testing.T) {
		sess := filepath.Join(t.TempDir(), "session.pem")
		sClient := func(extra ...string) string {
			t.Helper()
			args := append([]string{"s_client", "-connect", env.implicitOpt, "-servername", "localhost",
				"-CAfile", env.caddy.rootCAFile(), "-verify_return_error", "-tls1_3", "-crlf", "-ign_eof"}, extra...)
			out, stderr, err := runInput(t, "QUIT\n", "openssl", args...)
			if err != nil {
				t.Fatalf("openssl s_client: %v\n%s%s", err, out, stderr)
			}
			if !strings.Contains(string(out), "+OK POP3 ready") || !strings.Contains(string(out), "+OK Logging out") {
				t.Fatalf("openssl s_client did not get the greeting and the QUIT reply:\n%s", out)
			}
			return string(out)
		}
		if out := sClient("-sess_out", sess); !strings.Contains(out, "New, TLSv1.3") {
			t.Errorf("first s_client handshake not a new TLS 1.3 session:\n%s", out)
		}
		if out := sClient("-sess_in", sess); !strings.Contains(out, "Reused, TLSv1.3") {
			t.Errorf("s_client -sess_in did not resume:\n%s", out)
		}
	})
}

// compareRetr checks RETR n against the message Dovecot stores.
func compareRetr(t *testing.T, c *client, n int, msg []byte) {
	t.Helper()
	_, sum, size, _ := c.retrRaw(n)
	want := stuffed(msg)
	if sum != sha256.Sum256(want) || size != int64(len(want)) {
		t.Errorf("RETR %d: got %d bytes (sha256 %x), want %d bytes (sha256 %x)", n, size, sum[:8], len(want), sha256.Sum256(want))
	}
}

// TestSTLSInjection sends plaintext commands in the same write as STLS
// (CVE-2011-0411 style). The proxy must answer -ERR, close, and never log
// in: Dovecot sees nothing of the user.
func TestSTLSInjection(t *testing.T) {
	need(t)
	usedSecret(carol, carolPass)
	before := dovecotAttempts(carol)
	for _, tc := range []struct{ name, addr, payload string }{
		{"only/USER", env.only, "STLS\r\nUSER x\r\n"},
		{"only/USER-PASS", env.only, "STLS\r\nUSER " + carol + "\r\nPASS " + carolPass + "\r\n"},
		{"on/AUTH", env.on, "STLS\r\nAUTH PLAIN " + b64("\x00"+carol+"\x00"+carolPass) + "\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialPOP3(t, tc.addr, nil)
			c.write(tc.payload)
			if got := c.line(); got != replyInjection {
				t.Errorf("got %q, want %q", got, replyInjection)
			}
			c.expectClosed()
		})
	}
	time.Sleep(200 * time.Millisecond) // Dovecot's log process is asynchronous
	if after := dovecotAttempts(carol); after != before {
		t.Errorf("Dovecot's log gained %d lines about carol's logins", after-before)
	}
}

// TestRetrByteExact compares the raw bytes of RETR through the proxy with
// Dovecot's own, for a small message that needs dot-stuffing and a 32 MiB
// one (8-bit bytes, lines starting with '.', a 998-octet line), over
// plaintext and over TLS, and reports the throughput.
func TestRetrByteExact(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	want := make([][32]byte, len(env.bigMsgs))
	wantSize := make([]int64, len(env.bigMsgs))
	for i, m := range env.bigMsgs {
		s := stuffed(m)
		want[i], wantSize[i] = sha256.Sum256(s), int64(len(s))
	}
	if wantSize[1] < 32<<20 {
		t.Fatalf("big message is %d bytes", wantSize[1])
	}

	type result struct {
		ok   [2]string
		took time.Duration
	}
	run := func(t *testing.T, tg target) result {
		c := tg.dial(t)
		c.login(big, bigPass)
		var r result
		for i := range env.bigMsgs {
			ok, sum, size, took := c.retrRaw(i + 1)
			r.ok[i] = ok
			if sum != want[i] || size != wantSize[i] {
				t.Errorf("%s RETR %d: %d bytes sha256 %x, want %d bytes sha256 %x", tg.name, i+1, size, sum[:8], wantSize[i], want[i][:8])
			}
			if i == 1 {
				r.took = took
			}
		}
		c.quit()
		return r
	}
	mbps := func(d time.Duration) float64 { return float64(wantSize[1]) / (1 << 20) / d.Seconds() }

	for _, group := range []struct {
		name    string
		direct  target
		proxies []target
	}{
		{"plain", directPlain(), []target{proxyPlain("proxy-starttls-on", env.on), proxyPlain("proxy-starttls-off", env.off)}},
		{"tls", directTLS(t), []target{proxySTLS(), proxyImplicit(), proxyImplicitOpt()}},
	} {
		t.Run(group.name, func(t *testing.T) {
			d := run(t, group.direct)
			t.Logf("%-20s 32 MiB RETR in %v: %.0f MB/s", group.direct.name, d.took.Round(time.Millisecond), mbps(d.took))
			for _, tg := range group.proxies {
				p := run(t, tg)
				if p.ok != d.ok {
					t.Errorf("%s: RETR replies %q, direct %q", tg.name, p.ok, d.ok)
				}
				ratio := p.took.Seconds() / d.took.Seconds()
				t.Logf("%-20s 32 MiB RETR in %v: %.0f MB/s (%.2fx the direct time)", tg.name, p.took.Round(time.Millisecond), mbps(p.took), ratio)
				if p.took > 60*time.Second {
					t.Errorf("%s: 32 MiB took %v", tg.name, p.took)
				}
			}
		})
	}
}

// TestMailboxCommands runs the TRANSACTION commands through the proxy and
// directly on the same mailbox and compares every reply, multi-line ones
// included. The session ends with RSET, so the mailbox stays the same.
func TestMailboxCommands(t *testing.T) {
	need(t)
	usedSecret(dave, davePass)
	if err := env.dc.SetMessages(dave, env.daveMsgs); err != nil {
		t.Fatal(err)
	}
	cmds := []string{
		"STAT", "LIST", "LIST 2", "LIST 9", "UIDL", "UIDL 3", "UIDL 0",
		"TOP 1 0", "TOP 2 2", "TOP 3 100", "TOP 9 1", "RETR 4", "NOOP",
		"DELE 1", "DELE 1", "STAT", "LIST", "UIDL", "LIST 1", "RETR 1", "TOP 1 1",
		"DELE 5", "STAT", "RSET", "STAT", "LIST", "UIDL", "XYZZY", "QUIT",
	}
	session := func(t *testing.T, tg target) []string {
		c := tg.dial(t)
		c.login(dave, davePass)
		tr := c.transcript(cmds...)
		c.expectClosed()
		return tr
	}
	direct := session(t, directPlain())
	if !strings.HasPrefix(direct[0], "STAT => +OK 5 ") {
		t.Fatalf("direct STAT: %q", direct[0])
	}
	for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxySTLS(), proxyImplicit(), proxyImplicitOpt()} {
		t.Run(tg.name, func(t *testing.T) {
			got := session(t, tg)
			if !slices.Equal(got, direct) {
				t.Errorf("transcript differs from direct Dovecot:\n%s", diffLines(got, direct))
			}
		})
	}
}

// TestDeleteCommits deletes two messages, QUITs, and looks at the mailbox
// in a new session: through the proxy as directly. UIDs differ between
// mailbox resets, so they are compared by position.
func TestDeleteCommits(t *testing.T) {
	need(t)
	usedSecret(dave, davePass)
	run := func(t *testing.T, tg target) []string {
		if err := env.dc.SetMessages(dave, env.daveMsgs); err != nil {
			t.Fatal(err)
		}
		c := tg.dial(t)
		c.login(dave, davePass)
		c.ok("UIDL")
		uids := map[string]string{}
		for i, l := range c.multi() {
			if f := strings.Fields(l); len(f) == 2 {
				uids[f[1]] = fmt.Sprintf("<uid of message %d>", i+1)
			}
		}
		tr := c.transcript("DELE 2", "DELE 4", "QUIT")
		c.expectClosed()

		c = tg.dial(t)
		c.login(dave, davePass)
		tr = append(tr, c.transcript("STAT", "LIST", "UIDL", "QUIT")...)
		c.expectClosed()
		for i, l := range tr {
			for uid, pos := range uids {
				tr[i] = strings.ReplaceAll(l, " "+uid, " "+pos)
				l = tr[i]
			}
		}
		return tr
	}
	t.Cleanup(func() { _ = env.dc.SetMessages(dave, env.daveMsgs) })
	direct := run(t, directPlain())
	if !slices.Contains(direct, "STAT => +OK 3 "+fmt.Sprint(len(env.daveMsgs[0])+len(env.daveMsgs[2])+len(env.daveMsgs[4]))) {
		t.Fatalf("direct transcript:\n%s", strings.Join(direct, "\n"))
	}
	for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxyImplicit(), proxyImplicitOpt()} {
		t.Run(tg.name, func(t *testing.T) {
			if got := run(t, tg); !slices.Equal(got, direct) {
				t.Errorf("transcript differs from direct Dovecot:\n%s", diffLines(got, direct))
			}
		})
	}
}

func diffLines(got, want []string) string {
	var b strings.Builder
	for i := 0; i < max(len(got), len(want)); i++ {
		var g, w string
		if i < len(got) {
			g = got[i]
		}
		if i < len(want) {
			w = want[i]
		}
		mark := "  "
		if g != w {
			mark = "! "
		}
		fmt.Fprintf(&b, "%sgot  %q\n%swant %q\n", mark, g, mark, w)
	}
	return b.String()
}

// TestPipelining sends a whole session in one write (RFC 2449 PIPELINING
// style): the login, STAT, LIST and QUIT answers must come back in order,
// as Dovecot gives them directly.
func TestPipelining(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	scripts := map[string]string{
		"USER-PASS":  "USER " + alice + "\r\nPASS " + alicePass + "\r\nSTAT\r\nLIST\r\nQUIT\r\n",
		"AUTH-PLAIN": "AUTH PLAIN " + b64("\x00"+alice+"\x00"+alicePass) + "\r\nSTAT\r\nLIST\r\nUIDL 1\r\nQUIT\r\n",
		// More than the proxy's 4 KiB line buffer holds after the login.
		"deep": "CAPA\r\nUSER " + alice + "\r\nPASS " + alicePass + "\r\n" + strings.Repeat("LIST 2\r\nRETR 2\r\nNOOP\r\n", 300) + "QUIT\r\n",
	}
	read := func(c *client, script string) []string {
		c.write(script)
		var out []string
		for _, cmd := range strings.Split(strings.TrimSuffix(script, "\r\n"), "\r\n") {
			r := c.line()
			out = append(out, redact(cmd)+" => "+r)
			if strings.HasPrefix(r, "+OK") && isMulti(cmd) {
				out = append(out, c.multi()...)
			}
		}
		c.expectClosed()
		return out
	}
	for name, script := range scripts {
		t.Run(name, func(t *testing.T) {
			direct := read(directPlain().dial(t), script)
			if name == "deep" {
				// Dovecot's CAPA differs from the proxy's; compare the rest.
				i := slices.Index(direct, "USER "+alice+" => +OK")
				direct = direct[i:]
			}
			for _, l := range direct {
				if _, r, ok := strings.Cut(l, " => "); ok && !strings.HasPrefix(r, "+OK") {
					t.Fatalf("direct: %q", direct)
				}
			}
			for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxyPlain("proxy-starttls-off", env.off), proxySTLS(), proxyImplicit(), proxyImplicitOpt()} {
				t.Run(tg.name, func(t *testing.T) {
					got := read(tg.dial(t), script)
					if name == "deep" {
						got = got[slices.Index(got, "USER "+alice+" => +OK"):]
					}
					if !slices.Equal(got, direct) {
						t.Errorf("pipelined session differs from direct Dovecot:\n%s", diffLines(got, direct))
					}
				})
			}
		})
	}
}

// TestUpstreamDown logs in on a listener whose upstream is a closed port:
// -ERR [SYS/TEMP], then a clean close, and no ERROR in Caddy's log.
func TestUpstreamDown(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	for _, m := range loginMethods[:2] {
		t.Run(m.name, func(t *testing.T) {
			c := dialPOP3(t, env.down, nil)
			start := time.Now()
			if got := m.login(c, alice, alicePass); sansID(got) != replyUnavailable {
				t.Errorf("login: got %q, want %q", got, replyUnavailable)
			}
			c.expectClosed()
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("refused dial took %v", d)
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(env.caddy.log(), `"upstream unavailable"`) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	entries := caddyEntries(env.caddy.log())
	found := false
	for _, e := range entries {
		if e["msg"] == "upstream unavailable" && e["upstream"] == env.closedPort {
			found = true
			if e["level"] != "warn" {
				t.Errorf("upstream unavailable logged at %v, want warn", e["level"])
			}
		}
		// The handler must return nil (no "handling connection" ERROR from
		// caddy-l4) and log nothing at ERROR itself.
		if e["level"] == "error" && (e["logger"] == "layer4.handlers.pop3" || e["local"] == env.down) {
			t.Errorf("ERROR in Caddy's log: %v", e)
		}
	}
	if !found {
		t.Errorf("no \"upstream unavailable\" entry for %s in Caddy's log", env.closedPort)
	}
}

// caddyEntries parses Caddy's JSON log lines; other lines are skipped.
func caddyEntries(log string) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(log, "\n") {
		if !strings.HasPrefix(l, "{") {
			continue
		}
		var e map[string]any
		if json.Unmarshal([]byte(l), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// TestAuthMethodsRefusedAtProvision checks that `auth external` (and the other
// methods that need an auth server) is refused when Caddy loads the
// config, with an error naming the auth option, while `caddy adapt`
// accepts the syntax.
func TestAuthMethodsRefusedAtProvision(t *testing.T) {
	need(t)
	for _, method := range []string{"external", "oauthbearer", "plain xoauth2"} {
		t.Run(strings.ReplaceAll(method, " ", "+"), func(t *testing.T) {
			addr, err := freePort()
			if err != nil {
				t.Fatal(err)
			}
			cf := fmt.Sprintf("{\n\tadmin off\n\tlayer4 {\n\t\t%s {\n\t\t\troute {\n\t\t\t\tpop3 %s {\n\t\t\t\t\tauth %s\n\t\t\t\t\tstarttls off\n\t\t\t\t}\n\t\t\t}\n\t\t}\n\t}\n}\n",
				addr, env.dc.POP3Addr, method)
			dir := t.TempDir()
			p, err := runCaddy("auth-"+method, cf, dir)
			if err != nil {
				t.Fatal(err)
			}
			err = p.wait(30 * time.Second)
			if err == nil {
				t.Fatalf("caddy run with `auth %s` exited 0; log:\n%s", method, p.log())
			}
			if !regexp.MustCompile(`auth: method \\?"` + strings.Fields(method)[len(strings.Fields(method))-1]).MatchString(p.log()) {
				t.Errorf("caddy run error does not name the auth option and method:\n%s", tail(p.log(), 10))
			}

			cmd := commandIn(dir, env.caddyBin, "adapt", "--config", filepath.Join(dir, "Caddyfile"), "--adapter", "caddyfile")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("caddy adapt: %v\n%s", err, out)
			} else if !strings.Contains(string(out), `"auth":[`) {
				t.Errorf("caddy adapt output has no auth field:\n%s", out)
			}
			cmd = commandIn(dir, env.caddyBin, "validate", "--config", filepath.Join(dir, "Caddyfile"), "--adapter", "caddyfile")
			if out, err := cmd.CombinedOutput(); err == nil {
				t.Errorf("caddy validate accepted `auth %s`:\n%s", method, out)
			} else if !strings.Contains(string(out), "auth: method") {
				t.Errorf("caddy validate error does not name the auth option:\n%s", tail(string(out), 10))
			}
		})
	}
}

// TestOptions runs a second Caddy with the handler's other options set:
// greeting, capabilities, pass_error_message, max_errors, timeout and
// proxy_timeout.
func TestOptions(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(alice, wrongPass)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	p := startCaddy(t, "options", fmt.Sprintf(`{
	admin off
	log {
		level DEBUG
	}
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
					greeting "Test proxy at your service"
					capabilities TOP UIDL "EXPIRE NEVER"
					pass_error_message on
					max_errors 2
					auth_failure_delay 1ms
					timeout 1s
					proxy_timeout 1s
				}
			}
		}
	}
}
`, addr, env.dc.POP3Addr), listener{addr: addr})
	dial := func(t *testing.T) *client { return dialPOP3(t, addr, nil) }

	t.Run("greeting-and-capa", func(t *testing.T) {
		c := dial(t)
		if c.greeting != "+OK Test proxy at your service" {
			t.Errorf("greeting %q", c.greeting)
		}
		c.ok("CAPA")
		want := []string{"TOP", "UIDL", "EXPIRE NEVER", "SASL PLAIN LOGIN", "RESP-CODES", "AUTH-RESP-CODE"}
		if got := c.multi(); !slices.Equal(got, want) {
			t.Errorf("CAPA %q, want %q", got, want)
		}
		c.quit()
	})
	t.Run("pass_error_message", func(t *testing.T) {
		// The proxy logs in upstream with AUTH PLAIN, so Dovecot's answer
		// to that is what the client must see.
		d := directPlain().dial(t)
		want := loginMethods[1].login(d, alice, wrongPass)
		d.quit()
		if !strings.HasPrefix(want, "-ERR [AUTH] ") || want == replyAuthFailed {
			t.Fatalf("Dovecot's own reply %q cannot tell pass_error_message from the generic text", want)
		}
		for _, m := range loginMethods {
			c := dial(t)
			if got := m.login(c, alice, wrongPass); sansID(got) != want {
				t.Errorf("%s: got %q, want Dovecot's %q", m.name, got, want)
			}
			c.quit()
		}
	})
	t.Run("max_errors", func(t *testing.T) {
		c := dial(t)
		if got := c.cmd("XYZZY"); got != "-ERR Unknown command" {
			t.Errorf("got %q", got)
		}
		if got := c.cmd("PASS " + wrongPass); got != "-ERR No user name given, send USER first" {
			t.Errorf("got %q", got)
		}
		if got := c.line(); sansID(got) != "-ERR Too many errors, closing connection" {
			t.Errorf("after 2 errors: got %q", got)
		}
		c.expectClosed()
	})
	t.Run("timeout", func(t *testing.T) {
		c := dial(t)
		start := time.Now()
		c.deadline(5 * time.Second)
		if got := c.line(); sansID(got) != "-ERR Disconnected for inactivity" {
			t.Errorf("got %q", got)
		}
		if d := time.Since(start); d < 900*time.Millisecond || d > 3*time.Second {
			t.Errorf("closed after %v, want about 1s", d)
		}
		c.expectClosed()
	})
	t.Run("proxy_timeout", func(t *testing.T) {
		c := dial(t)
		c.login(alice, alicePass)
		c.ok("STAT")
		start := time.Now()
		c.expectClosed()
		if d := time.Since(start); d < 900*time.Millisecond || d > 3*time.Second {
			t.Errorf("idle session closed after %v, want 1s to 1.25s", d)
		}
		deadline := time.Now().Add(3 * time.Second)
		for !strings.Contains(p.log(), `"result":"idle_timeout"`) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(p.log(), `"result":"idle_timeout"`) {
			t.Errorf("no session line with result idle_timeout")
		}
	})
}

// TestHalfClose sends QUIT and shuts down its sending side at once: the
// proxy must still deliver Dovecot's answer, then close.
func TestHalfClose(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	run := func(t *testing.T, tg target) string {
		c := tg.dial(t)
		c.login(alice, alicePass)
		c.write("STAT\r\nQUIT\r\n")
		if tc, ok := c.conn.(*tls.Conn); ok {
			if err := tc.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		} else if err := c.conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		out := c.line() + "|" + c.line()
		c.expectClosed()
		return out
	}
	want := run(t, directPlain())
	for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxySTLS(), proxyImplicit(), proxyImplicitOpt()} {
		t.Run(tg.name, func(t *testing.T) {
			if got := run(t, tg); got != want {
				t.Errorf("got %q, want Dovecot's %q", got, want)
			}
		})
	}
}

// TestClientAbortsRetr closes the client in the middle of a 32 MiB RETR:
// the proxy must close the upstream session too (Dovecot logs its end)
// and log the session without an ERROR.
func TestClientAbortsRetr(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxyImplicit(), proxyImplicitOpt()} {
		t.Run(tg.name, func(t *testing.T) {
			ended := dovecotLines("pop3(" + big + ")")
			c := tg.dial(t)
			c.login(big, bigPass)
			c.write("RETR 2\r\n")
			buf := make([]byte, 1<<20)
			if _, err := io.ReadFull(c.r, buf); err != nil {
				t.Fatal(err)
			}
			local := c.tcp.LocalAddr().String()
			c.tcp.Close()
			if got := waitDovecotLines(t, "pop3("+big+")", ended); got <= ended {
				t.Errorf("Dovecot did not log the end of the upstream session within 5s")
			}
			deadline := time.Now().Add(5 * time.Second)
			var session map[string]any
			for session == nil && time.Now().Before(deadline) {
				for _, e := range caddyEntries(env.caddy.log()) {
					if e["msg"] == "session" && e["remote"] == local {
						session = e
					}
				}
				time.Sleep(20 * time.Millisecond)
			}
			if session == nil {
				t.Fatalf("no session line for %s", local)
			}
			if session["level"] != "info" || session["user"] != big {
				t.Errorf("session line %v", session)
			}
			for _, e := range caddyEntries(env.caddy.log()) {
				if e["remote"] == local && e["level"] == "error" {
					t.Errorf("ERROR logged: %v", e)
				}
			}
		})
	}
}

var sessionIDSuffix = regexp.MustCompile(` \(session [0-9a-f]{12}\)$`)

// sansID strips the session id that -ERR replies with a response code end
// with; a reply without one comes back marked, so that comparing it fails.
func sansID(reply string) string {
	if !sessionIDSuffix.MatchString(reply) {
		return reply + " [no session id]"
	}
	return sessionIDSuffix.ReplaceAllString(reply, "")
}
