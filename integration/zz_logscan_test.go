//go:build integration

package integration

// This file sorts after the others, so its test runs last and scans the
// logs of every Caddy run of the package.

import (
	"strings"
	"testing"
	"time"
)

// TestLogsHoldNoPasswords scans the output (DEBUG level) of every Caddy
// run so far for every password a test sent and the base64 forms AUTH
// carries. It first makes logins of its own, right and wrong, with every
// method, and sends passwords where they do not belong, so that the scan
// has something to find even when it runs alone; and it checks the log
// holds the session lines of those logins, so that it is not vacuous.
func TestLogsHoldNoPasswords(t *testing.T) {
	need(t)
	usedSecret(bob, bobPass)
	usedSecret(bob, wrongPass)
	for _, m := range loginMethods {
		for _, tg := range []target{proxyPlain("proxy-starttls-on", env.on), proxySTLS()} {
			c := tg.dial(t)
			if got := m.login(c, bob, wrongPass); sansID(got) != replyAuthFailed {
				t.Errorf("%s %s wrong password: %q", tg.name, m.name, got)
			}
			if got := m.login(c, bob, bobPass); !strings.HasPrefix(got, "+OK") {
				t.Fatalf("%s %s: %q", tg.name, m.name, got)
			}
			c.quit()
		}
	}
	// Passwords at the wrong prompt: as a command, as a PASS refused before
	// STLS, after a cancelled AUTH, and as a second line of a failed AUTH.
	c := dialPOP3(t, env.only, nil)
	for _, line := range []string{bobPass, wrongPass, "PASS " + bobPass, "AUTH PLAIN " + b64("\x00"+bob+"\x00"+bobPass)} {
		if got := c.cmd(line); !strings.HasPrefix(got, "-ERR") {
			t.Errorf("%s before STLS: %q", redact(line), got)
		}
	}
	c = dialPOP3(t, env.on, nil)
	if got := c.cmd("AUTH PLAIN"); got != "+ " {
		t.Fatalf("AUTH PLAIN: %q", got)
	}
	if got := c.cmd("*"); !strings.HasPrefix(got, "-ERR [AUTH]") {
		t.Errorf("cancelled AUTH: %q", got)
	}
	c.write(wrongPass + "\r\n" + b64(wrongPass) + "\r\n")
	c.line()
	c.line()
	c.quit()

	// Wait for the session line of bob's logins: it comes when the session
	// ends, a little after the client saw the close.
	shared := env.caddy
	deadline := time.Now().Add(5 * time.Second)
	var sessions, debug int
	for {
		sessions, debug = 0, 0
		for _, e := range caddyEntries(shared.log()) {
			if e["logger"] == "layer4.handlers.pop3" && e["msg"] == "session" && e["level"] == "info" && e["user"] == bob && e["result"] == "ok" {
				sessions++
			}
			if e["level"] == "debug" && e["logger"] == "layer4.handlers.pop3" {
				debug++
			}
		}
		if sessions >= 2*len(loginMethods) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if sessions < 2*len(loginMethods) {
		t.Errorf("shared Caddy log has %d INFO session lines with user %q, want at least %d", sessions, bob, 2*len(loginMethods))
	}
	if debug == 0 {
		t.Errorf("shared Caddy log has no DEBUG lines of the pop3 handler: the scan would not cover debug logging")
	}

	secrets := allSecrets()
	runs := caddyRuns()
	if len(runs) == 0 {
		t.Fatal("no Caddy runs recorded")
	}
	for _, p := range runs {
		log := p.log()
		if strings.TrimSpace(log) == "" {
			t.Errorf("caddy %s: empty log", p.name)
			continue
		}
		// Case-insensitive: an unknown command is logged by its verb in
		// upper case.
		lower := strings.ToLower(log)
		for _, s := range sortedKeys(secrets) {
			if strings.Contains(lower, strings.ToLower(s)) {
				t.Errorf("caddy %s: log holds the %s", p.name, secrets[s])
			}
		}
		t.Logf("caddy %s: scanned %d bytes of log for %d secrets", p.name, len(log), len(secrets))
	}
}
