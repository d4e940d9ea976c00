package pop3

import (
	"crypto/hmac"
	"crypto/md5"
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/passwdfile"
	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// passwdHandler is a handler with one passwd_file authenticator over the
// given file content, and mod applied before setup.
func passwdHandler(t *testing.T, upstream, content string, extra map[string]any, mod func(*Handler)) (*Handler, *observer.ObservedLogs, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{"authenticator": "passwd_file", "path": path}
	for k, v := range extra {
		cfg[k] = v
	}
	h, logs := authenticatorsHandler(t, upstream, mod, cfg)
	return h, logs, path
}

// TestPasswdFileLogins: the proxy checks the password itself; the
// upstream sees the entry's own upstream credentials (pass=, destuser=)
// or the client's; nologin gives its reason only to the right password;
// names are looked up in lower case, with default_domain.
func TestPasswdFileLogins(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["carol"] = "carol-backend" })
	content := fmt.Sprintf(`# users
alice@example.com:{PLAIN}secret-pw::::::
carol@example.com:{PLAIN}carol-pw::::::host=%s port=%s destuser=carol pass=carol-backend
moved@example.com:{PLAIN}moved-pw::::::nologin reason=Moved_to_pop.example.net
`, strings.Split(addr, ":")[0], strings.Split(addr, ":")[1])
	h, logs, _ := passwdHandler(t, addr, content, map[string]any{"default_domain": "example.com"}, nil)

	for _, tc := range []struct{ user, pass, want string }{
		{"alice@example.com", "secret-pw", "-ERR [AUTH] Authentication failed"}, // the upstream knows no alice@example.com
		{"carol", "carol-pw", "+OK"},
		{"CAROL@Example.com", "carol-pw", "+OK"},
		{"carol", "carol-backend", "-ERR [AUTH] Authentication failed"},
		{"carol", "wrong", "-ERR [AUTH] Authentication failed"},
		{"nobody", "x", "-ERR [AUTH] Authentication failed"},
		{"moved", "moved-pw", "-ERR [SYS/PERM] Moved_to_pop.example.net"},
		{"moved", "wrong", "-ERR [AUTH] Authentication failed"},
	} {
		ts := startSession(t, h, logs, false)
		ts.send("USER "+tc.user, "PASS "+tc.pass)
		ts.expect("+OK")
		if got := ts.readLine(); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s/%s: %q, want %q", tc.user, tc.pass, got, tc.want)
		}
		ts.send("QUIT")
		ts.readLine()
		ts.closed()
	}
	lines := strings.Join(up.Lines(), "\n")
	if !strings.Contains(lines, "AUTH PLAIN "+b64("\x00carol\x00carol-backend")) {
		t.Errorf("upstream lines %q: no login with the entry's destuser and pass", lines)
	}
	if strings.Contains(lines, b64("\x00carol\x00carol-pw")) {
		t.Error("the client's own password reached the upstream")
	}
	noSecretIn(t, logs, "secret-pw", "carol-pw", "carol-backend", "moved-pw")
}

// TestPasswdFileMasterLogin: after the proxy's check, the upstream gets
// the master's login for the user, in either of Dovecot's forms; a client
// mechanism that carries no password (CRAM-MD5, APOP) gets in the same way.
func TestPasswdFileMasterLogin(t *testing.T) {
	t.Parallel()
	for _, separator := range []string{"", "*"} {
		up, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
			u.Users["master"] = "master-pw"
			u.Users["alice*master"] = "master-pw"
		})
		h, logs, _ := passwdHandler(t, addr, "alice:{PLAIN}alice-pw::::::\n", nil, func(h *Handler) {
			h.MasterLogin = &MasterLogin{User: "master", Password: "master-pw", Separator: separator}
			h.Auth = []string{AuthPlain, AuthCRAMMD5, AuthAPOP}
		})
		ts := startSession(t, h, logs, false)
		ts.send("AUTH CRAM-MD5")
		challenge, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ts.expect("+ "), "+ "))
		if err != nil {
			t.Fatal(err)
		}
		mac := hmac.New(md5.New, []byte("alice-pw"))
		mac.Write(challenge)
		ts.send(b64("alice " + hex.EncodeToString(mac.Sum(nil))))
		ts.expect("+OK")
		ts.send("QUIT")
		ts.expect("+OK")
		ts.closed()

		ts = startSession(t, h, logs, false)
		stamp := ts.greeting[strings.Index(ts.greeting, "<"):]
		sum := md5.Sum([]byte(stamp + "alice-pw"))
		ts.send("APOP alice " + hex.EncodeToString(sum[:]))
		ts.expect("+OK")
		ts.send("QUIT")
		ts.expect("+OK")
		ts.closed()

		lines := strings.Join(up.Lines(), "\n")
		want := "AUTH PLAIN " + b64("alice\x00master\x00master-pw")
		if separator != "" {
			want = "AUTH PLAIN " + b64("\x00alice*master\x00master-pw")
		}
		if strings.Count(lines, want) != 2 {
			t.Errorf("separator %q: upstream lines %q, want two of %q", separator, lines, want)
		}
		noSecretIn(t, logs, "alice-pw", "master-pw")
	}
}

// TestPasswdFileWithoutMasterRefusesDigests: without master_login, a
// CRAM-MD5 login checked at the proxy has no password for the upstream,
// and the digest is never sent as one.
func TestPasswdFileWithoutMasterRefusesDigests(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs, _ := passwdHandler(t, addr, "alice:{PLAIN}secret-pw::::::\n", nil, func(h *Handler) {
		h.Auth = []string{AuthPlain, AuthAPOP}
	})
	ts := startSession(t, h, logs, false)
	stamp := ts.greeting[strings.Index(ts.greeting, "<"):]
	sum := md5.Sum([]byte(stamp + "secret-pw"))
	ts.send("APOP alice " + hex.EncodeToString(sum[:]))
	ts.expect("-ERR [SYS/TEMP]")
	if strings.Contains(strings.Join(up.Lines(), "\n"), hex.EncodeToString(sum[:])) {
		t.Error("the APOP digest reached the upstream")
	}
}

// TestPasswdFileSCRAM: SCRAM-SHA-256 and SCRAM-SHA-1 against keys stored
// in the file and keys derived from a clear password; a wrong password and
// an unknown user fail alike, after the whole exchange.
func TestPasswdFileSCRAM(t *testing.T) {
	t.Parallel()
	stored, err := passwdfile.NewSCRAM("SCRAM-SHA-256", "bob-pw", []byte("0123456789abcdef"), 4096)
	if err != nil {
		t.Fatal(err)
	}
	enc := base64.StdEncoding.EncodeToString
	content := fmt.Sprintf("alice:{PLAIN}alice-pw::::::\nbob:{SCRAM-SHA-256}%d,%s,%s,%s::::::\n",
		stored.Iterations, enc(stored.Salt), enc(stored.StoredKey), enc(stored.ServerKey))
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["master"] = "master-pw" })
	h, logs, _ := passwdHandler(t, addr, content, nil, func(h *Handler) {
		h.MasterLogin = &MasterLogin{User: "master", Password: "master-pw"}
		h.Auth = []string{AuthPlain, AuthSCRAMSHA256, AuthSCRAMSHA1}
	})
	ts := startSession(t, h, logs, false)
	ts.send("CAPA")
	ts.expect("+OK")
	if capa := strings.Join(ts.multiline(), "\n"); !strings.Contains(capa, "SASL PLAIN LOGIN SCRAM-SHA-256 SCRAM-SHA-1") {
		t.Errorf("CAPA %q", capa)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	for _, tc := range []struct{ mech, user, pass, want string }{
		{"SCRAM-SHA-256", "alice", "alice-pw", "+OK"},
		{"SCRAM-SHA-1", "alice", "alice-pw", "+OK"},
		{"SCRAM-SHA-256", "bob", "bob-pw", "+OK"},
		{"SCRAM-SHA-256", "alice", "wrong", "-ERR [AUTH] Authentication failed"},
		{"SCRAM-SHA-256", "nobody", "x", "-ERR [AUTH] Authentication failed"},
		{"SCRAM-SHA-1", "bob", "bob-pw", "-ERR [AUTH] Authentication failed"}, // only SHA-256 keys stored
	} {
		ts := startSession(t, h, logs, false)
		if got := scramLogin(t, ts, tc.mech, tc.user, tc.pass); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s %s/%s: %q, want %q", tc.mech, tc.user, tc.pass, got, tc.want)
		}
		ts.send("QUIT")
		ts.readLine()
		ts.closed()
	}
	noSecretIn(t, logs, "alice-pw", "bob-pw", "master-pw")
}

// TestPasswdFileReload: a changed file is read again without a reload; a
// broken one leaves the users read before, with an ERROR that holds no
// password field.
func TestPasswdFileReload(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, _, path := passwdHandler(t, addr, "alice:{PLAIN}secret-pw::::::\n", nil, nil)
	p := h.authenticators[0].(*PasswdFile)
	login := func(user, pass string) string {
		ts := startSession(t, h, nil, false)
		defer ts.conn.Close()
		ts.send("USER "+user, "PASS "+pass)
		ts.expect("+OK")
		return ts.readLine()
	}
	replace := func(content string) {
		tmp := path + ".new"
		if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	replace("alice:{PLAIN}secret-pw::::::\nbob@example.com:{PLAIN}bob-pw::::::destuser=alice pass=secret-pw\n")
	waitFor(t, "bob to be read", func() bool { _, ok := p.lookup("bob@example.com"); return ok })
	if got := login("bob@example.com", "bob-pw"); !strings.HasPrefix(got, "+OK") {
		t.Errorf("bob after the change: %q", got)
	}
	replace("alice:{NO-SUCH}secret-pw-2::::::\n")
	time.Sleep(2 * passwdPollInterval)
	if _, ok := p.lookup("bob@example.com"); !ok {
		t.Error("a broken file emptied the table")
	}
	if got := login("alice", "secret-pw"); !strings.HasPrefix(got, "+OK") {
		t.Errorf("alice after a broken file: %q", got)
	}
}

// scramLogin runs a SCRAM client exchange on ts (RFC 5802 §3) and returns
// the server's last line.
func scramLogin(t *testing.T, ts *testSession, mech, user, pass string) string {
	t.Helper()
	nonce := "fyko+d2lbbFgONRv9qkxdawL"
	first := "n,,n=" + user + ",r=" + nonce
	ts.send("AUTH " + mech + " " + b64(first))
	line := ts.readLine()
	if !strings.HasPrefix(line, "+ ") {
		return line
	}
	serverFirst, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(line, "+ "))
	var r, s string
	var iter int
	for _, f := range strings.Split(string(serverFirst), ",") {
		switch {
		case strings.HasPrefix(f, "r="):
			r = f[2:]
		case strings.HasPrefix(f, "s="):
			s = f[2:]
		case strings.HasPrefix(f, "i="):
			fmt.Sscan(f[2:], &iter)
		}
	}
	salt, _ := base64.StdEncoding.DecodeString(s)
	keys, err := passwdfile.NewSCRAM(map[bool]string{true: "SCRAM-SHA-1", false: "SCRAM-SHA-256"}[mech == "SCRAM-SHA-1"], pass, salt, iter)
	if err != nil {
		t.Fatal(err)
	}
	withoutProof := "c=" + b64("n,,") + ",r=" + r
	authMessage := first[3:] + "," + string(serverFirst) + "," + withoutProof
	sig := hmac.New(keys.Hash(), keys.StoredKey)
	sig.Write([]byte(authMessage))
	salted, err := pbkdf2.Key(keys.Hash(), pass, salt, iter, keys.Hash()().Size())
	if err != nil {
		t.Fatal(err)
	}
	ck := hmac.New(keys.Hash(), salted)
	ck.Write([]byte("Client Key"))
	clientKey := ck.Sum(nil)
	proof := make([]byte, len(clientKey))
	for i, b := range sig.Sum(nil) {
		proof[i] = clientKey[i] ^ b
	}
	ts.send(b64(withoutProof + ",p=" + base64.StdEncoding.EncodeToString(proof)))
	line = ts.readLine()
	if !strings.HasPrefix(line, "+ ") {
		return line
	}
	ts.send("") // RFC 5034: the server-final-message is a challenge answered empty
	return ts.readLine()
}

// noSecretIn fails if any entry of logs holds one of the secrets.
func noSecretIn(t *testing.T, logs *observer.ObservedLogs, secrets ...string) {
	t.Helper()
	(&testSession{t: t, logs: logs}).assertNoSecret(secrets...)
}

// TestMasterSeparatorInUserName: with the USER <user><sep><master> form,
// a user name that holds the separator is refused before the upstream:
// "victim*master" would log in as the backend splits it, not as checked.
func TestMasterSeparatorInUserName(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["master"] = "master-pw" })
	h, logs, _ := passwdHandler(t, addr, "victim*x:{PLAIN}eve-pw::::::\n", nil, func(h *Handler) {
		h.MasterLogin = &MasterLogin{User: "master", Password: "master-pw", Separator: "*"}
	})
	ts := startSession(t, h, logs, false)
	ts.send("USER victim*x", "PASS eve-pw")
	ts.expect("+OK")
	ts.expect("-ERR [AUTH] Invalid credentials syntax")
	for _, l := range up.Lines() {
		if strings.HasPrefix(l, "AUTH") || strings.HasPrefix(l, "USER") {
			t.Errorf("upstream got %q", l)
		}
	}
}

// TestPasswdFileDigestsOfferedOnlyWhenCheckable: with no entry that could
// check an APOP or CRAM-MD5 digest (only hashes), neither is offered: no
// timestamp in the greeting, no CRAM-MD5 in CAPA, both refused as such.
func TestPasswdFileDigestsOfferedOnlyWhenCheckable(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	sum := sha256.Sum256([]byte("secret-pw"))
	hashed := "alice:{SHA256}" + base64.StdEncoding.EncodeToString(sum[:]) + "::::::\n"
	for _, tc := range []struct {
		content string
		offered bool
	}{
		{hashed, false},
		{hashed + "bob:{PLAIN}bob-pw::::::\n", true},
	} {
		h, logs, _ := passwdHandler(t, addr, tc.content, nil, func(h *Handler) {
			h.Auth = []string{AuthPlain, AuthAPOP, AuthCRAMMD5}
		})
		ts := startSession(t, h, logs, false)
		if got := strings.Contains(ts.greeting, "<"); got != tc.offered {
			t.Errorf("offered %v: greeting %q", tc.offered, ts.greeting)
		}
		ts.send("CAPA")
		ts.expect("+OK")
		if got := strings.Contains(strings.Join(ts.multiline(), "\n"), "CRAM-MD5"); got != tc.offered {
			t.Errorf("offered %v: CRAM-MD5 in CAPA %v", tc.offered, got)
		}
		if !tc.offered {
			ts.send("AUTH CRAM-MD5")
			ts.expect("-ERR Unsupported authentication mechanism")
			ts.send("APOP alice 0123456789abcdef0123456789abcdef")
			ts.expect("-ERR APOP is not enabled")
		}
		ts.send("QUIT")
		ts.expect("+OK")
	}
}

// TestPasswdFileUpstreamTLS: an entry's starttls= reaches its host over
// STLS: any-cert without verifying, yes verified against the host name
// (the test certificate is trusted by nobody, so that login fails with
// [SYS/TEMP] and no password is sent).
func TestPasswdFileUpstreamTLS(t *testing.T) {
	t.Parallel()
	fake, port, _ := stlsUpstream(t)
	content := fmt.Sprintf("alice:{PLAIN}secret-pw::::::host=localhost port=%[1]s starttls=any-cert\n"+
		"bob:{PLAIN}bob-pw::::::host=localhost port=%[1]s starttls=yes destuser=alice pass=secret-pw\n", port)
	h, logs, _ := passwdHandler(t, "", content, nil, nil)
	login := func(user, pass string) string {
		ts := startSession(t, h, logs, false)
		defer ts.conn.Close()
		ts.send("USER "+user, "PASS "+pass)
		ts.expect("+OK")
		return ts.readLine()
	}
	if got := login("alice", "secret-pw"); !strings.HasPrefix(got, "+OK") {
		t.Errorf("starttls=any-cert: %q", got)
	}
	if got := login("bob", "bob-pw"); !strings.HasPrefix(got, "-ERR [SYS/TEMP]") {
		t.Errorf("starttls=yes with an untrusted certificate: %q", got)
	}
	lines := strings.Join(fake.Lines(), "\n")
	if strings.Count(lines, "STLS") != 2 {
		t.Errorf("upstream lines %q: want STLS on both logins", lines)
	}
	if strings.Count(lines, "AUTH PLAIN") != 1 {
		t.Errorf("upstream lines %q: want one login, over the trusted-by-choice TLS only", lines)
	}
}
