//go:build integration

package integration

// Fault tests: a Caddy under load while its parts fail. An upstream Dovecot
// killed while 50 sessions stream a RETR, an auth_http server stopped and
// started again under a login load, clients that stop reading, and a config
// reload every second while sessions log in and stream. Every session must
// end with a clean -ERR or close, nothing may hang, and afterwards Caddy is
// back at its baseline of descriptors, goroutines and parked sessions
// (caddyBaseline).

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// --- baseline ------------------------------------------------------------------

// caddyBaseline is what a Caddy process holds at one moment: its open
// descriptors (readlink of /proc/PID/fd), its goroutines (from the admin
// endpoint's /debug/pprof/goroutine, grouped by stack) and its active and
// parked sessions (from /metrics).
type caddyBaseline struct {
	fds        map[string]string // fd → readlink target
	goroutines int
	stacks     map[string]int // stack (function names) → goroutines
	active     float64
	parked     float64
}

// probeClient asks the admin endpoint without keeping connections open,
// which would count as descriptors of Caddy's.
var probeClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func (a *adminCaddy) get(path string) ([]byte, error) {
	resp, err := probeClient.Get("http://" + a.admin + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	return b, err
}

var goroutineTotal = regexp.MustCompile(`^goroutine profile: total (\d+)`)

// snapshot takes one baseline. Two forced GCs first (pprof's heap?gc=1)
// let sync.Pool drop what it caches, such as splice(2) pipes, whose
// descriptors close with them.
func (a *adminCaddy) snapshot() (caddyBaseline, error) {
	adminClient.CloseIdleConnections() // keep-alive connections of earlier requests
	for i := 0; i < 2; i++ {
		if _, err := a.get("/debug/pprof/heap?gc=1"); err != nil {
			return caddyBaseline{}, err
		}
	}
	var b caddyBaseline
	prof, err := a.get("/debug/pprof/goroutine?debug=1")
	if err != nil {
		return b, err
	}
	m := goroutineTotal.FindSubmatch(prof)
	if m == nil {
		return b, fmt.Errorf("goroutine profile without a total: %.200q", prof)
	}
	b.goroutines, _ = strconv.Atoi(string(m[1]))
	b.stacks = goroutineStacks(prof)
	metrics, err := a.get("/metrics")
	if err != nil {
		return b, err
	}
	for _, l := range strings.Split(string(metrics), "\n") {
		if v, ok := strings.CutPrefix(l, pfx+"active_sessions "); ok {
			b.active, _ = strconv.ParseFloat(v, 64)
		}
		if v, ok := strings.CutPrefix(l, pfx+"parked_sessions "); ok {
			b.parked, _ = strconv.ParseFloat(v, 64)
		}
	}
	if !strings.Contains(string(metrics), pfx+"parked_sessions ") {
		return b, errors.New("no " + pfx + "parked_sessions in /metrics")
	}
	dir := fmt.Sprintf("/proc/%d/fd", a.cmd.Process.Pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return b, err
	}
	b.fds = map[string]string{}
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			b.fds[e.Name()] = target
		}
	}
	return b, nil
}

// goroutineStacks groups a debug=1 goroutine profile by the function names
// of each stack.
func goroutineStacks(prof []byte) map[string]int {
	out := map[string]int{}
	for _, rec := range strings.Split(string(prof), "\n\n") {
		lines := strings.Split(strings.TrimSpace(rec), "\n")
		n, err := strconv.Atoi(strings.Fields(lines[0] + " x")[0])
		if err != nil {
			continue
		}
		var funcs []string
		for _, l := range lines[1:] {
			if f := strings.Fields(l); len(f) >= 3 && f[0] == "#" {
				fn, _, _ := strings.Cut(f[2], "+0x")
				funcs = append(funcs, fn)
			}
		}
		out[strings.Join(funcs, " < ")] += n
	}
	return out
}

func (a *adminCaddy) baseline(t *testing.T) caddyBaseline {
	t.Helper()
	b, err := a.snapshot()
	if err != nil {
		t.Fatalf("baseline: %v", err)
	}
	return b
}

// Tolerances of expectBaseline: a descriptor or two (a connection the
// admin endpoint is closing) and a few goroutines (its handler).
const (
	fdSlack        = 2
	goroutineSlack = 4
)

// expectBaseline waits up to d for Caddy to be back at base: no session
// active or parked, no more descriptors and goroutines than the slack
// allows. It fails with the descriptors and goroutine stacks left over.
func (a *adminCaddy) expectBaseline(t *testing.T, base caddyBaseline, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		now, err := a.snapshot()
		if err != nil {
			t.Fatalf("baseline check: %v", err)
		}
		diff := base.diff(now)
		if diff == "" {
			t.Logf("caddy %s back at its baseline after %v", a.name, d-time.Until(deadline).Round(time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy %s not back at its baseline within %v:\n%s", a.name, d, diff)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (b caddyBaseline) diff(now caddyBaseline) string {
	var out []string
	if now.active != 0 || now.parked != b.parked {
		out = append(out, fmt.Sprintf("active_sessions %v (want 0), parked_sessions %v (baseline %v)", now.active, now.parked, b.parked))
	}
	if len(now.fds) > len(b.fds)+fdSlack {
		var lines []string
		for fd, target := range now.fds {
			if b.fds[fd] != target {
				lines = append(lines, "  + fd "+fd+" -> "+target)
			}
		}
		sort.Strings(lines)
		out = append(out, fmt.Sprintf("%d descriptors open, baseline %d; new:\n%s", len(now.fds), len(b.fds), strings.Join(lines, "\n")))
	}
	if now.goroutines > b.goroutines+goroutineSlack {
		var lines []string
		for stack, n := range now.stacks {
			if n > b.stacks[stack] {
				lines = append(lines, fmt.Sprintf("  +%d %s", n-b.stacks[stack], stack))
			}
		}
		sort.Strings(lines)
		out = append(out, fmt.Sprintf("%d goroutines, baseline %d; more of:\n%s", now.goroutines, b.goroutines, strings.Join(lines, "\n")))
	}
	return strings.Join(out, "\n")
}

// --- helpers ---------------------------------------------------------------------

// faultCaddy starts a Caddy with an admin endpoint and one pop3 listener
// at addr in front of upstream, with the handler options in body.
func faultCaddy(t *testing.T, name, addr, upstream, body string) *adminCaddy {
	t.Helper()
	return startAdminCaddy(t, name, func(admin string) string {
		return faultCaddyfile(admin, addr, upstream, body)
	}, listener{addr: addr})
}

func faultCaddyfile(admin, addr, upstream, body string) string {
	return fmt.Sprintf(`{
	admin %s
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
					auth_failure_delay 1ms
%s
				}
			}
		}
	}
}
`, admin, addr, upstream, indent(body, "\t\t\t\t\t"))
}

// retrPrefix reads a RETR body from r and checks each byte against want
// (the raw bytes after the +OK line) as it comes, so that nothing but a
// prefix of the message arrives. It returns how many bytes came and the
// read error that ended it (nil once all of want came).
func retrPrefix(r io.Reader, want []byte, off int, limit int) (int, error) {
	buf := make([]byte, 64<<10)
	for off < len(want) && (limit <= 0 || off < limit) {
		b := buf
		if limit > 0 {
			b = buf[:min(len(buf), limit-off)]
		}
		n, err := r.Read(b)
		if n > len(want)-off || !bytes.Equal(buf[:n], want[off:off+n]) {
			return off, fmt.Errorf("bytes %d..%d differ from the message", off, off+n)
		}
		off += n
		if err != nil {
			return off, err
		}
	}
	return off, nil
}

// --- upstream killed mid-RETR ---------------------------------------------------

// TestFaultUpstreamKilledMidRetr SIGKILLs a Dovecot while 50 clients are in
// the middle of a 32 MiB RETR through the proxy and 10 more sit parked:
// each streaming client gets what was in flight, a prefix of the message,
// then a clean EOF, and each parked one a clean EOF, within a few seconds; a new login gets -ERR [SYS/TEMP] at once; Caddy is back at its
// baseline.
func TestFaultUpstreamKilledMidRetr(t *testing.T) {
	need(t)
	const user, pass = "fault-kill", "fault-kill-Secr3t-pw"
	usedSecret(user, pass)
	b := &backend{cfg: dovecot.Config{
		Dir:   filepath.Join(t.TempDir(), "kill"),
		Users: []dovecot.User{{Name: user, Password: pass, Messages: env.bigMsgs}},
	}}
	var err error
	if b.dc, err = dovecot.Start(b.cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.dc.Stop() })
	addr := freePortT(t)
	a := faultCaddy(t, "fault-kill", addr, b.dc.POP3Addr, "")
	base := a.baseline(t)
	want := append(stuffed(env.bigMsgs[1]), ".\r\n"...)

	// Idle sessions that park while the others start streaming.
	var idle []*client
	for i := 0; i < 10; i++ {
		c := dialPOP3(t, addr, nil)
		c.login(user, pass)
		idle = append(idle, c)
	}
	const n = 50
	const head = 256 << 10 // read before the kill
	var ready, done sync.WaitGroup
	killed := make(chan struct{})
	type outcome struct {
		got int
		err error
	}
	results := make([]outcome, n)
	for i := 0; i < n; i++ {
		c := dialPOP3(t, addr, nil)
		c.login(user, pass)
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			res := &results[i]
			if _, err := io.WriteString(c.conn, "RETR 2\r\n"); err != nil {
				res.err = err
				ready.Done()
				return
			}
			line, err := c.r.ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "+OK") {
				res.err = fmt.Errorf("RETR 2: %q %v", line, err)
				ready.Done()
				return
			}
			res.got, res.err = retrPrefix(c.r, want, 0, head)
			ready.Done()
			if res.err != nil {
				return
			}
			<-killed
			c.deadline(15 * time.Second)
			res.got, res.err = retrPrefix(c.r, want, res.got, 0)
		}()
	}
	ready.Wait()
	waitFor(t, 10*time.Second, "the idle sessions to park", func() bool {
		return a.metrics(t).get(pfx+"parked_sessions") >= float64(len(idle))
	})
	b.kill(t)
	kill := time.Now()
	close(killed)
	done.Wait()
	cut, least := 0, len(want)
	for i, r := range results {
		// A client may get the whole message: what the kernel buffered
		// on both legs when Dovecot died was all of it.
		if r.err != nil && !errors.Is(r.err, io.EOF) {
			t.Errorf("client %d: ended after %d bytes with %v, want a clean EOF", i, r.got, r.err)
		}
		if r.got < len(want) {
			cut++
		}
		least = min(least, r.got)
	}
	t.Logf("%d of %d RETRs cut by the kill, the shortest after %d of %d bytes", cut, n, least, len(want))
	if cut < n/2 {
		t.Errorf("only %d of %d RETRs were cut by the kill: the test did not kill Dovecot mid-RETR", cut, n)
	}
	for i, c := range idle {
		c.deadline(5 * time.Second)
		if rest, err := io.ReadAll(c.r); err != nil || len(rest) > 0 {
			t.Errorf("parked session %d: %q, %v after the kill, want a clean EOF", i, rest, err)
		}
	}
	if d := time.Since(kill); d > 5*time.Second {
		t.Errorf("the clients took %v after the kill to see the end", d)
	}

	start := time.Now()
	c := dialPOP3(t, addr, nil)
	c.ok("USER " + user)
	if got := c.cmd("PASS " + pass); sansID(got) != replyUnavailable || time.Since(start) > 3*time.Second {
		t.Errorf("login with the upstream dead: %q after %v, want %q at once", got, time.Since(start), replyUnavailable)
	}
	c.expectClosed()
	a.expectBaseline(t, base, 10*time.Second)
	noCaddyErrors(t, a.caddyProc)
}

// --- auth server restarted under load ---------------------------------------------

// TestFaultAuthServerRestarts stops the auth_http server and starts it again
// on the same port, six times, while eight clients log in over and over:
// a login while it is down gets -ERR [SYS/TEMP] within the auth_http
// timeout, the others log in and see their mailbox, no reply is anything
// else, and Caddy is back at its baseline.
func TestFaultAuthServerRestarts(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{alice: {Password: alicePass, Server: env.dc.POP3Addr}}, NoWait: true}
	u, _ := url.Parse(as.Start(t))
	auth := newSwitchableAuth(t, u.Host)
	auth.set("up")
	const timeout = time.Second
	addr := freePortT(t)
	a := faultCaddy(t, "fault-auth", addr, "", fmt.Sprintf("auth_http http://%s/auth {\n\ttimeout %s\n}", auth.addr, timeout))
	aliceStat := directSTAT(t, env.dc, alice, alicePass)
	base := a.baseline(t)

	var ok, temp atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := authLoadLogin(addr, aliceStat, timeout+time.Second, &ok, &temp); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for i := 0; i < 6; i++ {
		time.Sleep(500 * time.Millisecond)
		auth.set("down") // closes its listener and every connection in flight
		time.Sleep(400 * time.Millisecond)
		auth.set("up")
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d logins, %d answered -ERR [SYS/TEMP]", ok.Load(), temp.Load())
	if ok.Load() < 20 || temp.Load() == 0 {
		t.Errorf("%d logins and %d [SYS/TEMP] refusals: want many of each", ok.Load(), temp.Load())
	}
	c := dialPOP3(t, addr, nil)
	c.login(alice, alicePass)
	c.quit()
	auth.set("down") // Caddy's idle connections to it close
	a.expectBaseline(t, base, 10*time.Second)
	noCaddyErrors(t, a.caddyProc)
}

// authLoadLogin is one session of TestFaultAuthServerRestarts: it counts a
// login or a [SYS/TEMP] refusal, and returns an error for anything else.
func authLoadLogin(addr, stat string, within time.Duration, ok, temp *atomic.Int64) error {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	r := bufio.NewReader(conn)
	cmd := func(line string) (string, error) {
		if line != "" {
			if _, err := io.WriteString(conn, line+"\r\n"); err != nil {
				return "", err
			}
		}
		l, err := r.ReadString('\n')
		if err != nil {
			return l, fmt.Errorf("%s: %w (got %q)", redact(line), err, l)
		}
		return strings.TrimSuffix(l, "\r\n"), nil
	}
	if g, err := cmd(""); err != nil || !strings.HasPrefix(g, "+OK") {
		return fmt.Errorf("greeting %q %v", g, err)
	}
	if got, err := cmd("USER " + alice); err != nil || !strings.HasPrefix(got, "+OK") {
		return fmt.Errorf("USER: %q %v", got, err)
	}
	start := time.Now()
	got, err := cmd("PASS " + alicePass)
	took := time.Since(start)
	if err != nil {
		return fmt.Errorf("after %v: %w", took, err)
	}
	if took > within {
		return fmt.Errorf("login answered %q after %v, want within %v", got, took, within)
	}
	switch {
	case got == "+OK Logged in.":
		if s, err := cmd("STAT"); err != nil || s != stat {
			return fmt.Errorf("STAT %q %v, want %q", s, err, stat)
		}
		ok.Add(1)
	case strings.HasPrefix(got, "-ERR [SYS/TEMP] "):
		temp.Add(1)
	default:
		return fmt.Errorf("login answered %q", got)
	}
	if q, err := cmd("QUIT"); err != nil || !strings.HasPrefix(q, "+OK") {
		return fmt.Errorf("QUIT: %q %v", q, err)
	}
	if rest, err := io.ReadAll(r); err != nil || len(rest) > 0 {
		return fmt.Errorf("after QUIT: %q %v, want a clean close", rest, err)
	}
	return nil
}

// --- clients that stop reading --------------------------------------------------

// TestFaultClientsStopReading: clients that stop reading must not hold a
// session for ever. With proxy_timeout and timeout 2s, clients that stop
// reading in the middle of a 32 MiB RETR are closed after proxy_timeout,
// and one that sends commands before login and never reads the replies
// after timeout; then Caddy is back at its baseline.
func TestFaultClientsStopReading(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	const limit = 2 * time.Second
	addr := freePortT(t)
	a := faultCaddy(t, "fault-stall", addr, env.dc.POP3Addr, fmt.Sprintf("timeout %s\nproxy_timeout %s", limit, limit))
	base := a.baseline(t)
	var wg sync.WaitGroup
	t.Run("stalls", func(t *testing.T) { stopReadingCases(t, a, addr, limit, &wg) })
	wg.Wait()
	a.expectBaseline(t, base, 10*time.Second)
	noCaddyErrors(t, a.caddyProc)
}

// stopReadingCases are the cases of TestFaultClientsStopReading, run in
// parallel.
func stopReadingCases(t *testing.T, a *adminCaddy, addr string, limit time.Duration, wg *sync.WaitGroup) {
	gone := func(t *testing.T, c *client) bool {
		return bySession(a.sessions(t, ""), c) == nil
	}
	t.Run("mid-RETR", func(t *testing.T) {
		t.Parallel()
		want := append(stuffed(env.bigMsgs[1]), ".\r\n"...)
		var stalled []*client
		for i := 0; i < 10; i++ {
			c := dialPOP3(t, addr, nil)
			c.login(big, bigPass)
			c.ok("RETR 2")
			if _, err := retrPrefix(c.r, want, 0, 64<<10); err != nil {
				t.Fatal(err)
			}
			stalled = append(stalled, c)
		}
		start := time.Now()
		for _, c := range stalled {
			for !gone(t, c) && time.Since(start) < limit+5*time.Second {
				time.Sleep(50 * time.Millisecond)
			}
			if !gone(t, c) {
				t.Errorf("a client that stopped reading mid-RETR still has its session %v after proxy_timeout %v", time.Since(start), limit)
			}
		}
		for _, c := range stalled {
			c.deadline(5 * time.Second)
			if _, err := io.Copy(io.Discard, c.r); err != nil {
				t.Errorf("after the session ended: %v, want the buffered bytes and EOF", err)
			}
		}
	})

	t.Run("before-login", func(t *testing.T) {
		t.Parallel()
		c := dialPOP3(t, addr, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			// CAPA replies fill the socket buffers both ways; the client
			// never reads them.
			c.deadline(limit + 10*time.Second)
			_, _ = io.WriteString(c.tcp, strings.Repeat("CAPA\r\n", 200000))
		}()
		start := time.Now()
		time.Sleep(200 * time.Millisecond)
		for !gone(t, c) && time.Since(start) < limit+5*time.Second {
			time.Sleep(50 * time.Millisecond)
		}
		if !gone(t, c) {
			t.Errorf("a client that sends commands and never reads still has its session %v after timeout %v: the session is stuck writing replies, with no write deadline before login", time.Since(start), limit)
			// The admin API must be able to end it all the same.
			a.kick(t, "remote="+url.QueryEscape(c.tcp.LocalAddr().String()))
			kicked := time.Now()
			for !gone(t, c) && time.Since(kicked) < 3*time.Second {
				time.Sleep(50 * time.Millisecond)
			}
			if !gone(t, c) {
				t.Errorf("DELETE /pop3/sessions did not end the stuck session either within 3s")
			}
		}
		c.tcp.Close()
	})
}

// --- reload every second under load -----------------------------------------------

// TestFaultReloadEverySecond loads a new config (POST /load) every second for
// ten seconds while clients log in, read their mail and quit (plain and
// implicit_tls), and two clients stream the 32 MiB message slowly across
// the reloads: every
// greeting is one of the two configs', every login succeeds, every reply is
// Dovecot's, the long RETRs are byte-exact, and Caddy is back at its
// baseline.
func TestFaultReloadEverySecond(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(big, bigPass)
	addr, tlsAddr := freePortT(t), freePortT(t)
	greetings := []string{"fault reload A", "fault reload B"}
	cfg := func(admin string, i int) string {
		return fmt.Sprintf(`{
	admin %[1]s
	local_certs
	skip_install_trust
	tls_automate_names localhost
	layer4 {
		%[2]s {
			route {
				pop3 %[4]s {
					starttls off
					auth_failure_delay 1ms
					greeting %[5]q
					proxy_timeout %[6]ds
				}
			}
		}
		%[3]s {
			route {
				pop3 %[4]s {
					implicit_tls
					auth_failure_delay 1ms
					greeting %[5]q
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
	}
}
`, admin, addr, tlsAddr, env.dc.POP3Addr, greetings[i%2], 60+i)
	}
	a := startAdminCaddy(t, "fault-reload", func(admin string) string { return cfg(admin, 0) }, listener{addr: addr}, listener{addr: tlsAddr, tls: true})
	tlsCfg, err := a.tlsConfig()
	if err != nil {
		t.Fatal(err)
	}
	dials := []func() (net.Conn, error){
		func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 5*time.Second) },
		func() (net.Conn, error) {
			return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", tlsAddr, tlsCfg)
		},
	}

	direct := dialPOP3(t, env.dc.POP3Addr, nil)
	direct.login(alice, alicePass)
	want := direct.transcript("STAT", "LIST", "RETR 1", "RETR 2", "RETR 3")
	direct.quit()
	bigSum, bigSize := bigRetrBody()
	base := a.baseline(t)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var logins, resets atomic.Int64
	for w := 0; w < 4; w++ {
		dial := dials[w%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := reloadLoadSession(dial, greetings, want)
				if errors.Is(err, errResetInAcceptQueue) {
					resets.Add(1)
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				logins.Add(1)
			}
		}()
	}
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialPOP3(t, addr, nil)
			c.login(big, bigPass)
			c.ok("RETR 2")
			// About 4 MiB/s: the 32 MiB span the reloads.
			h := sha256.New()
			buf := make([]byte, 256<<10)
			end := []byte("\r\n.\r\n")
			var tail []byte
			var size int64
			c.deadline(60 * time.Second)
			const rate = 4 << 20 // bytes per second
			start := time.Now()
			for {
				n, err := c.r.Read(buf)
				h.Write(buf[:n])
				size += int64(n)
				tail = append(tail, buf[:n]...)
				if len(tail) > len(end) {
					tail = tail[len(tail)-len(end):]
				}
				if size >= bigSize && bytes.Equal(tail, end) {
					break
				}
				if err != nil {
					t.Errorf("long RETR after %d of %d bytes: %v", size, bigSize, err)
					return
				}
				time.Sleep(time.Until(start.Add(time.Duration(size) * time.Second / rate)))
			}
			if size != bigSize || [32]byte(h.Sum(nil)) != bigSum {
				t.Errorf("long RETR across reloads: %d bytes (want %d), sha256 differs: %v", size, bigSize, [32]byte(h.Sum(nil)) != bigSum)
			}
			c.quit()
		}()
	}
	for i := 1; i <= 10; i++ {
		time.Sleep(time.Second)
		a.loadCaddyfile(t, cfg(a.admin, i))
	}
	close(stop)
	wg.Wait()
	t.Logf("%d sessions during the reloads; %d connections reset before the greeting", logins.Load(), resets.Load())
	if logins.Load() < 20 {
		t.Errorf("only %d sessions during 10 s of reloads", logins.Load())
	}
	if resets.Load() > logins.Load()/20 {
		t.Errorf("%d of %d connections reset before the greeting: more than the old listener's accept queue at each reload explains", resets.Load(), logins.Load()+resets.Load())
	}
	a.expectBaseline(t, base, 15*time.Second)
	noCaddyErrors(t, a.caddyProc)
}

// errResetInAcceptQueue: a connection reset before anything was read from
// it. Caddy gives each config its own SO_REUSEPORT listener, and Linux
// resets the connections still queued on the old one when it closes at a
// reload (the kernel's behaviour, not the handler's: no session existed).
var errResetInAcceptQueue = errors.New("connection reset before the greeting")

// reloadLoadSession is one session of TestFaultReloadEverySecond.
func reloadLoadSession(dial func() (net.Conn, error), greetings, want []string) error {
	conn, err := dial()
	if errors.Is(err, syscall.ECONNRESET) {
		return errResetInAcceptQueue // at connect, or in the implicit_tls handshake
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(conn)
	line := func() (string, error) {
		l, err := r.ReadString('\n')
		if err != nil || !strings.HasSuffix(l, "\r\n") {
			return l, fmt.Errorf("reading: %q: %w", l, err)
		}
		return strings.TrimSuffix(l, "\r\n"), nil
	}
	cmd := func(c string) (string, error) {
		if _, err := io.WriteString(conn, c+"\r\n"); err != nil {
			return "", err
		}
		return line()
	}
	g, err := line()
	if err != nil && g == "" && errors.Is(err, syscall.ECONNRESET) {
		return errResetInAcceptQueue
	}
	if err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if g != "+OK "+greetings[0] && g != "+OK "+greetings[1] {
		return fmt.Errorf("greeting %q, want one of %q", g, greetings)
	}
	if r, err := cmd("USER " + alice); err != nil || !strings.HasPrefix(r, "+OK") {
		return fmt.Errorf("USER: %q %v", r, err)
	}
	if r, err := cmd("PASS " + alicePass); err != nil || r != "+OK Logged in." {
		return fmt.Errorf("login during reloads: %q %v", r, err)
	}
	var got []string
	for _, c := range []string{"STAT", "LIST", "RETR 1", "RETR 2", "RETR 3"} {
		r, err := cmd(c)
		if err != nil {
			return err
		}
		got = append(got, c+" => "+r)
		if strings.HasPrefix(r, "+OK") && isMulti(c) {
			for {
				l, err := line()
				if err != nil {
					return err
				}
				if l == "." {
					break
				}
				got = append(got, "  "+l)
			}
		}
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("transcript during reloads differs from Dovecot's:\n%s", diffLines(got, want))
	}
	if r, err := cmd("QUIT"); err != nil || !strings.HasPrefix(r, "+OK") {
		return fmt.Errorf("QUIT: %q %v", r, err)
	}
	if rest, err := io.ReadAll(r); err != nil || len(rest) > 0 {
		return fmt.Errorf("after QUIT: %q %v, want a clean close", rest, err)
	}
	return nil
}
