//go:build integration

package integration

// contrib/fail2ban checked against a real Caddy's log: fail2ban-regex with
// the filter must find exactly the failed logins, by client address, and
// fail2ban-client must accept the jail. Debian's fail2ban package has both
// tools (scripts/install-deps.sh installs it). A missing fail2ban fails the
// tests unless the developer opted out with POP3_TEST_NO_FAIL2BAN=1
// (scripts/test.sh ignores that in CI).

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	f2bFilter = "../contrib/fail2ban/filter.d/caddy-pop3.conf"
	f2bJail   = "../contrib/fail2ban/jail.d/caddy-pop3.conf"
)

// fail2banTools fails the test (or skips it, opted out) when fail2ban's
// command-line tools are missing.
func fail2banTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"fail2ban-regex", "fail2ban-client"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("POP3_TEST_NO_FAIL2BAN") == "1" && os.Getenv("CI") == "" {
				t.Skip("fail2ban not installed and POP3_TEST_NO_FAIL2BAN=1")
			}
			t.Fatalf("%s (Debian package fail2ban, scripts/install-deps.sh) is needed: %v", tool, err)
		}
	}
}

// TestFail2banFilter runs Caddy with the pop3 handler's log in a JSON file,
// as contrib/README.md shows, makes failed logins from 127.0.0.2, 127.0.0.3
// and ::1 (127.0.0.2's third starts a failures_per_ip block, and its fourth
// is refused by it), and sessions that are not failures (a good login, a
// second one refused with [IN-USE] by sessions_per_user, an upstream that
// is down: [SYS/TEMP]), and runs fail2ban-regex with the filter over the
// file. It must match the "login failed" and "login blocked" lines and
// nothing else, each with the client's address as the host, also with the
// prefix the systemd journal backend puts before each message.
func TestFail2banFilter(t *testing.T) {
	need(t)
	fail2banTools(t)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	down, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	// The IPv6 listener takes the IPv4 one's port, free on ::1 as well in
	// all likelihood (freePort picks it outside the ephemeral range).
	_, port, _ := net.SplitHostPort(addr)
	addr6 := net.JoinHostPort("::1", port)
	logFile := filepath.Join(t.TempDir(), "pop3.log")
	cf := fmt.Sprintf(`{
	admin off
	log pop3 {
		output file %[1]s
		format json
		include layer4.handlers.pop3
	}
	layer4 {
		%[2]s %[3]s {
			route {
				pop3 %[5]s {
					starttls off
					auth_failure_delay 1ms
					limits {
						failures_per_ip 3 1m 1m
						sessions_per_user 1
					}
				}
			}
		}
		# the upstream is a closed port: logins get -ERR [SYS/TEMP]
		%[4]s {
			route {
				pop3 %[6]s {
					starttls off
				}
			}
		}
	}
}
`, logFile, addr, addr6, down, env.dc.POP3Addr, env.closedPort)
	startCaddy(t, "fail2ban", cf, listener{addr: addr}, listener{addr: addr6}, listener{addr: down})

	// The failures. A user name that holds a JSON "remote" field must not
	// give fail2ban another address to ban: JSON escapes its quotes. The
	// last attempt from 127.0.0.2 has the right password, but the block
	// refuses it all the same.
	usedSecret(carol, wrongPass)
	usedSecret(alice, alicePass)
	const crafted = `x","remote":"192.0.2.66:110","y":"`
	failures := []struct{ local, addr, user, pass string }{
		{"127.0.0.2", addr, carol, wrongPass},
		{"127.0.0.2", addr, crafted, wrongPass},
		{"127.0.0.2", addr, alice, wrongPass}, // the third: 127.0.0.2 is blocked
		{"127.0.0.2", addr, alice, alicePass}, // login blocked
		{"127.0.0.3", addr, carol, wrongPass},
		{"127.0.0.3", addr, bob, wrongPass},
		{"::1", addr6, carol, wrongPass},
	}
	wantHosts := map[string]int{"127.0.0.2": 4, "127.0.0.3": 2, "::1": 1}
	var remotes []string // every client's address, as the log names it
	for i, f := range failures {
		c := dialPOP3From(t, f.local, f.addr, nil)
		m := loginMethods[i%2] // USER/PASS and AUTH PLAIN
		if got := m.login(c, f.user, f.pass); sansID(got) != replyAuthFailed {
			t.Fatalf("%s from %s as %q: got %q, want %q", m.name, f.local, f.user, got, replyAuthFailed)
		}
		c.quit()
		remotes = append(remotes, c.tcp.LocalAddr().String())
	}
	// Not failures: a good login with a normal session, a second login of
	// the same user meanwhile ([IN-USE]), and a login the proxy cannot pass
	// on ([SYS/TEMP]), from an address with failures.
	c := dialPOP3From(t, "127.0.0.1", addr, nil)
	c.login(alice, alicePass)
	c.ok("STAT")
	second := dialPOP3From(t, "127.0.0.1", addr, nil)
	if got := loginMethods[1].login(second, alice, alicePass); !strings.HasPrefix(got, "-ERR [IN-USE] ") {
		t.Fatalf("a second session of %s: got %q, want -ERR [IN-USE]", alice, got)
	}
	second.quit()
	c.quit()
	remotes = append(remotes, c.tcp.LocalAddr().String(), second.tcp.LocalAddr().String())
	c = dialPOP3From(t, "127.0.0.3", down, nil)
	if got := loginMethods[0].login(c, alice, alicePass); sansID(got) != replyUnavailable {
		t.Fatalf("login with the upstream down: got %q, want %q", got, replyUnavailable)
	}
	c.expectClosed()
	remotes = append(remotes, c.tcp.LocalAddr().String())

	entries, lines := waitSessionLines(t, logFile, remotes)
	for _, s := range []string{wrongPass, alicePass} {
		if strings.Contains(strings.Join(lines, "\n"), s) {
			t.Errorf("the log file holds a password sent (%.3q…)", s)
		}
	}

	// What fail2ban must find: Caddy's own "login failed" and "login
	// blocked" lines, the host being the address in "remote". And the lines
	// it must not match are there: the block starting, the [IN-USE]
	// refusal, the upstream down.
	var want []string
	msgs := map[string]int{}
	for i, e := range entries {
		msg := fmt.Sprint(e["msg"])
		msgs[msg]++
		if msg == "login failed" || msg == "login blocked" {
			host, _, err := net.SplitHostPort(fmt.Sprint(e["remote"]))
			if err != nil {
				t.Fatalf("log line %d: remote %q: %v", i+1, e["remote"], err)
			}
			want = append(want, host+"\t"+lines[i])
		}
	}
	if got := countHosts(want); !maps.Equal(got, wantHosts) {
		t.Fatalf("Caddy logged failures by %v, want %v", got, wantHosts)
	}
	for msg, n := range map[string]int{"login failed": 6, "login blocked": 1, "blocked": 1, "limit reached": 1, "upstream unavailable": 1} {
		if msgs[msg] != n {
			t.Errorf("Caddy logged %d %q lines, want %d", msgs[msg], msg, n)
		}
	}

	// The matches, as fail2ban reports them: host, tab, line.
	checkMatches := func(t *testing.T, log string, prefix string) {
		out := fail2banRegex(t, "-o", "<ip>\t<msg>", log, f2bFilter)
		got := strings.Split(strings.TrimRight(out, "\n"), "\n")
		wantHere := make([]string, len(want))
		for i, w := range want {
			host, line, _ := strings.Cut(w, "\t")
			wantHere[i] = host + "\t" + prefix + line
		}
		slices.Sort(got)
		slices.Sort(wantHere)
		if !slices.Equal(got, wantHere) {
			t.Errorf("fail2ban-regex matched:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantHere, "\n"))
		}
		if hosts := countHosts(got); !maps.Equal(hosts, wantHosts) {
			t.Errorf("fail2ban-regex found hosts %v, want %v", hosts, wantHosts)
		}
		// The summary: every line read, none ignored, the failures matched.
		summary := fail2banRegex(t, "--print-all-matched", log, f2bFilter)
		wantSummary := fmt.Sprintf("Lines: %d lines, 0 ignored, %d matched, %d missed", len(lines), len(want), len(lines)-len(want))
		if !strings.Contains(summary, wantSummary) {
			t.Errorf("fail2ban-regex summary lacks %q:\n%s", wantSummary, summary)
		}
		if !strings.Contains(summary, "[processed in") || !regexp.MustCompile(`\[\d+\] "ts":\{EPOCH\}`).MatchString(summary) {
			t.Errorf("fail2ban-regex found no dates with the filter's datepattern:\n%s", summary)
		}
		t.Logf("fail2ban-regex %s %s:\n%s", filepath.Base(log), filepath.Base(f2bFilter), summarySection(summary))
	}
	t.Run("file", func(t *testing.T) { checkMatches(t, logFile, "") })
	t.Run("journal", func(t *testing.T) {
		// fail2ban's systemd backend reads each message as
		// "<hostname> <identifier>[<pid>]: <message>".
		const prefix = "mail caddy[4242]: "
		journal := filepath.Join(t.TempDir(), "journal.log")
		if err := os.WriteFile(journal, []byte(prefix+strings.Join(lines, "\n"+prefix)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		checkMatches(t, journal, prefix)
	})
}

// waitSessionLines waits until logFile holds the "session" line of each
// remote (a session's last line) and returns its entries and lines.
func waitSessionLines(t *testing.T, logFile string, remotes []string) ([]map[string]any, []string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(logFile)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		entries := make([]map[string]any, len(lines))
		ended := map[string]bool{}
		for i, l := range lines {
			if err := json.Unmarshal([]byte(l), &entries[i]); err != nil {
				t.Fatalf("log line %d is not JSON: %v\n%s", i+1, err, l)
			}
			if entries[i]["msg"] == "session" {
				ended[fmt.Sprint(entries[i]["remote"])] = true
			}
		}
		var missing []string
		for _, r := range remotes {
			if !ended[r] {
				missing = append(missing, r)
			}
		}
		if len(missing) == 0 {
			return entries, lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("no session line for %v in %s after 5s:\n%s", missing, logFile, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fail2banRegex runs fail2ban-regex with args and returns its output.
func fail2banRegex(t *testing.T, args ...string) string {
	t.Helper()
	// -r: the hosts are addresses; resolving names only takes time.
	out, err := exec.Command("fail2ban-regex", append([]string{"-r"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("fail2ban-regex %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// summarySection is fail2ban-regex's output from "Results" on.
func summarySection(out string) string {
	if i := strings.Index(out, "Results\n"); i >= 0 {
		return out[i:]
	}
	return out
}

// countHosts counts "host\t..." lines by host.
func countHosts(lines []string) map[string]int {
	m := map[string]int{}
	for _, l := range lines {
		host, _, _ := strings.Cut(l, "\t")
		m[host]++
	}
	return m
}

// TestFail2banJail checks that fail2ban-client accepts the jail with the
// filter, with no server running: a configuration directory made of
// Debian's /etc/fail2ban (its jail.conf, paths and actions), the filter,
// the jail, and a jail.local that points logpath at a file that exists
// (fail2ban refuses a jail without one). -t tests the configuration; -d
// dumps the commands it would send a server, which must start the jail
// with the filter's expression and date pattern.
func TestFail2banJail(t *testing.T) {
	fail2banTools(t)
	const etc = "/etc/fail2ban"
	dir := t.TempDir()
	for _, name := range []string{"fail2ban.conf", "jail.conf", "paths-common.conf", "paths-debian.conf", "action.d", "fail2ban.d"} {
		if _, err := os.Stat(filepath.Join(etc, name)); err != nil {
			t.Fatalf("Debian's fail2ban configuration: %v", err)
		}
		if err := os.Symlink(filepath.Join(etc, name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	logFile := filepath.Join(dir, "pop3.log")
	files := map[string]string{
		"filter.d/caddy-pop3.conf": readFile(t, f2bFilter),
		"jail.d/caddy-pop3.conf":   readFile(t, f2bJail),
		"jail.local":               "[caddy-pop3]\nlogpath = " + logFile + "\n",
		"pop3.log":                 "",
	}
	for name, text := range files {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	client := func(arg string) string {
		out, err := exec.Command("fail2ban-client", "-c", dir, arg).CombinedOutput()
		if err != nil {
			t.Fatalf("fail2ban-client -c %s %s: %v\n%s", dir, arg, err, out)
		}
		return string(out)
	}
	if out := client("-t"); !strings.Contains(out, "OK: configuration test is successful") {
		t.Errorf("fail2ban-client -t:\n%s", out)
	}
	dump := client("-d")
	for _, want := range []string{
		"['add', 'caddy-pop3', ",
		"['set', 'caddy-pop3', 'addfailregex', '^",
		`"msg":"login (?:failed|blocked)"`,
		`['set', 'caddy-pop3', 'datepattern', '"ts":{EPOCH}']`,
		"['set', 'caddy-pop3', 'addlogpath', '" + logFile + "', 'head']",
		"['set', 'caddy-pop3', 'maxretry', 5]",
		"['port', 'pop3,pop3s']",
		"['start', 'caddy-pop3']",
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("fail2ban-client -d: no %s in:\n%s", want, dump)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
