//go:build integration

package integration

// Logins beyond USER/PASS and AUTH PLAIN/LOGIN through a real Caddy in
// front of real Dovecot instances: APOP and CRAM-MD5 relayed from the
// upstream without an auth server; an NGINX-style auth server
// (internal/pop3test.AuthServer, in this process) that routes users between
// two Dovecot instances, rewrites credentials, checks APOP, CRAM-MD5,
// OAUTHBEARER, XOAUTH2 and EXTERNAL logins and records every header field;
// and the growing delay after failed logins.
//
// The shared Dovecot offers PLAIN and LOGIN only (no APOP timestamp in its
// greeting), so these tests start their own.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	mathbig "math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

const (
	// challengeMechs lets Dovecot put an APOP timestamp in its greeting
	// and offer CRAM-MD5; both need the password stored in plain.
	challengeMechs = "auth_mechanisms = plain login cram-md5 apop\n"

	// carol's login is rewritten by the auth server to this account.
	carolMailbox, carolMailboxPass = "carol-mailbox", "mailbox-Secr3t-pw"
	// tokenUser logs in with an OAuth token; the auth server maps it to alice.
	tokenUser = "token-user"

	replyAuthRefused = "-ERR [AUTH] Invalid login or password" // pop3test.AuthServer's refusal
	replyAuthDown    = "-ERR [SYS/TEMP] Authentication service temporarily unavailable, try again later"
	replyCancelled   = "-ERR [AUTH] Authentication cancelled"
	replyTooMany     = "-ERR Too many errors, closing connection"
)

// usedSecretValue records one more string the log scan must not find in
// any Caddy log: an APOP or CRAM-MD5 digest, a token, a base64 AUTH payload
// or a header value.
func usedSecretValue(value, what string) {
	secrets.Lock()
	defer secrets.Unlock()
	if secrets.m == nil {
		secrets.m = map[string]string{}
	}
	secrets.m[value] = what
}

// apopDigest is the hex MD5 of the timestamp and the password (RFC 1939 §7).
func apopDigest(timestamp, pass string) string {
	sum := md5.Sum([]byte(timestamp + pass))
	return hex.EncodeToString(sum[:])
}

// cramResponse is the client's base64 answer to a CRAM-MD5 challenge
// (RFC 2195); both it and the digest inside are registered as secrets.
func cramResponse(user, pass, challenge string) string {
	mac := hmac.New(md5.New, []byte(pass))
	mac.Write([]byte(challenge))
	digest := hex.EncodeToString(mac.Sum(nil))
	line := b64(user + " " + digest)
	usedSecretValue(digest, "CRAM-MD5 digest of "+user)
	usedSecretValue(line, "CRAM-MD5 response of "+user)
	return line
}

// timestampRE is an RFC 1939 §7 timestamp in a greeting.
var timestampRE = regexp.MustCompile(`<[^<>@ ]+@[^<> ]+>`)

// The shapes of Dovecot 2.3's APOP timestamp (pid, connection, time in hex
// and a base64 nonce) and CRAM-MD5 challenge (random digits and the Unix
// time), which the proxy's own "<hex.nanoseconds@host>" does not match.
var (
	dovecotAPOPStamp = regexp.MustCompile(`^<[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+\.[A-Za-z0-9+/]+=*@[^<> ]+>$`)
	dovecotChallenge = regexp.MustCompile(`^<[0-9]+\.[0-9]{10}@[^<> ]+>$`)
)

// greetingTimestamp returns the APOP timestamp of a greeting; it fails the
// test when there is none.
func greetingTimestamp(t *testing.T, greeting string) string {
	t.Helper()
	ts := timestampRE.FindString(greeting)
	if ts == "" {
		t.Fatalf("greeting %q has no APOP timestamp", greeting)
	}
	return ts
}

// saslChallenge reads a "+ base64" continuation and decodes it.
func saslChallenge(t *testing.T, line string) string {
	t.Helper()
	enc, ok := strings.CutPrefix(line, "+ ")
	if !ok {
		t.Fatalf("got %q, want a SASL challenge", line)
	}
	dec, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		t.Fatalf("challenge %q: %v", line, err)
	}
	return string(dec)
}

// --- private Dovecot instances ----------------------------------------------

// startTestDovecot starts a Dovecot for one test, with FastFailPassdb after
// extra, and stops it when the test ends. bob's password holds ':', which a
// passwd-file line cannot, so for him it writes a second passwd-file with
// the password base64-encoded, as startDovecot does.
func startTestDovecot(t *testing.T, name string, users []dovecot.User, extra string) *dovecot.Server {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, u := range users {
		if u.Name != bob {
			continue
		}
		file := filepath.Join(dir, "users-b64")
		line := fmt.Sprintf("%s:{PLAIN.b64}%s\n", bob, base64.StdEncoding.EncodeToString([]byte(bobPass)))
		if err := os.WriteFile(file, []byte(line), 0o644); err != nil {
			t.Fatal(err)
		}
		extra += fmt.Sprintf("passdb {\n  driver = passwd-file\n  args = username_format=%%u %s\n}\n", file)
		users[i].Password = "unused-" + fmt.Sprint(time.Now().UnixNano())
	}
	start := time.Now()
	srv, err := dovecot.Start(dovecot.Config{Dir: dir, Users: users, Extra: extra + dovecot.FastFailPassdb})
	if err != nil {
		t.Fatalf("dovecot %s: %v", name, err)
	}
	t.Logf("dovecot %s started in %v", name, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dovecot %s log tail:\n%s", name, tail(srv.Log(), 30))
		}
		if err := srv.Stop(); err != nil {
			t.Errorf("stopping dovecot %s: %v", name, err)
		}
	})
	return srv
}

// logLines counts the lines of a Dovecot log that hold s.
func logLines(srv *dovecot.Server, s string) int {
	return strings.Count(srv.Log(), s)
}

// waitLogLines waits until srv's log has at least want lines holding s and
// returns the count (Dovecot's log process writes a little later).
func waitLogLines(srv *dovecot.Server, s string, want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := logLines(srv, s)
		if got >= want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loginLine is how Dovecot logs a successful login.
func loginLine(user, method string) string {
	return "Login: user=<" + user + ">, method=" + method + ","
}

// logUsers returns the user names of every login and failed login attempt
// in a Dovecot log.
func logUsers(srv *dovecot.Server) []string {
	var users []string
	for _, m := range regexp.MustCompile(`user=<([^>]*)>`).FindAllStringSubmatch(srv.Log(), -1) {
		if m[1] != "" && !slices.Contains(users, m[1]) { // "": connections without a login
			users = append(users, m[1])
		}
	}
	slices.Sort(users)
	return users
}

// directSTAT logs in to Dovecot itself and returns its STAT reply.
func directSTAT(t *testing.T, srv *dovecot.Server, user, pass string) string {
	t.Helper()
	c := dialPOP3(t, srv.POP3Addr, nil)
	c.login(user, pass)
	stat := c.ok("STAT")
	c.quit()
	return stat
}

// --- Caddy -------------------------------------------------------------------

// caddyfileFor wraps layer4 servers in the global options of a test Caddy;
// withTLS adds the local CA and a certificate for localhost.
func caddyfileFor(withTLS bool, servers string) string {
	tlsOpts := ""
	if withTLS {
		tlsOpts = "\tlocal_certs\n\tskip_install_trust\n\ttls_automate_names localhost\n"
	}
	return "{\n\tadmin off\n\tlog {\n\t\tlevel DEBUG\n\t}\n" + tlsOpts + "\tlayer4 {\n" + servers + "\t}\n}\n"
}

func freePortT(t *testing.T) string {
	t.Helper()
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// waitSTLS returns once STLS on addr completes a verified handshake: the
// certificate for localhost may come a little after the listener.
func waitSTLS(t *testing.T, p *caddyProc, addr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := func() error {
			cfg, err := p.tlsConfig()
			if err != nil {
				return err
			}
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 512)
			if _, err := conn.Read(buf); err != nil {
				return err
			}
			if _, err := conn.Write([]byte("STLS\r\n")); err != nil {
				return err
			}
			n, err := conn.Read(buf)
			if err != nil {
				return err
			}
			if !bytes.HasPrefix(buf[:n], []byte("+OK")) {
				return fmt.Errorf("STLS: %q", buf[:n])
			}
			return tls.Client(conn, cfg).Handshake()
		}()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("STLS on %s did not work within 30s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// noCaddyErrors fails the test for any ERROR entry in p's log.
func noCaddyErrors(t *testing.T, p *caddyProc) {
	t.Helper()
	for _, e := range caddyEntries(p.log()) {
		if e["level"] == "error" {
			t.Errorf("caddy %s logged an ERROR: %v", p.name, e)
		}
	}
}

// waitCaddyEntries waits until p's log has at least n entries matching
// match and returns them.
func waitCaddyEntries(p *caddyProc, n int, match func(map[string]any) bool) []map[string]any {
	deadline := time.Now().Add(5 * time.Second)
	for {
		var got []map[string]any
		for _, e := range caddyEntries(p.log()) {
			if match(e) {
				got = append(got, e)
			}
		}
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// --- 1. Challenges relayed from Dovecot, no auth server ---------------------

// TestChallengeRelay runs `auth plain apop cram-md5` without auth_http in
// front of a Dovecot that offers APOP and CRAM-MD5: the proxy's greeting
// carries Dovecot's own timestamp and AUTH CRAM-MD5 Dovecot's own
// challenge, so digests made over them log in on the upstream connection
// dialled at accept. Wrong digests, a replayed digest, a stale challenge
// and a cancel all fail, and the session goes on to log in.
func TestChallengeRelay(t *testing.T) {
	need(t)
	dc := startTestDovecot(t, "challenge", []dovecot.User{{Name: alice, Password: alicePass, Messages: env.aliceMsgs}}, challengeMechs)
	addr, plainOnly := freePortT(t), freePortT(t)
	p := startCaddy(t, "challenge-relay", caddyfileFor(false, fmt.Sprintf(`		%[1]s {
			route {
				pop3 %[2]s {
					auth plain apop cram-md5
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
		# the shared Dovecot offers neither APOP nor CRAM-MD5
		%[3]s {
			route {
				pop3 %[4]s {
					auth plain apop cram-md5
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
`, addr, dc.POP3Addr, plainOnly, env.dc.POP3Addr)), listener{addr: addr}, listener{addr: plainOnly})
	usedSecret(alice, alicePass)
	usedSecret(alice, wrongPass)

	// Dovecot itself: its greeting timestamp, its replies and its STAT.
	d := dialPOP3(t, dc.POP3Addr, nil)
	directStamp := greetingTimestamp(t, d.greeting)
	directBad := d.cmd("APOP " + alice + " " + apopDigest(directStamp, wrongPass))
	directGood := d.cmd("APOP " + alice + " " + apopDigest(directStamp, alicePass))
	directStat := d.ok("STAT")
	d.quit()
	if !strings.HasPrefix(directBad, "-ERR [AUTH]") || !strings.HasPrefix(directGood, "+OK") {
		t.Fatalf("Dovecot's own APOP: wrong digest %q, right digest %q", directBad, directGood)
	}
	if !dovecotAPOPStamp.MatchString(directStamp) {
		t.Fatalf("Dovecot's greeting %q: its timestamp has an unexpected shape", d.greeting)
	}

	t.Run("greeting-and-capa", func(t *testing.T) {
		c1, c2 := dialPOP3(t, addr, nil), dialPOP3(t, addr, nil)
		s1, s2 := greetingTimestamp(t, c1.greeting), greetingTimestamp(t, c2.greeting)
		if !strings.HasPrefix(c1.greeting, "+OK POP3 ready <") {
			t.Errorf("greeting %q", c1.greeting)
		}
		if s1 == s2 {
			t.Errorf("two sessions got the same timestamp %q", s1)
		}
		for _, s := range []string{s1, s2} {
			if !dovecotAPOPStamp.MatchString(s) {
				t.Errorf("timestamp %q does not look like Dovecot's %q", s, directStamp)
			}
		}
		c1.ok("CAPA")
		if caps := c1.multi(); !slices.Contains(caps, "SASL PLAIN LOGIN CRAM-MD5") || !slices.Contains(caps, "USER") {
			t.Errorf("CAPA %q, want USER and SASL PLAIN LOGIN CRAM-MD5", caps)
		}
		c1.ok("AUTH")
		if mechs := c1.multi(); !slices.Equal(mechs, []string{"PLAIN", "LOGIN", "CRAM-MD5"}) {
			t.Errorf("AUTH list %q", mechs)
		}
		c1.quit()
		c2.quit()
	})

	t.Run("upstream-without-challenges", func(t *testing.T) {
		// What the upstream cannot do is neither offered nor accepted.
		c := dialPOP3(t, plainOnly, nil)
		if c.greeting != "+OK POP3 ready" {
			t.Errorf("greeting %q, want no timestamp", c.greeting)
		}
		c.ok("CAPA")
		if caps := c.multi(); !slices.Contains(caps, "SASL PLAIN LOGIN") {
			t.Errorf("CAPA %q, want SASL PLAIN LOGIN", caps)
		}
		digest := apopDigest("<1.2@x>", alicePass)
		usedSecretValue(digest, "APOP digest of alice's password over a made-up timestamp")
		if got := c.cmd("APOP " + alice + " " + digest); got != "-ERR APOP is not enabled" {
			t.Errorf("APOP: %q", got)
		}
		if got := c.cmd("AUTH CRAM-MD5"); got != "-ERR Unsupported authentication mechanism" {
			t.Errorf("AUTH CRAM-MD5: %q", got)
		}
		c.login(alice, alicePass)
		c.ok("STAT")
		c.quit()
	})

	t.Run("APOP", func(t *testing.T) {
		before := logLines(dc, loginLine(alice, "APOP"))
		other := dialPOP3(t, addr, nil) // its timestamp makes a replayed digest
		otherStamp := greetingTimestamp(t, other.greeting)
		c := dialPOP3(t, addr, nil)
		stamp := greetingTimestamp(t, c.greeting)
		bad, replay, good := apopDigest(stamp, wrongPass), apopDigest(otherStamp, alicePass), apopDigest(stamp, alicePass)
		usedSecretValue(bad, "APOP digest of a wrong password")
		usedSecretValue(replay, "APOP digest of alice's password over another session's timestamp")
		usedSecretValue(good, "APOP digest of alice's password")
		start := time.Now()
		if got := c.cmd("APOP " + alice + " " + bad); sansID(got) != replyAuthFailed {
			t.Errorf("wrong password: got %q, want %q (Dovecot said %q)", got, replyAuthFailed, directBad)
		}
		t.Logf("a wrong APOP digest was refused after %v", time.Since(start).Round(time.Millisecond))
		if got := c.cmd("APOP " + alice + " " + replay); sansID(got) != replyAuthFailed {
			t.Errorf("digest over another session's timestamp: got %q, want %q", got, replyAuthFailed)
		}
		if got := c.cmd("APOP " + alice + " " + good); got != directGood {
			t.Fatalf("right digest: got %q, want Dovecot's %q", got, directGood)
		}
		if got := c.cmd("STAT"); got != directStat {
			t.Errorf("STAT %q, want %q", got, directStat)
		}
		compareRetr(t, c, 2, env.aliceMsgs[1])
		c.quit()
		other.quit()
		if got := waitLogLines(dc, loginLine(alice, "APOP"), before+1); got != before+1 {
			t.Errorf("Dovecot logged %d APOP logins of alice, want 1", got-before)
		}
	})

	t.Run("CRAM-MD5", func(t *testing.T) {
		before := logLines(dc, loginLine(alice, "CRAM-MD5"))
		d := dialPOP3(t, dc.POP3Addr, nil)
		directChallenge := saslChallenge(t, d.cmd("AUTH CRAM-MD5"))
		directCRAM := d.cmd(cramResponse(alice, alicePass, directChallenge))
		if !dovecotChallenge.MatchString(directChallenge) || !strings.HasPrefix(directCRAM, "+OK") {
			t.Fatalf("Dovecot's own CRAM-MD5: challenge %q, login %q", directChallenge, directCRAM)
		}
		d.quit()

		c := dialPOP3(t, addr, nil)
		ch1 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		if got := c.cmd("*"); sansID(got) != replyCancelled {
			t.Errorf("cancel: got %q, want %q", got, replyCancelled)
		}
		ch2 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		if got := c.cmd(cramResponse(alice, wrongPass, ch2)); sansID(got) != replyAuthFailed {
			t.Errorf("wrong password: got %q, want %q", got, replyAuthFailed)
		}
		ch3 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		if got := c.cmd(cramResponse(alice, alicePass, ch2)); sansID(got) != replyAuthFailed {
			t.Errorf("right password over the previous challenge: got %q, want %q", got, replyAuthFailed)
		}
		ch4 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		if got := c.cmd(cramResponse(alice, alicePass, ch4)); got != directCRAM {
			t.Fatalf("right password: got %q, want Dovecot's %q", got, directCRAM)
		}
		if got := c.cmd("STAT"); got != directStat {
			t.Errorf("STAT %q, want %q", got, directStat)
		}
		c.quit()
		chs := []string{ch1, ch2, ch3, ch4}
		for i, ch := range chs {
			if !dovecotChallenge.MatchString(ch) {
				t.Errorf("challenge %q does not look like Dovecot's %q", ch, directChallenge)
			}
			if slices.Index(chs, ch) != i {
				t.Errorf("challenge %q came twice", ch)
			}
		}
		if got := waitLogLines(dc, loginLine(alice, "CRAM-MD5"), before+2); got != before+2 {
			t.Errorf("Dovecot logged %d CRAM-MD5 logins of alice, want 2 (direct and proxied)", got-before)
		}
	})

	t.Run("curl", func(t *testing.T) {
		ca := dc.CACertFile // unused over plaintext; curlPOP3 wants one
		for _, tc := range []struct{ option, upstreamMethod string }{
			{"AUTH=+APOP", "APOP"},
			{"AUTH=CRAM-MD5", "CRAM-MD5"},
			{"AUTH=PLAIN", "PLAIN"},
			{"AUTH=LOGIN", "PLAIN"}, // the proxy logs in upstream with AUTH PLAIN
		} {
			t.Run(tc.option, func(t *testing.T) {
				fetch := func(hostport, path string) []byte {
					out, stderr, err := curlPOP3(t, "pop3://localhost:"+port(hostport)+path, ca, alice, alicePass, "--login-options", tc.option)
					if err != nil {
						t.Fatalf("curl %s %s: %v\n%s", hostport, path, err, stderr)
					}
					return out
				}
				want := fetch(dc.POP3Addr, "/2")
				if !bytes.Equal(want, env.aliceMsgs[1]) {
					t.Fatalf("direct RETR 2 differs from the stored message: %q", want)
				}
				before := logLines(dc, loginLine(alice, tc.upstreamMethod))
				if got := fetch(addr, "/2"); !bytes.Equal(got, want) {
					t.Errorf("RETR 2 through the proxy: got %q, want Dovecot's %q", got, want)
				}
				if got := fetch(addr, "/"); !bytes.HasPrefix(got, []byte("1 ")) || bytes.Count(got, []byte("\n")) != len(env.aliceMsgs) {
					t.Errorf("LIST through the proxy: %q", got)
				}
				if got := waitLogLines(dc, loginLine(alice, tc.upstreamMethod), before+2); got != before+2 {
					t.Errorf("Dovecot logged %d logins with method=%s for 2 proxied curl runs", got-before, tc.upstreamMethod)
				}
			})
		}
	})

	t.Run("poplib-apop", func(t *testing.T) {
		const script = `
import hashlib, os, poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=30)
p.apop(os.environ["POP3_USER"], os.environ["POP3_PASS"])
count, size = p.stat()
resp, lines, octets = p.retr(int(sys.argv[3]))
data = b"".join(l + b"\r\n" for l in lines)
print(hashlib.sha256(data).hexdigest(), len(data), count, size)
p.quit()
`
		before := logLines(dc, loginLine(alice, "APOP"))
		var outs []string
		for _, a := range []string{dc.POP3Addr, addr} {
			out, stderr, err := run(t, []string{"POP3_USER=" + alice, "POP3_PASS=" + alicePass}, "python3", "-c", script, "127.0.0.1", port(a), "2")
			if err != nil {
				t.Fatalf("poplib apop against %s: %v\n%s", a, err, stderr)
			}
			outs = append(outs, strings.TrimSpace(string(out)))
		}
		sum := sha256.Sum256(env.aliceMsgs[1])
		if !strings.HasPrefix(outs[0], hex.EncodeToString(sum[:])+" ") {
			t.Errorf("direct: %q, want the stored message", outs[0])
		}
		if outs[1] != outs[0] {
			t.Errorf("through the proxy %q, directly %q", outs[1], outs[0])
		}
		if got := waitLogLines(dc, loginLine(alice, "APOP"), before+2); got != before+2 {
			t.Errorf("Dovecot logged %d APOP logins for 2 poplib runs", got-before)
		}
	})

	if got := waitCaddyEntries(p, 1, func(e map[string]any) bool { return e["msg"] == "login" && e["method"] == "apop" }); len(got) == 0 {
		t.Errorf("no login entry with method apop in Caddy's log")
	}
	noCaddyErrors(t, p)
}

// --- 2. auth_http in front of two Dovecot instances -------------------------

// switchableAuth stands on a fixed port between Caddy and the fake auth
// server: down (nothing listens), hang (accepts and never answers) or up
// (forwards the bytes).
type switchableAuth struct {
	t      *testing.T
	addr   string
	target string

	mu    sync.Mutex
	ln    net.Listener
	hang  bool
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

func newSwitchableAuth(t *testing.T, target string) *switchableAuth {
	s := &switchableAuth{t: t, addr: freePortT(t), target: target, conns: map[net.Conn]bool{}}
	t.Cleanup(func() {
		s.set("down")
		s.wg.Wait()
	})
	return s
}

func (s *switchableAuth) set(mode string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
	clear(s.conns)
	s.hang = mode == "hang"
	if mode == "down" {
		if s.ln != nil {
			s.ln.Close()
			s.ln = nil
		}
		return
	}
	if s.ln != nil {
		return
	}
	var err error
	for i := 0; i < 50; i++ { // the port was ours a moment ago
		if s.ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Errorf("listening again on %s: %v", s.addr, err)
		return
	}
	s.wg.Add(1)
	go s.serve(s.ln)
}

func (s *switchableAuth) serve(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = true
		hang := s.hang
		s.mu.Unlock()
		if hang {
			continue // held open until the next set
		}
		up, err := net.Dial("tcp", s.target)
		if err != nil {
			c.Close()
			continue
		}
		s.mu.Lock()
		s.conns[up] = true
		s.mu.Unlock()
		s.wg.Add(2)
		go func() { defer s.wg.Done(); _, _ = io.Copy(up, c); up.Close() }()
		go func() { defer s.wg.Done(); _, _ = io.Copy(c, up); c.Close() }()
	}
}

// clientCertificates makes a CA (written to dir/ca.pem for Caddy's
// trust_pool), a client certificate for alice signed by it, and a
// self-signed one nobody trusts.
func clientCertificates(t *testing.T, dir string) (caFile string, good, untrusted tls.Certificate) {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	serial := func() *mathbig.Int {
		n, err := rand.Int(rand.Reader, new(mathbig.Int).Lsh(mathbig.NewInt(1), 100))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	create := func(tmpl, parent *x509.Certificate, pub, priv any) *x509.Certificate {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, priv)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	caKey := newKey()
	caTmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "caddy-pop3 integration client CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	ca := create(caTmpl, caTmpl, &caKey.PublicKey, caKey)
	leaf := func(parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string) tls.Certificate {
		key := newKey()
		tmpl := &x509.Certificate{
			SerialNumber: serial(), Subject: pkix.Name{CommonName: cn, Organization: []string{"caddy-pop3 integration"}},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		c := create(tmpl, parent, &key.PublicKey, parentKey)
		return tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key, Leaf: c}
	}
	good = leaf(ca, caKey, alice)
	untrusted = leaf(nil, nil, alice)
	caFile = filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile, good, untrusted
}

// randomToken is an OAuth-style token of n base64url characters.
func randomToken(t *testing.T, n int) string {
	b := make([]byte, n*3/4+3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)[:n]
}

// TestAuthHTTP runs a Caddy whose pop3 handlers have no upstream of their
// own: an NGINX-style auth server in this process decides each login and
// names the Dovecot for it.
func TestAuthHTTP(t *testing.T) {
	need(t)
	bobMsgs := [][]byte{mkMessage("for bob", "Hello Bob.\r\n")}
	carolMsgs := [][]byte{mkMessage("for carol", "Hello Carol.\r\n"), mkMessage("again", "Twice.\r\n")}
	dcA := startTestDovecot(t, "A", []dovecot.User{
		{Name: alice, Password: alicePass, Messages: env.aliceMsgs},
		{Name: carolMailbox, Password: carolMailboxPass, Messages: carolMsgs},
	}, "")
	dcB := startTestDovecot(t, "B", []dovecot.User{{Name: bob, Messages: bobMsgs}}, "")

	token := randomToken(t, 20<<10)
	authKey := "auth-key-" + randomToken(t, 24)
	for _, s := range []struct{ user, pass string }{{alice, alicePass}, {alice, wrongPass}, {bob, bobPass}, {carol, carolPass}, {carolMailbox, carolMailboxPass}} {
		usedSecret(s.user, s.pass)
	}
	usedSecretValue(token, "OAuth token")
	usedSecretValue(token[:40], "start of the OAuth token")
	usedSecretValue(authKey, "X-Auth-Key header value")

	dir := t.TempDir()
	caFile, clientCert, untrustedCert := clientCertificates(t, dir)
	const certSubject = "CN=alice,O=caddy-pop3 integration"
	users := map[string]pop3test.AuthUser{
		alice:     {Password: alicePass, Server: dcA.POP3Addr, CertSubject: certSubject},
		bob:       {Password: bobPass, Server: dcB.POP3Addr},
		carol:     {Password: carolPass, Server: dcA.POP3Addr, RewriteUser: carolMailbox, RewritePass: carolMailboxPass},
		tokenUser: {Password: token, Server: dcA.POP3Addr, RewriteUser: alice, RewritePass: alicePass},
	}
	as := &pop3test.AuthServer{Users: users, NoWait: true}
	asURL := as.Start(t)
	waitAS := &pop3test.AuthServer{Users: users, Wait: time.Second}
	waitURL := waitAS.Start(t)
	u, _ := url.Parse(asURL)
	flaky := newSwitchableAuth(t, u.Host)

	main, wait, flakyL, ext := freePortT(t), freePortT(t), freePortT(t), freePortT(t)
	t.Setenv("POP3_TEST_AUTH_KEY", authKey) // Caddy inherits it; the config has only the placeholder
	cf := caddyfileFor(true, fmt.Sprintf(`		# every method; STLS offered, plaintext allowed
		%[1]s {
			route {
				pop3 {
					auth plain apop cram-md5 oauthbearer xoauth2
					auth_http %[5]s {
						header X-Auth-Key {env.POP3_TEST_AUTH_KEY}
						timeout 5s
					}
					starttls on
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
		# an auth server that refuses with Auth-Wait: 1
		%[2]s {
			route {
				pop3 {
					auth_http %[6]s
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
		# an auth server that goes down and comes back
		%[3]s {
			route {
				pop3 {
					auth_http http://%[7]s/auth {
						timeout 1s
					}
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
		# EXTERNAL: STLS with a client certificate
		%[4]s {
			route {
				pop3 {
					auth external
					auth_http %[5]s {
						pass_client_cert on
					}
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
						client_auth {
							mode require_and_verify
							trust_pool file %[8]s
						}
					}
				}
			}
		}
`, main, wait, flakyL, ext, asURL, waitURL, flaky.addr, caFile))
	flaky.set("down")
	p := startCaddy(t, "auth-http", cf, listener{addr: main}, listener{addr: wait}, listener{addr: flakyL}, listener{addr: ext})
	waitSTLS(t, p, main)
	cfg := func() *tls.Config {
		c, err := p.tlsConfig()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	aliceStat := directSTAT(t, dcA, alice, alicePass)
	bobStat := directSTAT(t, dcB, bob, bobPass)
	carolStat := directSTAT(t, dcA, carolMailbox, carolMailboxPass)
	if aliceStat == bobStat || aliceStat == carolStat {
		t.Fatalf("mailboxes must differ: alice %q, bob %q, carol's %q", aliceStat, bobStat, carolStat)
	}

	// last returns the auth server's newest request and checks the fields
	// every request has.
	last := func(t *testing.T, as *pop3test.AuthServer) pop3test.AuthRequest {
		t.Helper()
		r := as.Last(t)
		if r.RequestLine != "GET /auth HTTP/1.1" || r.Value("Auth-Protocol") != "pop3" || r.Value("Client-IP") != "127.0.0.1" {
			t.Errorf("request %q, Auth-Protocol %q, Client-IP %q", r.RequestLine, r.Value("Auth-Protocol"), r.Value("Client-IP"))
		}
		return r
	}
	checkFields := func(t *testing.T, r pop3test.AuthRequest, want map[string]string) {
		t.Helper()
		for _, name := range sortedKeys(want) {
			if got, ok := r.Get(name); !ok || got != want[name] {
				t.Errorf("%s: got %q (sent: %v), want %q", name, got, ok, want[name])
			}
		}
	}

	t.Run("per-user-routing", func(t *testing.T) {
		n := len(as.Requests())
		c := dialPOP3(t, main, nil)
		if got := loginMethods[0].login(c, alice, wrongPass); sansID(got) != replyAuthRefused {
			t.Errorf("wrong password: got %q, want %q", got, replyAuthRefused)
		}
		if got := loginMethods[0].login(c, alice, alicePass); got != "+OK Logged in." {
			t.Fatalf("alice: %q", got)
		}
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("alice's STAT %q, want Dovecot A's %q", got, aliceStat)
		}
		c.quit()
		c = dialPOP3(t, main, nil)
		if got := loginMethods[5].login(c, bob, bobPass); got != "+OK Logged in." { // AUTH LOGIN
			t.Fatalf("bob: %q", got)
		}
		if got := c.cmd("STAT"); got != bobStat {
			t.Errorf("bob's STAT %q, want Dovecot B's %q", got, bobStat)
		}
		compareRetr(t, c, 1, bobMsgs[0])
		c.quit()

		reqs := as.Requests()[n:]
		if len(reqs) != 3 {
			t.Fatalf("auth server got %d requests, want 3", len(reqs))
		}
		for i, want := range []struct{ user, attempt string }{{alice, "1"}, {alice, "2"}, {bob, "1"}} {
			checkFields(t, reqs[i], map[string]string{"Auth-Method": "plain", "Auth-User": want.user, "Auth-Login-Attempt": want.attempt})
			for _, name := range []string{"Auth-Salt", "Auth-SSL", "Auth-SSL-Verify"} {
				if _, ok := reqs[i].Get(name); ok {
					t.Errorf("request %d: %s sent for a plaintext plain login", i+1, name)
				}
			}
		}
		waitLogLines(dcA, loginLine(alice, "PLAIN"), 2)
		waitLogLines(dcB, loginLine(bob, "PLAIN"), 2)
		if got := logUsers(dcA); !slices.Equal(got, []string{alice, carolMailbox}) {
			t.Errorf("Dovecot A saw users %q, want alice and carol's mailbox only", got)
		}
		if got := logUsers(dcB); !slices.Equal(got, []string{bob}) {
			t.Errorf("Dovecot B saw users %q, want bob only", got)
		}
		// The refused password never reached Dovecot.
		if n := logLines(dcA, "auth failed"); n != 0 {
			t.Errorf("Dovecot A logged %d failed logins", n)
		}
	})

	t.Run("rewrite-credentials", func(t *testing.T) {
		before := logLines(dcA, loginLine(carolMailbox, "PLAIN"))
		c := dialPOP3(t, main, nil)
		c.login(carol, carolPass)
		if got := c.cmd("STAT"); got != carolStat {
			t.Errorf("STAT %q, want that of %s's mailbox %q", got, carolMailbox, carolStat)
		}
		compareRetr(t, c, 2, carolMsgs[1])
		c.quit()
		checkFields(t, last(t, as), map[string]string{"Auth-User": carol, "Auth-Pass": carolPass})
		if got := waitLogLines(dcA, loginLine(carolMailbox, "PLAIN"), before+1); got != before+1 {
			t.Errorf("Dovecot A logged %d logins of %s, want 1", got-before, carolMailbox)
		}
		for _, dc := range []*dovecot.Server{dcA, dcB} {
			if strings.Contains(dc.Log(), "<"+carol+">") {
				t.Errorf("a Dovecot saw the client's user name %q", carol)
			}
		}
	})

	t.Run("APOP", func(t *testing.T) {
		c := dialPOP3(t, main, nil)
		stamp := greetingTimestamp(t, c.greeting)
		if dovecotAPOPStamp.MatchString(stamp) {
			t.Errorf("timestamp %q looks like Dovecot's: with auth_http the proxy makes its own", stamp)
		}
		bad, good := apopDigest(stamp, wrongPass), apopDigest(stamp, alicePass)
		usedSecretValue(bad, "APOP digest of a wrong password")
		usedSecretValue(good, "APOP digest of alice's password")
		if got := c.cmd("APOP " + alice + " " + bad); sansID(got) != replyAuthRefused {
			t.Errorf("wrong digest: got %q, want %q", got, replyAuthRefused)
		}
		checkFields(t, last(t, as), map[string]string{"Auth-Method": "apop", "Auth-User": alice, "Auth-Pass": bad, "Auth-Salt": stamp, "Auth-Login-Attempt": "1"})
		if got := c.cmd("APOP " + alice + " " + good); got != "+OK Logged in." {
			t.Fatalf("right digest: %q", got)
		}
		checkFields(t, last(t, as), map[string]string{"Auth-Method": "apop", "Auth-Pass": good, "Auth-Salt": stamp, "Auth-Login-Attempt": "2"})
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("STAT %q, want %q", got, aliceStat)
		}
		c.quit()
	})

	t.Run("CRAM-MD5", func(t *testing.T) {
		c := dialPOP3(t, main, nil)
		c.ok("CAPA")
		if caps := c.multi(); !slices.Contains(caps, "SASL PLAIN LOGIN CRAM-MD5 OAUTHBEARER XOAUTH2") {
			t.Errorf("CAPA %q", caps)
		}
		ch1 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		bad := cramResponse(alice, wrongPass, ch1)
		if got := c.cmd(bad); sansID(got) != replyAuthRefused {
			t.Errorf("wrong password: got %q, want %q", got, replyAuthRefused)
		}
		r := last(t, as)
		checkFields(t, r, map[string]string{"Auth-Method": "cram-md5", "Auth-User": alice, "Auth-Salt": ch1})
		ch2 := saslChallenge(t, c.cmd("AUTH CRAM-MD5"))
		if ch1 == ch2 || !timestampRE.MatchString(ch1) {
			t.Errorf("challenges %q and %q: want two fresh msg-ids", ch1, ch2)
		}
		good := cramResponse(alice, alicePass, ch2)
		if got := c.cmd(good); got != "+OK Logged in." {
			t.Fatalf("right password: %q", got)
		}
		digest, _ := base64.StdEncoding.DecodeString(good)
		checkFields(t, last(t, as), map[string]string{"Auth-Method": "cram-md5", "Auth-Salt": ch2, "Auth-Pass": strings.Fields(string(digest))[1], "Auth-Login-Attempt": "2"})
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("STAT %q, want %q", got, aliceStat)
		}
		c.quit()
	})

	// A refused token gets the RFC 7628 error challenge first; the client
	// answers it with a dummy response (0x01 for OAUTHBEARER, an empty line
	// as XOAUTH2 clients send) and then gets the -ERR.
	for _, tc := range []struct{ mech, method, ir, dummy string }{
		{"OAUTHBEARER", "oauthbearer", "n,a=" + tokenUser + ",\x01auth=Bearer " + token + "\x01\x01", b64("\x01")},
		{"XOAUTH2", "xoauth2", "user=" + tokenUser + "\x01auth=Bearer " + token + "\x01\x01", ""},
	} {
		t.Run(tc.mech, func(t *testing.T) {
			wrong := strings.Replace(tc.ir, token, token[:len(token)-1]+"!", 1)
			usedSecretValue(b64(tc.ir), tc.mech+" initial response")
			usedSecretValue(b64(wrong), tc.mech+" initial response with a wrong token")
			if len(b64(tc.ir)) < 27000 {
				t.Fatalf("the AUTH line is only %d bytes", len(b64(tc.ir)))
			}
			before := logLines(dcA, loginLine(alice, "PLAIN"))
			c := dialPOP3(t, main, nil)
			if got, want := c.cmd("AUTH "+tc.mech+" "+b64(wrong)), "+ "+b64(`{"status":"invalid_token"}`); got != want {
				t.Fatalf("wrong token: got %q, want the error challenge %q", got, want)
			}
			if got := c.cmd(tc.dummy); sansID(got) != replyAuthRefused {
				t.Errorf("wrong token, after the error challenge: got %q, want %q", got, replyAuthRefused)
			}
			// The right token as a continuation line.
			if got := c.cmd("AUTH " + tc.mech); got != "+ " && got != "+" {
				t.Fatalf("AUTH %s: got %q, want an empty challenge", tc.mech, got)
			}
			if got := c.cmd(b64(tc.ir)); got != "+OK Logged in." {
				t.Fatalf("right token: %q", got)
			}
			checkFields(t, last(t, as), map[string]string{"Auth-Method": tc.method, "Auth-User": tokenUser, "Auth-Pass": token, "Auth-Login-Attempt": "2"})
			if got := c.cmd("STAT"); got != aliceStat {
				t.Errorf("STAT %q, want alice's %q", got, aliceStat)
			}
			c.quit()
			if got := waitLogLines(dcA, loginLine(alice, "PLAIN"), before+1); got != before+1 {
				t.Errorf("Dovecot A logged %d logins of alice, want 1", got-before)
			}
		})
	}

	t.Run("Auth-Wait", func(t *testing.T) {
		c := dialPOP3(t, wait, nil)
		c.ok("USER " + alice)
		start := time.Now()
		got := c.cmd("PASS " + wrongPass)
		took := time.Since(start)
		if sansID(got) != replyAuthRefused {
			t.Errorf("wrong password: got %q, want %q", got, replyAuthRefused)
		}
		if took < time.Second || took > 3*time.Second {
			t.Errorf("refusal with Auth-Wait: 1 answered after %v, want 1s to 3s", took)
		}
		if w := last(t, waitAS); w.Value("Auth-User") != alice {
			t.Errorf("Auth-User %q", w.Value("Auth-User"))
		}
		c.login(alice, alicePass) // the session goes on
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("STAT %q, want %q", got, aliceStat)
		}
		c.quit()
	})

	t.Run("auth-server-down", func(t *testing.T) {
		c := dialPOP3(t, flakyL, nil)
		for _, mode := range []string{"down", "hang"} {
			flaky.set(mode)
			start := time.Now()
			if got := loginMethods[1].login(c, alice, alicePass); sansID(got) != replyAuthDown {
				t.Errorf("auth server %s: got %q, want %q", mode, got, replyAuthDown)
			}
			took := time.Since(start)
			if mode == "hang" && (took < time.Second || took > 3*time.Second) {
				t.Errorf("auth server hanging: answered after %v, want about the 1s timeout", took)
			}
			if mode == "down" && took > time.Second {
				t.Errorf("auth server down: answered after %v", took)
			}
			c.ok("NOOP")
		}
		flaky.set("up")
		if got := loginMethods[1].login(c, alice, alicePass); got != "+OK Logged in." {
			t.Fatalf("auth server back: %q", got)
		}
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("STAT %q, want %q", got, aliceStat)
		}
		c.quit()
		// A new session works as well, and each outage was logged as a
		// warning.
		c = dialPOP3(t, flakyL, nil)
		c.login(alice, alicePass)
		c.quit()
		warns := waitCaddyEntries(p, 2, func(e map[string]any) bool { return e["msg"] == "auth server unavailable" })
		if len(warns) != 2 {
			t.Errorf("%d \"auth server unavailable\" entries, want 2", len(warns))
		}
		for _, e := range warns {
			if e["level"] != "warn" || e["user"] != alice {
				t.Errorf("entry %v: want level warn and the user", e)
			}
		}
	})

	t.Run("headers-over-STLS", func(t *testing.T) {
		n := len(as.Requests())
		c := dialPOP3(t, main, nil)
		st := c.stls(cfg())
		c.login(bob, bobPass)
		if got := c.cmd("STAT"); got != bobStat {
			t.Errorf("STAT %q, want %q", got, bobStat)
		}
		c.quit()
		reqs := as.Requests()[n:]
		if len(reqs) != 1 {
			t.Fatalf("auth server got %d requests, want 1", len(reqs))
		}
		r := reqs[0]
		host, _ := url.Parse(asURL)
		want := map[string]string{
			"Host":               host.Host,
			"Auth-Method":        "plain",
			"Auth-User":          bob,
			"Auth-Pass":          "p@ss%20wörd:%25",
			"Auth-Protocol":      "pop3",
			"Auth-Login-Attempt": "1",
			"Client-IP":          "127.0.0.1",
			"Client-Port":        strings.Split(c.tcp.LocalAddr().String(), ":")[1],
			"Server-IP":          "127.0.0.1",
			"Server-Port":        strings.Split(main, ":")[1],
			"Auth-SSL":           "on",
			"Auth-SSL-Protocol":  map[uint16]string{tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3"}[st.Version],
			"Auth-SSL-Cipher":    tls.CipherSuiteName(st.CipherSuite),
			"X-Auth-Key":         authKey,
		}
		checkFields(t, r, want)
		names := r.Names()
		slices.Sort(names)
		if wantNames := sortedKeys(want); !slices.Equal(names, wantNames) {
			t.Errorf("fields sent %q, want exactly %q", names, wantNames)
		}
		if r.RequestLine != "GET /auth HTTP/1.1" {
			t.Errorf("request line %q", r.RequestLine)
		}
	})

	t.Run("EXTERNAL-client-certificate", func(t *testing.T) {
		n := len(as.Requests())
		c := dialPOP3(t, ext, nil)
		c.ok("CAPA")
		if caps := c.multi(); slices.ContainsFunc(caps, func(s string) bool { return strings.HasPrefix(s, "SASL") }) {
			t.Errorf("CAPA before TLS %q lists SASL", caps)
		}
		tcfg := cfg()
		tcfg.Certificates = []tls.Certificate{clientCert}
		c.stls(tcfg)
		c.ok("CAPA")
		if caps := c.multi(); !slices.Contains(caps, "SASL EXTERNAL") || slices.Contains(caps, "USER") {
			t.Errorf("CAPA after TLS with a certificate %q, want SASL EXTERNAL and no USER", caps)
		}
		if got := c.cmd("USER " + alice); got != "-ERR USER/PASS is not enabled" {
			t.Errorf("USER: %q", got)
		}
		if got := c.cmd("AUTH EXTERNAL " + b64(alice)); got != "+OK Logged in." {
			t.Fatalf("AUTH EXTERNAL: %q", got)
		}
		if got := c.cmd("STAT"); got != aliceStat {
			t.Errorf("STAT %q, want %q", got, aliceStat)
		}
		c.quit()
		reqs := as.Requests()[n:]
		if len(reqs) != 1 {
			t.Fatalf("auth server got %d requests, want 1", len(reqs))
		}
		r := reqs[0]
		leaf := clientCert.Leaf
		fp := sha1.Sum(leaf.Raw)
		checkFields(t, r, map[string]string{
			"Auth-Method":          "external",
			"Auth-User":            alice,
			"Auth-Pass":            "",
			"Auth-SSL":             "on",
			"Auth-SSL-Verify":      "SUCCESS",
			"Auth-SSL-Subject":     certSubject,
			"Auth-SSL-Issuer":      "CN=caddy-pop3 integration client CA",
			"Auth-SSL-Serial":      strings.ToUpper(hex.EncodeToString(leaf.SerialNumber.Bytes())),
			"Auth-SSL-Fingerprint": hex.EncodeToString(fp[:]),
		})
		certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
		if got, err := url.PathUnescape(r.Value("Auth-SSL-Cert")); err != nil || got != string(certPEM) || strings.ContainsAny(r.Value("Auth-SSL-Cert"), "\n ") {
			t.Errorf("Auth-SSL-Cert %q (%v), want the escaped PEM of the client certificate", r.Value("Auth-SSL-Cert"), err)
		}
		if _, ok := r.Get("X-Auth-Key"); ok {
			t.Errorf("X-Auth-Key sent by a handler that does not configure it")
		}

		// A certificate from another CA fails the handshake.
		for name, certs := range map[string][]tls.Certificate{"untrusted": {untrustedCert}, "none": nil} {
			c := dialPOP3(t, ext, nil)
			c.ok("STLS")
			tcfg := cfg()
			tcfg.Certificates = certs
			tc := tls.Client(c.conn, tcfg)
			err := tc.Handshake()
			if err == nil {
				// TLS 1.3: the server's verdict comes after the client's Finished.
				_, _ = tc.Write([]byte("CAPA\r\n"))
				_ = tc.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = tc.Read(make([]byte, 64))
			}
			if err == nil {
				t.Errorf("client certificate %s: the session went on", name)
			}
		}
		if len(as.Requests()) != n+1 {
			t.Errorf("auth server asked about a client without a trusted certificate")
		}
	})

	// Over the whole test each Dovecot saw its own users only: never the
	// client names that the auth server rewrote (carol, token-user).
	if got := logUsers(dcA); !slices.Equal(got, []string{alice, carolMailbox}) {
		t.Errorf("Dovecot A saw users %q, want alice and carol's mailbox only", got)
	}
	if got := logUsers(dcB); !slices.Equal(got, []string{bob}) {
		t.Errorf("Dovecot B saw users %q, want bob only", got)
	}
	noCaddyErrors(t, p)
}

// --- 3. Delay after failed logins ---------------------------------------------

// TestFailedLoginDelay checks auth_failure_delay 200ms against the shared
// Dovecot, which itself answers failures at once: three failures in a row
// from 127.0.0.1 take about 200, 400 and 800 ms, the third one reaches
// max_errors and closes the session; the penalty follows the address into
// the next session (1600 ms) and a good login clears it.
func TestFailedLoginDelay(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(alice, wrongPass)
	addr := freePortT(t)
	startCaddy(t, "failure-delay", caddyfileFor(false, fmt.Sprintf(`		%s {
			route {
				pop3 %s {
					starttls off
					auth_failure_delay 200ms
					max_errors 3
				}
			}
		}
`, addr, env.dc.POP3Addr)), listener{addr: addr})

	fail := func(c *client, want time.Duration) {
		t.Helper()
		c.ok("USER " + alice)
		start := time.Now()
		got := c.cmd("PASS " + wrongPass)
		took := time.Since(start)
		if sansID(got) != replyAuthFailed {
			t.Errorf("wrong password: got %q, want %q", got, replyAuthFailed)
		}
		if took < want || took > want+500*time.Millisecond {
			t.Errorf("failure answered after %v, want about %v", took.Round(time.Millisecond), want)
		}
		t.Logf("failure answered after %v (want about %v)", took.Round(time.Millisecond), want)
	}
	c := dialPOP3(t, addr, nil)
	fail(c, 200*time.Millisecond)
	fail(c, 400*time.Millisecond)
	fail(c, 800*time.Millisecond)
	if got := c.line(); sansID(got) != replyTooMany {
		t.Errorf("after 3 failures: got %q, want %q", got, replyTooMany)
	}
	c.expectClosed()

	c = dialPOP3(t, addr, nil)
	fail(c, 1600*time.Millisecond)
	c.login(alice, alicePass)
	c.quit()

	c = dialPOP3(t, addr, nil)
	fail(c, 200*time.Millisecond)
	c.quit()
}
