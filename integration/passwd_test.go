//go:build integration

package integration

// passwd_file and master_login against a real Dovecot: the proxy checks
// each user's password in a Dovecot passwd-file whose hashes Dovecot's own
// doveadm made, then logs in to Dovecot as a master user, so the backend
// never needs the user's password (each Dovecot user has another one).

import (
	"bufio"
	"crypto/hmac"
	"crypto/md5"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

const passwdMaster, passwdMasterPass = "pfmaster", "pf-master-Secr3t"

// passwdSchemes are the schemes the passwd-file test users have, one user
// each.
var passwdSchemes = []string{"PLAIN", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "SSHA256", "SSHA512", "ARGON2I", "ARGON2ID", "CRAM-MD5", "SCRAM-SHA-256"}

func passwdUser(scheme string) (user, pass string) {
	s := strings.ToLower(scheme)
	return "pf-" + s, "pw-" + s + "-Secr3t"
}

// doveadmHash is `doveadm pw -s scheme -p pass`.
func doveadmHash(t *testing.T, scheme, pass string) string {
	t.Helper()
	out, err := exec.Command("doveadm", "pw", "-s", scheme, "-p", pass).CombinedOutput()
	if err != nil {
		t.Fatalf("doveadm pw -s %s: %v: %s", scheme, err, out)
	}
	return strings.TrimSpace(string(out))
}

// writeAtomically replaces path as operators' tools do: a new file
// renamed over the old one.
func writeAtomically(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestPasswdFileMasterLoginDovecot(t *testing.T) {
	need(t)
	usedSecret(passwdMaster, passwdMasterPass)
	var users []dovecot.User
	var file strings.Builder
	file.WriteString("# users of the proxy, hashes by doveadm pw\n")
	for _, scheme := range passwdSchemes {
		user, pass := passwdUser(scheme)
		usedSecret(user, pass)
		// Dovecot knows the user by another password: only the master gets in.
		users = append(users, dovecot.User{Name: user, Password: "backend-" + pass, Messages: [][]byte{mkMessage("for "+user, "Hello.\r\n")}})
		fmt.Fprintf(&file, "%s:%s::::::\n", user, doveadmHash(t, scheme, pass))
	}
	file.WriteString("pf-moved:{PLAIN}pw-moved-Secr3t::::::nologin reason=Moved_to_pop.example.net\n")
	usedSecret("pf-moved", "pw-moved-Secr3t")

	dir := t.TempDir()
	masters := filepath.Join(dir, "masters")
	if err := os.WriteFile(masters, []byte(passwdMaster+":{PLAIN}"+passwdMasterPass+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dc := startTestDovecot(t, "passwd", users, fmt.Sprintf(`auth_master_user_separator = *
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%%u %s
  master = yes
}
`, masters))
	passwd := filepath.Join(dir, "proxy-users")
	writeAtomically(t, passwd, file.String())

	withAuthzid, withSeparator, withSTLS := freePortT(t), freePortT(t), freePortT(t)
	p := startCaddy(t, "passwd", caddyfileFor(true, fmt.Sprintf(`		%[7]s {
			route {
				pop3 %[2]s {
					starttls only
					auth plain scram-sha-256
					passwd_file %[3]s
					master_login %[4]s %[5]s
					auth_failure_delay 10ms
				}
			}
		}
		%[1]s {
			route {
				pop3 %[2]s {
					starttls off
					auth plain apop cram-md5 scram-sha-256 scram-sha-1
					passwd_file %[3]s
					master_login %[4]s %[5]s
					auth_failure_delay 10ms
				}
			}
		}
		%[6]s {
			route {
				pop3 %[2]s {
					starttls off
					passwd_file %[3]s
					master_login %[4]s %[5]s {
						separator *
					}
					auth_failure_delay 10ms
				}
			}
		}
`, withAuthzid, dc.POP3Addr, passwd, passwdMaster, passwdMasterPass, withSeparator, withSTLS)), listener{addr: withAuthzid}, listener{addr: withSeparator}, listener{addr: withSTLS})

	loginAs := func(addr, user, pass string) string {
		c := dialPOP3(t, addr, nil)
		defer c.quit()
		c.ok("USER " + user)
		r := c.cmd("PASS " + pass)
		if strings.HasPrefix(r, "+OK") {
			if st := c.ok("STAT"); !strings.HasPrefix(st, "+OK 1 ") {
				t.Errorf("%s: STAT %q, want the one message of the mailbox", user, st)
			}
		}
		return r
	}

	t.Run("schemes", func(t *testing.T) {
		for _, scheme := range passwdSchemes {
			user, pass := passwdUser(scheme)
			for _, addr := range []string{withAuthzid, withSeparator} {
				if r := loginAs(addr, user, pass); !strings.HasPrefix(r, "+OK") {
					t.Errorf("%s (%s) through %s: %q", user, scheme, addr, r)
				}
			}
			usedSecret(user, "wrong-"+pass)
			if r := loginAs(withAuthzid, user, "wrong-"+pass); sansID(r) != replyAuthFailed {
				t.Errorf("%s (%s) wrong password: %q", user, scheme, r)
			}
			// The backend's own password is no password at the proxy.
			if r := loginAs(withAuthzid, user, "backend-"+pass); sansID(r) != replyAuthFailed {
				t.Errorf("%s (%s) backend password: %q", user, scheme, r)
			}
		}
		usedSecret("nobody", "nobody-pw")
		if r := loginAs(withAuthzid, "nobody", "nobody-pw"); sansID(r) != replyAuthFailed {
			t.Errorf("unknown user: %q", r)
		}
	})

	t.Run("nologin", func(t *testing.T) {
		if r := loginAs(withAuthzid, "pf-moved", "pw-moved-Secr3t"); sansID(r) != "-ERR [SYS/PERM] Moved_to_pop.example.net" {
			t.Errorf("nologin user: %q", r)
		}
		usedSecret("pf-moved", "wrong-moved")
		if r := loginAs(withAuthzid, "pf-moved", "wrong-moved"); sansID(r) != replyAuthFailed {
			t.Errorf("nologin user, wrong password: %q", r) // the reason is for the owner only
		}
	})

	t.Run("mechanisms", func(t *testing.T) {
		user, pass := passwdUser("PLAIN")
		c := dialPOP3(t, withAuthzid, nil)
		if r := c.cmd("AUTH PLAIN " + b64("\x00"+user+"\x00"+pass)); !strings.HasPrefix(r, "+OK") {
			t.Errorf("AUTH PLAIN: %q", r)
		}
		c.quit()

		// APOP and CRAM-MD5 are checked at the proxy against the clear
		// password; Dovecot sees the master's AUTH PLAIN.
		c = dialPOP3(t, withAuthzid, nil)
		ts := c.greeting[strings.Index(c.greeting, "<"):]
		sum := md5.Sum([]byte(ts + pass))
		if r := c.cmd("APOP " + user + " " + hex.EncodeToString(sum[:])); !strings.HasPrefix(r, "+OK") {
			t.Errorf("APOP: %q", r)
		}
		c.quit()

		c = dialPOP3(t, withAuthzid, nil)
		r := c.cmd("AUTH CRAM-MD5")
		challenge, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(r, "+ "))
		if err != nil {
			t.Fatalf("CRAM-MD5 challenge %q", r)
		}
		mac := hmac.New(md5.New, []byte(pass))
		mac.Write(challenge)
		if r := c.cmd(b64(user + " " + hex.EncodeToString(mac.Sum(nil)))); !strings.HasPrefix(r, "+OK") {
			t.Errorf("CRAM-MD5: %q", r)
		}
		c.quit()

		// A bcrypt user has no secret for a digest: refused, as a wrong one.
		bUser, bPass := passwdUser("BLF-CRYPT")
		c = dialPOP3(t, withAuthzid, nil)
		ts = c.greeting[strings.Index(c.greeting, "<"):]
		sum = md5.Sum([]byte(ts + bPass))
		if r := c.cmd("APOP " + bUser + " " + hex.EncodeToString(sum[:])); sansID(r) != replyAuthFailed {
			t.Errorf("APOP for a bcrypt user: %q", r)
		}
		c.quit()
	})

	t.Run("scram", func(t *testing.T) {
		// SCRAM is checked at the proxy against the file's keys (stored by
		// doveadm, or derived from a PLAIN entry); Dovecot sees the master.
		for _, tc := range []struct {
			mech, scheme string
			ok           bool
		}{
			{"SCRAM-SHA-256", "SCRAM-SHA-256", true},
			{"SCRAM-SHA-256", "PLAIN", true},
			{"SCRAM-SHA-1", "PLAIN", true},
			{"SCRAM-SHA-256", "BLF-CRYPT", false}, // no SCRAM secret in a bcrypt hash
		} {
			user, pass := passwdUser(tc.scheme)
			c := dialPOP3(t, withAuthzid, nil)
			r := scramClient(t, c, tc.mech, user, pass)
			if tc.ok != strings.HasPrefix(r, "+OK") || !tc.ok && sansID(r) != replyAuthFailed {
				t.Errorf("%s for a %s user: %q", tc.mech, tc.scheme, r)
			}
			if tc.ok {
				if st := c.ok("STAT"); !strings.HasPrefix(st, "+OK 1 ") {
					t.Errorf("%s: STAT %q", user, st)
				}
			}
			c.quit()
		}
		user, pass := passwdUser("SCRAM-SHA-256")
		c := dialPOP3(t, withAuthzid, nil)
		if r := scramClient(t, c, "SCRAM-SHA-256", user, "wrong-"+pass); sansID(r) != replyAuthFailed {
			t.Errorf("SCRAM with a wrong password: %q", r)
		}
		c.quit()
	})

	t.Run("tls", func(t *testing.T) {
		// After STLS: AUTH LOGIN, and SCRAM-SHA-256-PLUS bound to this TLS
		// connection by tls-exporter (RFC 9266).
		waitSTLS(t, p, withSTLS)
		cfg, err := p.tlsConfig()
		if err != nil {
			t.Fatal(err)
		}
		user, pass := passwdUser("SHA512-CRYPT")
		c := dialPOP3(t, withSTLS, nil)
		c.stls(cfg)
		if r := c.cmd("AUTH LOGIN"); !strings.HasPrefix(r, "+ ") {
			t.Fatalf("AUTH LOGIN: %q", r)
		}
		if r := c.cmd(b64(user)); !strings.HasPrefix(r, "+ ") {
			t.Fatalf("AUTH LOGIN user: %q", r)
		}
		if r := c.cmd(b64(pass)); !strings.HasPrefix(r, "+OK") {
			t.Errorf("AUTH LOGIN: %q", r)
		}
		c.quit()

		sUser, sPass := passwdUser("SCRAM-SHA-256")
		for _, tc := range []struct {
			name   string
			bindTo func(st *tls.ConnectionState) []byte
			want   string
		}{
			{"this connection", func(st *tls.ConnectionState) []byte {
				cb, err := st.ExportKeyingMaterial("EXPORTER-Channel-Binding", nil, 32)
				if err != nil {
					t.Fatal(err)
				}
				return cb
			}, "+OK"},
			{"another connection", func(*tls.ConnectionState) []byte { return make([]byte, 32) }, replyAuthFailed},
		} {
			c := dialPOP3(t, withSTLS, nil)
			st := c.stls(cfg)
			c.ok("CAPA")
			if capa := strings.Join(c.multi(), " "); !strings.Contains(capa, "SCRAM-SHA-256-PLUS") {
				t.Errorf("CAPA after STLS: %q", capa)
			}
			r := scramClientBound(t, c, "SCRAM-SHA-256-PLUS", sUser, sPass, "p=tls-exporter,,", tc.bindTo(st))
			if got := sansID(r); !strings.HasPrefix(got, tc.want) {
				t.Errorf("SCRAM-SHA-256-PLUS bound to %s: %q, want %q", tc.name, r, tc.want)
			}
			c.quit()
		}
	})

	t.Run("reload", func(t *testing.T) {
		// A user added while logins go on is known within a few seconds;
		// no login of the others fails meanwhile.
		user, pass := passwdUser("PLAIN")
		var failures atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					// Not dialPOP3: it fails the test with t.Fatalf, which
					// only the test's own goroutine may call.
					if r, err := pipelinedLogin(withAuthzid, user, pass); err != nil || !strings.HasPrefix(r, "+OK") {
						failures.Add(1)
						t.Errorf("login under reload: %q %v", r, err)
					}
				}
			}()
		}
		newUser, newPass := "pf-new", "pw-new-Secr3t"
		usedSecret(newUser, newPass)
		writeAtomically(t, passwd, file.String()+newUser+":"+doveadmHash(t, "SHA512-CRYPT", newPass)+"::::::host=127.0.0.1 port="+strings.Split(dc.POP3Addr, ":")[1]+" destuser="+user+"\n")
		waitFor(t, 10*time.Second, "the new user to log in", func() bool {
			c := dialPOP3(t, withAuthzid, nil)
			defer c.quit()
			c.ok("USER " + newUser)
			return strings.HasPrefix(c.cmd("PASS "+newPass), "+OK")
		})

		// A broken file keeps the users read before, with an ERROR.
		writeAtomically(t, passwd, file.String()+"pf-broken:{NO-SUCH-SCHEME}x::::::\n")
		waitFor(t, 10*time.Second, "the broken file to be reported", func() bool {
			return strings.Contains(p.log(), "passwd_file not reloaded")
		})
		if r := loginAs(withAuthzid, newUser, newPass); !strings.HasPrefix(r, "+OK") {
			t.Errorf("a user of the last good file after a broken one: %q", r)
		}
		close(stop)
		wg.Wait()
		if n := failures.Load(); n != 0 {
			t.Errorf("%d logins failed while the file changed", n)
		}
		if strings.Contains(p.log(), "NO-SUCH-SCHEME}x") {
			t.Error("the broken line's password field is in the log")
		}
	})
}

// scramClient logs in with SCRAM (RFC 5802 §3, RFC 5034's empty answer to
// the server-final-message) and returns the server's last line.
func scramClient(t *testing.T, c *client, mech, user, pass string) string {
	t.Helper()
	return scramClientBound(t, c, mech, user, pass, "n,,", nil)
}

// scramClientBound is scramClient with a GS2 header and channel binding
// data of its own (SCRAM-*-PLUS).
func scramClientBound(t *testing.T, c *client, mech, user, pass, gs2 string, cbData []byte) string {
	t.Helper()
	newHash := sha256.New
	if mech == "SCRAM-SHA-1" {
		newHash = sha1.New
	}
	first := "n=" + user + ",r=rOprNGfwEbeRWgbNEkqO"
	r := c.cmd("AUTH " + mech + " " + b64(gs2+first))
	if !strings.HasPrefix(r, "+ ") {
		return r
	}
	serverFirst, err := base64.StdEncoding.DecodeString(r[2:])
	if err != nil {
		t.Fatalf("server-first %q", r)
	}
	var nonce, saltB64 string
	iter := 0
	for _, f := range strings.Split(string(serverFirst), ",") {
		switch {
		case strings.HasPrefix(f, "r="):
			nonce = f[2:]
		case strings.HasPrefix(f, "s="):
			saltB64 = f[2:]
		case strings.HasPrefix(f, "i="):
			iter, _ = strconv.Atoi(f[2:])
		}
	}
	salt, _ := base64.StdEncoding.DecodeString(saltB64)
	salted, err := pbkdf2.Key(newHash, pass, salt, iter, newHash().Size())
	if err != nil {
		t.Fatal(err)
	}
	mac := func(key []byte, s string) []byte { m := hmac.New(newHash, key); m.Write([]byte(s)); return m.Sum(nil) }
	clientKey := mac(salted, "Client Key")
	h := newHash()
	h.Write(clientKey)
	storedKey := h.Sum(nil)
	final := "c=" + b64(gs2+string(cbData)) + ",r=" + nonce
	signature := mac(storedKey, first+","+string(serverFirst)+","+final)
	for i := range clientKey {
		clientKey[i] ^= signature[i]
	}
	r = c.cmd(b64(final + ",p=" + base64.StdEncoding.EncodeToString(clientKey)))
	if !strings.HasPrefix(r, "+ ") {
		return r
	}
	serverFinal, _ := base64.StdEncoding.DecodeString(r[2:])
	if want := "v=" + base64.StdEncoding.EncodeToString(mac(mac(salted, "Server Key"), first+","+string(serverFirst)+","+final)); string(serverFinal) != want {
		t.Errorf("server signature %q, want %q: the proxy does not hold the user's keys", serverFinal, want)
	}
	return c.cmd("")
}

// pipelinedLogin sends USER, PASS and QUIT at once and returns the reply
// to PASS.
func pipelinedLogin(addr, user, pass string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(conn, "USER "+user+"\r\nPASS "+pass+"\r\nQUIT\r\n"); err != nil {
		return "", err
	}
	r := bufio.NewReader(conn)
	var reply string
	for i := 0; i < 3; i++ { // greeting, USER, PASS
		if reply, err = r.ReadString('\n'); err != nil {
			return reply, err
		}
	}
	return strings.TrimSuffix(reply, "\r\n"), nil
}
