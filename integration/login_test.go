//go:build integration

package integration

// Login semantics against a real Dovecot: an AUTH PLAIN authorization
// identity with an auth server that hands out master credentials, and a
// mailbox locked by another session ([IN-USE]), which is no wrong password.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

const (
	victim, victimPass   = "victim", "victim-Secr3t-pw"
	mallory, malloryPass = "mallory", "mallory-Secr3t-pw"
	masterUser           = "proxymaster"
	masterPass           = "master-Secr3t-pw"
)

// TestLoginSemanticsDovecot runs a Dovecot with a master user and
// pop3_lock_session behind an auth_http Caddy that logs mallory in with the
// master credentials (the auth server's Auth-User/Auth-Pass), and a
// pass-through Caddy.
func TestLoginSemanticsDovecot(t *testing.T) {
	need(t)
	for _, s := range [][2]string{{victim, victimPass}, {mallory, malloryPass}, {masterUser, masterPass}} {
		usedSecret(s[0], s[1])
	}
	dir := t.TempDir()
	masters := filepath.Join(dir, "masters")
	if err := os.WriteFile(masters, []byte(masterUser+":{PLAIN}"+masterPass+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dc := startTestDovecot(t, "login", []dovecot.User{
		{Name: victim, Password: victimPass, Messages: [][]byte{mkMessage("for the victim", "Private.\r\n")}},
		{Name: mallory, Password: malloryPass},
	}, fmt.Sprintf(`auth_master_user_separator = *
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%%u %s
  master = yes
}
protocol pop3 {
  pop3_lock_session = yes
}
`, masters))

	// Dovecot does what the attack needs: the master opens any mailbox.
	direct := dialPOP3(t, dc.POP3Addr, nil)
	if r := direct.cmd("AUTH PLAIN " + b64(victim+"\x00"+masterUser+"\x00"+masterPass)); !strings.HasPrefix(r, "+OK") {
		t.Fatalf("Dovecot refused the master login: %q", r)
	}
	direct.quit()

	as := &pop3test.AuthServer{NoWait: true, Users: map[string]pop3test.AuthUser{
		mallory: {Password: malloryPass, Server: dc.POP3Addr, RewriteUser: mallory + "*" + masterUser, RewritePass: masterPass},
		victim:  {Password: victimPass, Server: dc.POP3Addr},
	}}
	asURL := as.Start(t)
	withAuth, plain, relayed := freePortT(t), freePortT(t), freePortT(t)
	p := startCaddy(t, "login", caddyfileFor(false, fmt.Sprintf(`		%[1]s {
			route {
				pop3 {
					starttls off
					auth_http %[2]s
					auth_failure_delay 20s
					timeout 40s
				}
			}
		}
		%[3]s {
			route {
				pop3 %[4]s {
					starttls off
					auth_failure_delay 20s
					timeout 40s
				}
			}
		}
		%[5]s {
			route {
				pop3 %[4]s {
					starttls off
					auth plain apop
					auth_failure_delay 20s
					timeout 40s
				}
			}
		}
`, withAuth, asURL, plain, dc.POP3Addr, relayed)), listener{addr: withAuth}, listener{addr: plain}, listener{addr: relayed})

	t.Run("authzid", func(t *testing.T) {
		c := dialPOP3(t, withAuth, nil)
		// Mallory's own credentials, the victim as authorization identity.
		r := c.cmd("AUTH PLAIN " + b64(victim+"\x00"+mallory+"\x00"+malloryPass))
		if sansID(r) != "-ERR [AUTH] Authorization identity not allowed" {
			t.Errorf("authzid %s: got %q", victim, r)
			if strings.HasPrefix(r, "+OK") {
				t.Errorf("mallory opened the victim's mailbox: STAT %q", c.cmd("STAT"))
			}
		}
		// Logged in as herself, she is the master acting as mallory.
		if r := c.cmd("AUTH PLAIN " + b64(mallory+"\x00"+mallory+"\x00"+malloryPass)); !strings.HasPrefix(r, "+OK") {
			t.Fatalf("mallory's own login: %q", r)
		}
		if r := c.ok("STAT"); r != "+OK 0 0" {
			t.Errorf("mallory's STAT %q, want an empty mailbox", r)
		}
		c.quit()
		if n := waitLogLines(dc, loginLine(victim, "PLAIN"), 2); n != 1 { // the direct check above
			t.Errorf("%d PLAIN logins as %s in Dovecot's log, want 1", n, victim)
		}
		waitFor(t, 5*time.Second, "mallory's session line", func() bool {
			for _, e := range caddyEntries(p.log()) {
				if e["msg"] == "session" && e["user"] == mallory {
					if e["upstream_user"] != mallory+"*"+masterUser {
						t.Errorf("session line upstream_user %v", e["upstream_user"])
					}
					return true
				}
			}
			return false
		})
	})

	t.Run("in-use", func(t *testing.T) {
		for _, addr := range []string{plain, withAuth, relayed} {
			holder := dialPOP3(t, dc.POP3Addr, nil)
			holder.login(victim, victimPass)
			c := dialPOP3(t, addr, nil)
			c.ok("USER " + victim)
			start := time.Now()
			r := c.cmd("PASS " + victimPass)
			took := time.Since(start)
			if !strings.HasPrefix(r, "-ERR [IN-USE] ") {
				t.Errorf("%s: second session of a locked mailbox got %q", addr, r)
			}
			// Dovecot waits about 10 s for the lock; a failure delay of 20 s
			// would come on top.
			if took > 18*time.Second {
				t.Errorf("%s: [IN-USE] came after %v: a failure delay was applied", addr, took)
			}
			if addr == relayed {
				// The upstream dialled at accept, whose timestamp the greeting
				// carries, closed after its [IN-USE]: so does the session.
				c.expectClosed()
				holder.quit()
				continue
			}
			c.ok("NOOP") // the session goes on
			holder.quit()
			c.ok("USER " + victim)
			c.ok("PASS " + victimPass) // the lock is gone: the same session logs in
			c.quit()
		}
		for _, e := range caddyEntries(p.log()) {
			if e["msg"] == "event" && e["name"] == "pop3_auth_failed" {
				t.Errorf("pop3_auth_failed for a locked mailbox: %v", e)
			}
			if e["msg"] == "login failed" {
				t.Errorf("a locked mailbox logged as a failed login: %v", e)
			}
		}
	})
}
