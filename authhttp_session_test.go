package pop3

import (
	"crypto/tls"
	"crypto/x509"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// authHTTPSetup starts two upstreams and an auth server that sends alice to
// the first and bob to the second.
func authHTTPSetup(t *testing.T, mod func(*pop3test.AuthServer)) (*pop3test.AuthServer, [2]*pop3test.Upstream, func(*Handler)) {
	t.Helper()
	up1, addr1 := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["alice-backend"] = "backend-pw" })
	up2, addr2 := fakeUpstream(t, nil)
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{
		"alice":           {Password: "secret-pw", Server: addr1},
		"bob@example.com": {Password: "p@ss wörd:%", Server: addr2},
		"carol":           {Password: "carol-pw", Server: addr1, RewriteUser: "alice-backend", RewritePass: "backend-pw"},
		"tokenuser":       {Password: "tok-" + strings.Repeat("x", 20000), Server: addr1, RewriteUser: "alice", RewritePass: "secret-pw"},
	}}
	if mod != nil {
		mod(as)
	}
	url := as.Start(t)
	return as, [2]*pop3test.Upstream{up1, up2}, func(h *Handler) {
		h.Upstream = nil
		h.AuthHTTP = &AuthHTTP{URL: url, Header: map[string]string{"X-Auth-Key": "{env.POP3_TEST_AUTH_KEY}"}, Timeout: caddy.Duration(time.Second)}
		h.Auth = []string{AuthPlain, AuthAPOP, AuthCRAMMD5, AuthOAuthBearer, AuthXOAuth2}
	}
}

func TestAuthHTTPRoutesPerUser(t *testing.T) {
	t.Setenv("POP3_TEST_AUTH_KEY", "shared-secret")
	as, ups, mod := authHTTPSetup(t, nil)
	h, logs := newTestHandler(t, "", mod)
	for i, c := range []struct{ user, pass string }{{"alice", "secret-pw"}, {"bob@example.com", "p@ss wörd:%"}} {
		ts := startSession(t, h, logs, false)
		ts.send("USER "+c.user, "PASS "+c.pass, "QUIT")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		ts.expect("+OK bye")
		ts.closed()
		if want := "AUTH PLAIN " + b64("\x00"+c.user+"\x00"+c.pass); !slices.Contains(ups[i].Lines(), want) {
			t.Errorf("%s: upstream %d got %q", c.user, i, ups[i].Lines())
		}
		ts.assertNoSecret(c.pass, "shared-secret")
	}
	req := as.Requests()[1]
	for name, want := range map[string]string{
		"Auth-Method":        "plain",
		"Auth-User":          "bob@example.com",
		"Auth-Pass":          "p@ss%20wörd:%25",
		"Auth-Protocol":      "pop3",
		"Auth-Login-Attempt": "1",
		"X-Auth-Key":         "shared-secret",
	} {
		if got := req.Value(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if _, ok := req.Get("Auth-Salt"); ok {
		t.Error("Auth-Salt sent for plain")
	}
}

func TestAuthHTTPRewritesCredentials(t *testing.T) {
	t.Parallel()
	_, ups, mod := authHTTPSetup(t, nil)
	h, logs := newTestHandler(t, "", mod)
	ts := startSession(t, h, logs, false)
	ts.send("AUTH PLAIN " + b64("\x00carol\x00carol-pw"))
	ts.expect("+OK Logged in.")
	if want := "AUTH PLAIN " + b64("\x00alice-backend\x00backend-pw"); !slices.Contains(ups[0].Lines(), want) {
		t.Errorf("upstream got %q", ups[0].Lines())
	}
	ts.assertNoSecret("carol-pw", "backend-pw")
}

func TestAuthHTTPAPOPAndCRAMMD5(t *testing.T) {
	t.Parallel()
	as, _, mod := authHTTPSetup(t, nil)
	h, logs := newTestHandler(t, "", mod)
	ts2 := startSessionGreeting(t, h, logs)
	stamp := ts2.greeting[strings.IndexByte(ts2.greeting, '<'):]
	ts2.send("APOP alice " + apopDigest(stamp, "wrong"))
	ts2.expect("-ERR [AUTH] Invalid login or password")
	ts2.send("APOP alice " + apopDigest(stamp, "secret-pw"))
	ts2.expect("+OK Logged in.")
	if r := as.Requests(); r[len(r)-1].Value("Auth-Salt") != stamp || r[len(r)-1].Value("Auth-Method") != "apop" || r[len(r)-1].Value("Auth-Login-Attempt") != "2" {
		t.Errorf("APOP request %+v", r[len(r)-1])
	}
	ts2.assertNoSecret("secret-pw", apopDigest(stamp, "secret-pw"))

	ts3 := startSessionGreeting(t, h, logs)
	var challenges []string
	for _, pass := range []string{"wrong", "secret-pw"} {
		ts3.send("AUTH CRAM-MD5")
		line := ts3.expect("+ ")
		ch, err := b64decode(strings.TrimPrefix(line, "+ "))
		if err != nil {
			t.Fatal(err)
		}
		challenges = append(challenges, ch)
		ts3.send(cramResponse("alice", pass, ch))
		if pass == "wrong" {
			ts3.expect("-ERR [AUTH]")
		}
	}
	ts3.expect("+OK Logged in.")
	if challenges[0] == challenges[1] || !strings.HasPrefix(challenges[0], "<") {
		t.Errorf("challenges %q are not fresh msg-ids", challenges)
	}
	if r := as.Requests(); r[len(r)-1].Value("Auth-Salt") != challenges[1] || r[len(r)-1].Value("Auth-Method") != "cram-md5" {
		t.Errorf("CRAM-MD5 request %+v", r[len(r)-1])
	}
}

func TestAuthHTTPTokens(t *testing.T) {
	t.Parallel()
	as, ups, mod := authHTTPSetup(t, nil)
	h, logs := newTestHandler(t, "", mod)
	token := "tok-" + strings.Repeat("x", 20000)
	for _, c := range []struct{ mech, ir, method string }{
		{"OAUTHBEARER", "n,a=tokenuser,\x01auth=Bearer " + token + "\x01\x01", "oauthbearer"},
		{"XOAUTH2", "user=tokenuser\x01auth=Bearer " + token + "\x01\x01", "xoauth2"},
	} {
		ts := startSession(t, h, logs, false)
		ts.send("AUTH " + c.mech + " " + b64(c.ir))
		ts.expect("+OK Logged in.")
		last := as.Requests()[len(as.Requests())-1]
		if last.Value("Auth-Method") != c.method || last.Value("Auth-User") != "tokenuser" || last.Value("Auth-Pass") != token {
			t.Errorf("%s: request method %q user %q", c.mech, last.Value("Auth-Method"), last.Value("Auth-User"))
		}
		ts.assertNoSecret(token[:64])
	}
	if !slices.Contains(ups[0].Lines(), "AUTH PLAIN "+b64("\x00alice\x00secret-pw")) {
		t.Errorf("upstream got %q", ups[0].Lines())
	}
}

func TestAuthHTTPRefusalAndWait(t *testing.T) {
	_, _, mod := authHTTPSetup(t, func(a *pop3test.AuthServer) { a.Wait = time.Second; a.FailText = "[IN-USE] Mailbox busy" })
	h, logs := newTestHandler(t, "", mod)
	ts := startSession(t, h, logs, false)
	start := time.Now()
	ts.send("USER alice", "PASS nope")
	ts.expect("+OK")
	ts.expect("-ERR [IN-USE] Mailbox busy")
	if d := time.Since(start); d < time.Second {
		t.Errorf("Auth-Wait 1 answered after %v", d)
	}
	ts.send("USER alice", "PASS secret-pw") // the session goes on
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
}

func TestAuthHTTPUnavailable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		mod  func(*pop3test.AuthServer)
		url  string
	}{
		{"slow", func(a *pop3test.AuthServer) { a.Delay = 3 * time.Second }, ""},
		{"down", nil, "http://" + "127.0.0.1:1/auth"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, ups, mod := authHTTPSetup(t, tc.mod)
			h, logs := newTestHandler(t, "", func(h *Handler) {
				mod(h)
				if tc.url != "" {
					h.AuthHTTP.URL = tc.url
				}
			})
			ts := startSession(t, h, logs, false)
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			ts.expect("-ERR [SYS/TEMP] Authentication service temporarily unavailable")
			ts.send("NOOP") // not fatal: the client may retry
			ts.expect("+OK")
			if len(ups[0].Lines()) != 0 {
				t.Errorf("upstream contacted: %q", ups[0].Lines())
			}
			ts.assertNoSecret("secret-pw")
		})
	}
}

// TestAuthExternal logs in with a client certificate presented in the STLS
// handshake and in the implicit_tls one.
func TestAuthExternal(t *testing.T) {
	t.Parallel()
	for _, implicit := range []bool{false, true} {
		t.Run(map[bool]string{false: "stls", true: "implicit_tls"}[implicit], func(t *testing.T) {
			ca, caKey := testCA(t)
			clientCert := testClientCert(t, ca, caKey, "alice")
			as, ups, mod := authHTTPSetup(t, nil)
			as.Users["alice"] = pop3test.AuthUser{Password: "secret-pw", Server: as.Users["alice"].Server, CertSubject: "CN=alice"}
			pool := x509.NewCertPool()
			pool.AddCert(ca)
			h, logs := newTestHandler(t, "", func(h *Handler) {
				mod(h)
				h.Auth = []string{AuthExternal}
				h.StartTLS = StartTLSOnly
				h.ImplicitTLS = implicit
			})
			h.tlsConfig = &tls.Config{Certificates: []tls.Certificate{testCertificate(t)}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: pool}
			clientCfg := &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{clientCert}}

			var ts *testSession
			if implicit {
				ts, _ = startImplicitSession(t, h, logs, clientCfg)
			} else {
				ts = startSession(t, h, logs, false)
				ts.send("CAPA")
				ts.expect("+OK")
				if caps := ts.multiline(); slices.Contains(caps, "SASL EXTERNAL") {
					t.Errorf("EXTERNAL offered before TLS: %q", caps)
				}
				ts.send("STLS")
				ts.expect("+OK")
				tc := tls.Client(ts.conn, clientCfg)
				if err := tc.Handshake(); err != nil {
					t.Fatal(err)
				}
				ts.conn, ts.r = tc, newBufioReader(tc)
			}
			ts.send("CAPA")
			ts.expect("+OK")
			if caps := ts.multiline(); !slices.Contains(caps, "SASL EXTERNAL") {
				t.Errorf("EXTERNAL not offered with a client certificate: %q", caps)
			}
			ts.send("AUTH EXTERNAL " + b64("alice"))
			ts.expect("+OK Logged in.")
			last := as.Requests()[len(as.Requests())-1]
			for name, want := range map[string]string{"Auth-Method": "external", "Auth-User": "alice", "Auth-SSL": "on", "Auth-SSL-Verify": "SUCCESS", "Auth-SSL-Subject": "CN=alice"} {
				if got := last.Value(name); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
			if !slices.Contains(ups[0].Lines(), "AUTH PLAIN "+b64("\x00alice\x00secret-pw")) {
				t.Errorf("upstream got %q", ups[0].Lines())
			}
		})
	}
}

func TestFailureDelayDoublesPerClient(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.AuthFailureDelay = caddy.Duration(100 * time.Millisecond)
		h.MaxErrors = 10
	})
	h.proc.penalties.forget(netip.MustParseAddr("127.0.0.1"))
	ts := startSession(t, h, logs, true)
	var took []time.Duration
	for i := 0; i < 3; i++ {
		start := time.Now()
		ts.send("USER alice", "PASS wrong")
		ts.expect("+OK")
		ts.expect("-ERR [AUTH]")
		took = append(took, time.Since(start))
	}
	for i, min := range []time.Duration{100, 200, 400} {
		if took[i] < min*time.Millisecond || took[i] > (min+700)*time.Millisecond {
			t.Errorf("failure %d answered after %v, want about %dms (all: %v)", i+1, took[i], min, took)
		}
	}
	// A good login clears the user's penalty.
	ts.loginAndQuit()
	if d := h.proc.penalties.fail(netip.MustParseAddr("127.0.0.1"), "alice", time.Millisecond); d != time.Millisecond {
		t.Errorf("penalty after a good login: %v", d)
	}
	h.proc.penalties.forget(netip.MustParseAddr("127.0.0.1"))
}

// TestAuthHTTPRetryEachMethod fails once and then logs in, in one session,
// for every method: a failed exchange must leave the session usable.
func TestAuthHTTPRetryEachMethod(t *testing.T) {
	t.Parallel()
	_, _, mod := authHTTPSetup(t, func(a *pop3test.AuthServer) { a.ErrorCode = "LOGIN-DELAY" })
	h, logs := newTestHandler(t, "", mod)
	token := "tok-" + strings.Repeat("x", 20000)
	type step func(ts *testSession, good bool)
	plainPass := func(good bool) string {
		if good {
			return "secret-pw"
		}
		return "bad"
	}
	methods := map[string]step{
		"USER/PASS": func(ts *testSession, good bool) {
			ts.send("USER alice", "PASS "+plainPass(good))
			ts.expect("+OK")
		},
		"AUTH PLAIN": func(ts *testSession, good bool) {
			ts.send("AUTH PLAIN " + b64("\x00alice\x00"+plainPass(good)))
		},
		"AUTH LOGIN": func(ts *testSession, good bool) {
			ts.send("AUTH LOGIN " + b64("alice"))
			ts.expect("+ ")
			ts.send(b64(plainPass(good)))
		},
		"APOP": func(ts *testSession, good bool) {
			stamp := ts.greeting[strings.IndexByte(ts.greeting, '<'):]
			ts.send("APOP alice " + apopDigest(stamp, plainPass(good)))
		},
		"AUTH CRAM-MD5": func(ts *testSession, good bool) {
			ts.send("AUTH CRAM-MD5")
			ch, _ := b64decode(strings.TrimPrefix(ts.expect("+ "), "+ "))
			ts.send(cramResponse("alice", plainPass(good), ch))
		},
		"AUTH XOAUTH2": func(ts *testSession, good bool) {
			tok := token
			if !good {
				tok = "expired"
			}
			ts.send("AUTH XOAUTH2 " + b64("user=tokenuser\x01auth=Bearer "+tok+"\x01\x01"))
			if !good {
				ts.expect("+ " + b64(`{"status":"invalid_token"}`))
				ts.send("AQ==")
			}
		},
		"AUTH OAUTHBEARER": func(ts *testSession, good bool) {
			tok := token
			if !good {
				tok = "expired"
			}
			ts.send("AUTH OAUTHBEARER " + b64("n,a=tokenuser,\x01auth=Bearer "+tok+"\x01\x01"))
			if !good {
				ts.expect("+ " + b64(`{"status":"invalid_token"}`))
				ts.send("AQ==")
			}
		},
	}
	for name, login := range methods {
		t.Run(name, func(t *testing.T) {
			ts := startSessionGreeting(t, h, logs)
			login(ts, false)
			ts.expect("-ERR [LOGIN-DELAY] Invalid login or password")
			login(ts, true)
			ts.expect("+OK Logged in.")
			ts.send("QUIT")
			ts.expect("+OK bye")
			ts.closed()
		})
	}
}

// TestSlowAuthServerLeavesUpstreamItsTime: an auth server slower than
// timeout (which bounds the client's silence) still gets the login its
// upstream: the dial's deadline starts when the auth server has answered,
// and the upstream is not blamed for time the auth server used.
func TestSlowAuthServerLeavesUpstreamItsTime(t *testing.T) {
	t.Parallel()
	_, _, mod := authHTTPSetup(t, func(as *pop3test.AuthServer) { as.Delay = 600 * time.Millisecond })
	h, logs := newTestHandler(t, "", func(h *Handler) {
		mod(h)
		h.Timeout = caddy.Duration(300 * time.Millisecond)
		h.AuthHTTP.Timeout = caddy.Duration(5 * time.Second)
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
	if n := logs.FilterMessage("upstream unavailable").Len(); n != 0 {
		t.Errorf("%d upstream unavailable lines", n)
	}
}
