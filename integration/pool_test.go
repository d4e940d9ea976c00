//go:build integration

package integration

// The upstream pool against real Dovecots: load-balancing policies,
// user_hash stability when a backend leaves and comes back, failover before
// login, passive and active health checks (also across a config reload),
// upstream TLS and STLS with verification, the client's address through
// PROXY v1/v2 and XCLIENT, max_connections and address placeholders.
//
// Every mailbox of a pool backend holds one message whose Subject names the
// backend ("backend-N"), so `TOP 1 0` tells which backend served a session.
//
// This file sorts after logscan_test.go, so TestLogsHoldNoPasswords runs
// before these tests; TestPoolLogsHoldNoPasswords, last here, scans their
// Caddy logs.

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
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

// poolPass is the password of every pool test user.
const poolPass = "pool-Secr3t-pw"

// --- backends ----------------------------------------------------------------

// backend is one Dovecot of a pool test.
type backend struct {
	idx int
	cfg dovecot.Config
	dc  *dovecot.Server
}

// backendUsers returns the users with poolPass and one message whose
// Subject names backend idx.
func backendUsers(idx int, names []string) []dovecot.User {
	msg := mkMessage(fmt.Sprintf("backend-%d", idx), fmt.Sprintf("Served by backend %d.\r\n", idx))
	users := make([]dovecot.User, len(names))
	for i, n := range names {
		users[i] = dovecot.User{Name: n, Password: poolPass, Messages: [][]byte{msg}}
	}
	return users
}

// startBackends starts n Dovecots in parallel, each with the same users;
// extra, if set, gives Config.Extra per backend. They stop when the test
// ends.
func startBackends(t *testing.T, n int, names []string, extra func(i int) string) []*backend {
	t.Helper()
	for _, name := range names {
		usedSecret(name, poolPass)
	}
	root := t.TempDir()
	bs := make([]*backend, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range bs {
		b := &backend{idx: i, cfg: dovecot.Config{Dir: filepath.Join(root, fmt.Sprintf("b%d", i)), Users: backendUsers(i, names)}}
		if extra != nil {
			b.cfg.Extra = extra(i)
		}
		bs[i] = b
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.dc, errs[i] = dovecot.Start(b.cfg)
		}()
	}
	wg.Wait()
	for i, b := range bs {
		if b.dc != nil {
			t.Cleanup(func() { b.stop(t) })
		}
		if errs[i] != nil {
			t.Fatalf("starting backend %d: %v", i, errs[i])
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, b := range bs {
				if b.dc != nil {
					t.Logf("backend %d dovecot log tail:\n%s", b.idx, tail(b.dc.Log(), 15))
				}
			}
		}
	})
	return bs
}

func (b *backend) stop(t *testing.T) {
	t.Helper()
	if err := b.dc.Stop(); err != nil {
		t.Errorf("stopping backend %d: %v", b.idx, err)
	}
}

// restart starts the backend again on the same ports, with the same users
// and messages.
func (b *backend) restart(t *testing.T) {
	t.Helper()
	cfg := b.cfg
	cfg.POP3Addr, cfg.POP3SAddr = b.dc.POP3Addr, b.dc.POP3SAddr
	dc, err := dovecot.Start(cfg)
	if err != nil {
		t.Fatalf("restarting backend %d on %s: %v", b.idx, cfg.POP3Addr, err)
	}
	b.dc = dc
	t.Cleanup(func() { b.stop(t) })
}

// kill sends SIGKILL to the backend's Dovecot process group (master, login
// and mail processes), as a crash would end them; its sockets close without
// a word to the clients.
func (b *backend) kill(t *testing.T) {
	t.Helper()
	conf := filepath.Join(b.cfg.Dir, "dovecot.conf")
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if len(args) == 4 && args[1] == "-F" && args[2] == "-c" && args[3] == conf {
			// dovecot.Start makes the master a process group leader.
			if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
				t.Fatalf("killing backend %d (pid %d): %v", b.idx, pid, err)
			}
			return
		}
	}
	t.Fatalf("backend %d: no dovecot master with config %s found", b.idx, conf)
}

// backendOf asks TOP 1 0 on a logged-in client and returns the N of the
// message's "Subject: backend-N".
func backendOf(c *client) int {
	c.t.Helper()
	c.ok("TOP 1 0")
	n := -1
	for _, l := range c.multi() {
		if s, ok := strings.CutPrefix(l, "Subject: backend-"); ok {
			n, _ = strconv.Atoi(s)
		}
	}
	if n < 0 {
		c.t.Fatalf("%s: message 1 names no backend", c.name)
	}
	return n
}

// --- Caddy -------------------------------------------------------------------

// poolServer is one layer4 server whose route runs the pop3 handler with
// body (plaintext login allowed, failure delay 1ms), after the handlers in
// before.
func poolServer(addr, body string, before ...string) string {
	return fmt.Sprintf("\t\t%s {\n\t\t\troute {\n%s\t\t\t\tpop3 {\n%s\n\t\t\t\t\tstarttls off\n\t\t\t\t\tauth_failure_delay 1ms\n\t\t\t\t}\n\t\t\t}\n\t\t}\n",
		addr, strings.Join(before, ""), indent(body, "\t\t\t\t\t"))
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = prefix + strings.TrimSpace(l)
	}
	return strings.Join(lines, "\n")
}

// poolCaddyfile is a Caddyfile with the given layer4 servers; admin is the
// admin address, or "off".
func poolCaddyfile(admin string, servers ...string) string {
	return fmt.Sprintf("{\n\tadmin %s\n\tlog {\n\t\tlevel DEBUG\n\t}\n\tlayer4 {\n%s\t}\n}\n", admin, strings.Join(servers, ""))
}

// startPoolCaddy runs Caddy with servers (admin off) until the test ends
// and waits for each address to greet.
func startPoolCaddy(t *testing.T, name string, addrs []string, servers ...string) *caddyProc {
	t.Helper()
	var ls []listener
	for _, a := range addrs {
		ls = append(ls, listener{addr: a})
	}
	return startCaddy(t, "pool-"+name, poolCaddyfile("off", servers...), ls...)
}

func freePorts(t *testing.T, n int) []string {
	t.Helper()
	ports := make([]string, n)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = p
	}
	return ports
}

// upstreams is the pool body for addrs, one `upstream` line each.
func upstreams(addrs ...string) string {
	var b strings.Builder
	for _, a := range addrs {
		b.WriteString("upstream " + a + "\n")
	}
	return b.String()
}

func backendAddrs(bs []*backend) []string {
	var addrs []string
	for _, b := range bs {
		addrs = append(addrs, b.dc.POP3Addr)
	}
	return addrs
}

// waitCaddyEntry reports whether a log entry of p matches, waiting up to d
// for one.
func waitCaddyEntry(p *caddyProc, d time.Duration, match func(e map[string]any) bool) bool {
	deadline := time.Now().Add(d)
	for {
		for _, e := range caddyEntries(p.log()) {
			if match(e) {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// --- clients -----------------------------------------------------------------

// poolSession logs in on addr as user with USER/PASS, reads which backend
// serves it and quits. It returns the reply to PASS and the backend (-1
// when the login failed); err is for everything else that went wrong. It
// reports instead of failing the test, so that workers may run it.
func poolSession(addr, user, pass string, o sessionOpts) (reply string, backend int, err error) {
	usedSecret(user, pass)
	reply, s, err := loginFrom(addr, user, pass, o)
	if err != nil {
		return "", -1, err
	}
	defer s.conn.Close()
	if !strings.HasPrefix(reply, "+OK") {
		// A refused login. An unavailable upstream also ends the session:
		// a clean close with nothing after the -ERR.
		if strings.HasPrefix(reply, "-ERR [SYS/TEMP]") {
			if rest, err := io.ReadAll(s.r); err != nil || len(rest) > 0 {
				return reply, -1, fmt.Errorf("after %q: got %q: %v, want the close", reply, rest, err)
			}
		}
		return reply, -1, nil
	}
	if l, err := s.cmd("TOP 1 0"); err != nil || !strings.HasPrefix(l, "+OK") {
		return reply, -1, fmt.Errorf("TOP 1 0: %q: %v", l, err)
	}
	backend = -1
	for {
		l, err := s.line()
		if err != nil {
			return reply, -1, err
		}
		if l == "." {
			break
		}
		if s, ok := strings.CutPrefix(l, "Subject: backend-"); ok {
			backend, _ = strconv.Atoi(s)
		}
	}
	if backend < 0 {
		return reply, -1, fmt.Errorf("message 1 names no backend")
	}
	if err := s.quit(); err != nil {
		return reply, backend, err
	}
	return reply, backend, nil
}

// mustBackend runs poolSession, which must log in, and returns the backend.
func mustBackend(t *testing.T, addr, user string, o sessionOpts) int {
	t.Helper()
	reply, b, err := poolSession(addr, user, poolPass, o)
	if err != nil {
		t.Fatalf("%s as %s: %v", addr, user, err)
	}
	if b < 0 {
		t.Fatalf("%s as %s: login refused: %q", addr, user, reply)
	}
	return b
}

// heldSession logs in as user and keeps the session open; it returns the
// client and its backend.
func heldSession(t *testing.T, addr, user string) (*client, int) {
	t.Helper()
	c := dialPOP3(t, addr, nil)
	c.login(user, poolPass)
	return c, backendOf(c)
}

func counts(backends []int, n int) []int {
	c := make([]int, n)
	for _, b := range backends {
		c[b]++
	}
	return c
}

// --- tests -------------------------------------------------------------------

// TestPoolPolicies sends sessions through one listener per lb_policy in
// front of the same three Dovecots and checks where they land.
func TestPoolPolicies(t *testing.T) {
	need(t)
	names := make([]string, 10)
	for i := range names {
		names[i] = fmt.Sprintf("lb-user-%02d", i)
	}
	bs := startBackends(t, 3, names, nil)
	up := upstreams(backendAddrs(bs)...)
	policies := []string{"least_conn", "round_robin", "first", "user_hash", "ip_hash", "random"}
	addrs := freePorts(t, len(policies))
	listen := map[string]string{}
	var servers []string
	for i, p := range policies {
		listen[p] = addrs[i]
		servers = append(servers, poolServer(addrs[i], up+"lb_policy "+p))
	}
	startPoolCaddy(t, "policies", addrs, servers...)

	// First, while no other session has touched the backends' counts.
	t.Run("least_conn", func(t *testing.T) {
		addr := listen["least_conn"]
		held := map[int][]*client{}
		var got []int
		for i := 0; i < 6; i++ {
			c, b := heldSession(t, addr, names[i])
			held[b] = append(held[b], c)
			got = append(got, b)
		}
		if c := counts(got, 3); c[0] != 2 || c[1] != 2 || c[2] != 2 {
			t.Fatalf("6 held sessions landed %v (sessions per backend %v), want 2 on each", got, c)
		}
		// Free backend 1: the next two sessions must both go there.
		for _, c := range held[1] {
			c.quit()
		}
		held[1] = nil
		time.Sleep(200 * time.Millisecond) // the proxy counts the upstream's close a moment after the client's
		for i := 0; i < 2; i++ {
			c, b := heldSession(t, addr, names[6+i])
			if b != 1 {
				t.Errorf("session %d after freeing backend 1 went to backend %d, want the least loaded 1", i+1, b)
			}
			held[b] = append(held[b], c)
		}
		for _, cs := range held {
			for _, c := range cs {
				c.quit()
			}
		}
	})
	t.Run("round_robin", func(t *testing.T) {
		var got []int
		for i := 0; i < 30; i++ {
			got = append(got, mustBackend(t, listen["round_robin"], names[i%len(names)], sessionOpts{}))
		}
		c := counts(got, 3)
		t.Logf("round_robin: 30 sessions per backend %v", c)
		if c[0] != 10 || c[1] != 10 || c[2] != 10 {
			t.Errorf("30 sequential sessions per backend %v, want 10 each: %v", c, got)
		}
		for i := 3; i < len(got); i++ {
			if got[i] != got[i-3] {
				t.Errorf("session %d went to backend %d, session %d to %d: not a rotation", i-2, got[i-3], i+1, got[i])
				break
			}
		}
	})
	t.Run("first", func(t *testing.T) {
		for i := 0; i < 10; i++ {
			if b := mustBackend(t, listen["first"], names[i], sessionOpts{}); b != 0 {
				t.Errorf("session %d went to backend %d, want the first", i+1, b)
			}
		}
	})
	t.Run("user_hash", func(t *testing.T) {
		home := map[string]int{}
		for round := 0; round < 3; round++ {
			for _, n := range names {
				user := n
				if round == 2 {
					user = strings.ToUpper(n) // the same mailbox for Dovecot (auth_username_format %Lu) and for user_hash
				}
				b := mustBackend(t, listen["user_hash"], user, sessionOpts{})
				if round == 0 {
					home[n] = b
				} else if b != home[n] {
					t.Errorf("round %d: %s went to backend %d, first to %d", round+1, user, b, home[n])
				}
			}
		}
		used := map[int]bool{}
		for _, b := range home {
			used[b] = true
		}
		if len(used) < 2 {
			t.Errorf("10 users all hashed to one backend: %v", home)
		}
	})
	t.Run("ip_hash", func(t *testing.T) {
		// Every session from 127.0.0.1 to one backend, and each of several
		// loopback source addresses to its own, not all the same.
		var got []int
		for i := 0; i < 6; i++ {
			got = append(got, mustBackend(t, listen["ip_hash"], names[i], sessionOpts{local: "127.0.0.1"}))
		}
		if c := counts(got, 3); c[got[0]] != len(got) {
			t.Errorf("sessions from 127.0.0.1 went to backends %v, want all to one", got)
		}
		used := map[int]bool{}
		for ip := 10; ip < 22; ip++ {
			src := fmt.Sprintf("127.0.0.%d", ip)
			a := mustBackend(t, listen["ip_hash"], names[ip%len(names)], sessionOpts{local: src})
			b := mustBackend(t, listen["ip_hash"], names[(ip+1)%len(names)], sessionOpts{local: src})
			if a != b {
				t.Errorf("two sessions from %s went to backends %d and %d", src, a, b)
			}
			used[a] = true
		}
		if len(used) < 2 {
			t.Errorf("12 client addresses all hashed to one backend")
		}
	})
	t.Run("random", func(t *testing.T) {
		var got []int
		for i := 0; i < 30; i++ {
			got = append(got, mustBackend(t, listen["random"], names[i%len(names)], sessionOpts{}))
		}
		c := counts(got, 3)
		t.Logf("random: 30 sessions per backend %v", c)
		if c[0] == 0 || c[1] == 0 || c[2] == 0 {
			t.Errorf("30 random sessions per backend %v, want each used", c)
		}
	})
}

// TestPoolUserHashMovement logs in 300 users through user_hash (the default
// policy) over three Dovecots, stops one, logs them in again (failover
// before login, no client-visible error), and restarts it on the same port:
// only the stopped backend's users may move, and they must come back.
func TestPoolUserHashMovement(t *testing.T) {
	need(t)
	const nUsers = 300
	names := make([]string, nUsers)
	for i := range names {
		names[i] = fmt.Sprintf("mover-%03d", i)
	}
	bs := startBackends(t, 3, names, nil)
	addr := freePorts(t, 1)[0]
	p := startPoolCaddy(t, "user-hash", []string{addr}, poolServer(addr, upstreams(backendAddrs(bs)...)))

	// all logs every user in, 8 at a time, and returns each one's backend.
	all := func(phase string) []int {
		t.Helper()
		start := time.Now()
		got := make([]int, nUsers)
		errs := make([]string, nUsers)
		next := atomic.Int64{}
		var wg sync.WaitGroup
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1) - 1); i < nUsers; i = int(next.Add(1) - 1) {
					reply, b, err := poolSession(addr, names[i], poolPass, sessionOpts{})
					got[i] = b
					if err != nil {
						errs[i] = err.Error()
					} else if b < 0 {
						errs[i] = "login refused: " + reply
					}
				}
			}()
		}
		wg.Wait()
		failed := 0
		for i, e := range errs {
			if e != "" {
				if failed < 5 {
					t.Errorf("%s: %s: %s", phase, names[i], e)
				}
				failed++
			}
		}
		if failed > 0 {
			t.Fatalf("%s: %d of %d logins failed", phase, failed, nUsers)
		}
		t.Logf("%s: %d logins in %v", phase, nUsers, time.Since(start).Round(time.Millisecond))
		return got
	}

	before := all("all backends up")
	c := counts(before, 3)
	t.Logf("user_hash: users per backend %v", c)
	for i, n := range c {
		if n < nUsers/6 || n > nUsers/2 {
			t.Errorf("backend %d has %d of %d users, want about a third", i, n, nUsers)
		}
	}

	const down = 1
	bs[down].stop(t)
	during := all("backend 1 stopped")
	moved, wrong := 0, 0
	for i := range names {
		switch {
		case during[i] == before[i]:
		case before[i] == down:
			moved++
		default:
			wrong++
			if wrong <= 5 {
				t.Errorf("%s moved from live backend %d to %d", names[i], before[i], during[i])
			}
		}
		if during[i] == down {
			t.Errorf("%s was served by the stopped backend", names[i])
		}
	}
	share := float64(moved) / nUsers
	t.Logf("user_hash: %d of %d users moved (%.1f%%), ideal 1/3", moved, nUsers, 100*share)
	if wrong > 0 {
		t.Errorf("%d users of live backends moved, want none", wrong)
	}
	if share < 0.2 || share > 0.45 {
		t.Errorf("moved share %.3f, want between 0.2 and 0.45", share)
	}
	// Each moved user goes to its own second choice, so the stopped
	// backend's load spreads over both others instead of landing on one.
	to := map[int]int{}
	for i := range names {
		if before[i] == down {
			to[during[i]]++
		}
	}
	t.Logf("user_hash: the moved users went to backend 0: %d, backend 2: %d", to[0], to[2])
	if to[0] < moved/4 || to[2] < moved/4 {
		t.Errorf("the moved users went to backend 0: %d, backend 2: %d; want each at least a quarter", to[0], to[2])
	}
	// The failed attempts on the stopped backend are warnings, never
	// errors the client sees.
	if !waitCaddyEntry(p, 5*time.Second, func(e map[string]any) bool {
		return e["msg"] == "upstream unavailable" && e["upstream"] == bs[down].dc.POP3Addr
	}) {
		t.Errorf("no \"upstream unavailable\" entry for the stopped backend %s", bs[down].dc.POP3Addr)
	}

	bs[down].restart(t)
	after := all("backend 1 restarted")
	back := 0
	for i := range names {
		if after[i] != before[i] {
			t.Errorf("%s: backend %d after the restart, %d before the stop", names[i], after[i], before[i])
		} else if before[i] == down {
			back++
		}
	}
	t.Logf("user_hash: %d of %d moved users returned to the restarted backend", back, moved)
}

// TestPoolBackendKilled kills a Dovecot (SIGKILL) under logged-in
// sessions: those sessions end with a clean EOF at once, the sessions on
// the other backends go on, and new sessions avoid the dead backend.
func TestPoolBackendKilled(t *testing.T) {
	need(t)
	names := []string{"kill-user-0", "kill-user-1", "kill-user-2"}
	bs := startBackends(t, 3, names, nil)
	addr := freePorts(t, 1)[0]
	startPoolCaddy(t, "killed", []string{addr}, poolServer(addr, upstreams(backendAddrs(bs)...)+"lb_policy round_robin"))

	held := map[int][]*client{}
	for i := 0; i < 6; i++ {
		c, b := heldSession(t, addr, names[i%len(names)])
		held[b] = append(held[b], c)
	}
	if len(held[0]) != 2 {
		t.Fatalf("sessions per backend: %d, %d, %d; want 2 each", len(held[0]), len(held[1]), len(held[2]))
	}
	bs[0].kill(t)
	start := time.Now()
	for i, c := range held[0] {
		c.deadline(10 * time.Second)
		rest, err := io.ReadAll(c.r)
		if err != nil {
			t.Errorf("session %d on the killed backend: %v after %v (got %q), want a clean EOF", i+1, err, time.Since(start), rest)
		} else if len(rest) > 0 {
			t.Errorf("session %d on the killed backend: got %q before the EOF", i+1, rest)
		}
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("sessions on the killed backend took %v to end", d)
	}
	for _, b := range []int{1, 2} {
		for _, c := range held[b] {
			if got := c.cmd("STAT"); !strings.HasPrefix(got, "+OK 1 ") {
				t.Errorf("session on backend %d after the kill: STAT %q", b, got)
			}
		}
	}
	var got []int
	for i := 0; i < 6; i++ {
		s := time.Now()
		got = append(got, mustBackend(t, addr, names[i%len(names)], sessionOpts{}))
		if d := time.Since(s); d > 2*time.Second {
			t.Errorf("session %d after the kill took %v", i+1, d)
		}
	}
	if c := counts(got, 3); c[0] != 0 || c[1] == 0 || c[2] == 0 {
		t.Errorf("6 sessions after the kill per backend %v, want none on the killed 0 and some on 1 and 2", c)
	}
	for _, b := range []int{1, 2} {
		for _, c := range held[b] {
			c.quit()
		}
	}
}

// rawUpstream is a TCP server that greets with greeting, or never when it
// is empty, and counts the connections it accepted.
type rawUpstream struct {
	addr    string
	accepts atomic.Int64
}

func startRawUpstream(t *testing.T, greeting string) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{addr: ln.Addr().String()}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepts.Add(1)
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go func() {
				if greeting != "" {
					_, _ = io.WriteString(c, greeting+"\r\n")
				}
				_, _ = io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	return u
}

// timedLogin logs in as alice on the package's Dovecot through addr and
// returns how long USER/PASS took.
func timedLogin(t *testing.T, addr string) time.Duration {
	t.Helper()
	c := dialPOP3(t, addr, nil)
	start := time.Now()
	c.login(alice, alicePass)
	d := time.Since(start)
	c.ok("STAT")
	c.quit()
	return d
}

// TestPoolFailover puts an upstream that accepts but never greets and one
// that greets -ERR before the package's Dovecot with lb_policy first: logins
// fail over to Dovecot; passive checks (fail_duration) and active checks
// (health_interval) then skip the bad two.
func TestPoolFailover(t *testing.T) {
	need(t)
	const dial = 500 * time.Millisecond
	passiveSilent, passiveErr := startRawUpstream(t, ""), startRawUpstream(t, "-ERR [SYS/TEMP] maintenance")
	plainSilent, plainErr := startRawUpstream(t, ""), startRawUpstream(t, "-ERR [SYS/TEMP] maintenance")
	activeSilent, activeErr := startRawUpstream(t, ""), startRawUpstream(t, "-ERR [SYS/TEMP] maintenance")
	addrs := freePorts(t, 3)
	passive, plain, active := addrs[0], addrs[1], addrs[2]
	p := startPoolCaddy(t, "failover", addrs,
		poolServer(passive, upstreams(passiveSilent.addr, passiveErr.addr, env.dc.POP3Addr)+
			"lb_policy first\ndial_timeout 500ms\nfail_duration 30s\nmax_fails 1"),
		poolServer(plain, upstreams(plainSilent.addr, plainErr.addr, env.dc.POP3Addr)+
			"lb_policy first\ndial_timeout 500ms"),
		poolServer(active, upstreams(activeSilent.addr, activeErr.addr, env.dc.POP3Addr)+
			"lb_policy first\ndial_timeout 2s\nhealth_interval 200ms\nhealth_timeout 300ms"),
	)

	t.Run("no-health-checks", func(t *testing.T) {
		// Every login waits dial_timeout for the silent one and moves on.
		for i := 1; i <= 2; i++ {
			if d := timedLogin(t, plain); d < dial || d > 4*time.Second {
				t.Errorf("login %d took %v, want dial_timeout (%v) for the silent upstream and no more than a few seconds", i, d, dial)
			}
		}
		if n, m := plainSilent.accepts.Load(), plainErr.accepts.Load(); n != 2 || m != 2 {
			t.Errorf("the silent upstream got %d connections and the -ERR one %d, want 2 each (one per login)", n, m)
		}
	})
	t.Run("passive", func(t *testing.T) {
		if d := timedLogin(t, passive); d < dial || d > 4*time.Second {
			t.Errorf("first login took %v, want dial_timeout (%v) for the silent upstream and no more than a few seconds", d, dial)
		}
		// Both bad upstreams now count one failure: max_fails 1 skips them.
		if d := timedLogin(t, passive); d > dial/2 {
			t.Errorf("second login took %v: the failed upstreams were tried again", d)
		}
		if n, m := passiveSilent.accepts.Load(), passiveErr.accepts.Load(); n != 1 || m != 1 {
			t.Errorf("the silent upstream got %d connections and the -ERR one %d, want 1 each", n, m)
		}
		for _, u := range []string{passiveSilent.addr, passiveErr.addr} {
			if !waitCaddyEntry(p, time.Second, func(e map[string]any) bool {
				return e["msg"] == "upstream unavailable" && e["upstream"] == u && e["level"] == "warn"
			}) {
				t.Errorf("no \"upstream unavailable\" warning for %s", u)
			}
		}
	})
	t.Run("active", func(t *testing.T) {
		for _, u := range []string{activeSilent.addr, activeErr.addr} {
			if !waitCaddyEntry(p, 5*time.Second, func(e map[string]any) bool {
				return e["msg"] == "upstream unhealthy" && e["upstream"] == u
			}) {
				t.Fatalf("the active check did not mark %s unhealthy within 5s", u)
			}
		}
		if waitCaddyEntry(p, 0, func(e map[string]any) bool {
			return e["msg"] == "upstream unhealthy" && e["upstream"] == env.dc.POP3Addr
		}) {
			t.Errorf("the active check marked Dovecot unhealthy")
		}
		before := activeSilent.accepts.Load()
		for i := 1; i <= 3; i++ {
			if d := timedLogin(t, active); d > time.Second {
				t.Errorf("login %d took %v: the unhealthy upstreams were tried (dial_timeout 2s)", i, d)
			}
		}
		// The checker keeps probing the silent one, at most once per
		// health_interval plus health_timeout: far fewer than with logins.
		if n := activeSilent.accepts.Load() - before; n > 10 {
			t.Errorf("the silent upstream got %d connections during 3 logins", n)
		}
	})
}

// TestPoolUpstreamTLS logs in through upstreams reached over implicit TLS
// and STLS with certificate verification: trusted with tls_trust_pool,
// refused with a wrong tls_server_name or without the trust pool, and
// accepted with tls_insecure_skip_verify. Dovecot's log must show each
// successful login over TLS.
func TestPoolUpstreamTLS(t *testing.T) {
	need(t)
	names := []string{"tls-user"}
	bs := startBackends(t, 1, names, nil)
	dc := bs[0].dc
	ca := dc.CACertFile
	cases := []struct {
		name, upstream string
		ok             bool
	}{
		{"implicit-trusted", fmt.Sprintf("upstream %s {\ntls\ntls_trust_pool file %s\n}", dc.POP3SAddr, ca), true},
		{"stls-trusted", fmt.Sprintf("upstream %s {\nstarttls\ntls_trust_pool file %s\n}", dc.POP3Addr, ca), true},
		{"implicit-server-name-localhost", fmt.Sprintf("upstream %s {\ntls\ntls_server_name localhost\ntls_trust_pool file %s\n}", dc.POP3SAddr, ca), true},
		{"implicit-wrong-name", fmt.Sprintf("upstream %s {\ntls\ntls_server_name wrong.example\ntls_trust_pool file %s\n}", dc.POP3SAddr, ca), false},
		{"stls-wrong-name", fmt.Sprintf("upstream %s {\nstarttls\ntls_server_name wrong.example\ntls_trust_pool file %s\n}", dc.POP3Addr, ca), false},
		// Without tls_trust_pool, the system roots: Dovecot's certificate is
		// not trusted, whether or not another tls_* option is given.
		{"implicit-untrusted-server-name", fmt.Sprintf("upstream %s {\ntls\ntls_server_name localhost\n}", dc.POP3SAddr), false},
		{"implicit-untrusted", fmt.Sprintf("upstream %s {\ntls\n}", dc.POP3SAddr), false},
		{"stls-untrusted", fmt.Sprintf("upstream %s {\nstarttls\n}", dc.POP3Addr), false},
		{"implicit-insecure", fmt.Sprintf("upstream %s {\ntls\ntls_insecure_skip_verify\n}", dc.POP3SAddr), true},
		{"stls-insecure", fmt.Sprintf("upstream %s {\nstarttls\ntls_server_name wrong.example\ntls_insecure_skip_verify\n}", dc.POP3Addr), true},
	}
	addrs := freePorts(t, len(cases))
	var servers []string
	for i, tc := range cases {
		// A failed handshake is immediate; dial_timeout bounds a wait for
		// a greeting that never comes.
		servers = append(servers, poolServer(addrs[i], tc.upstream+"\ndial_timeout 3s"))
	}
	startPoolCaddy(t, "upstream-tls", addrs, servers...)

	loginLine := "Login: user=<tls-user>"
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(dc.Log(), loginLine)
			start := time.Now()
			reply, b, err := poolSession(addrs[i], "tls-user", poolPass, sessionOpts{})
			took := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.ok {
				if sansID(reply) != replyUnavailable || b >= 0 {
					t.Errorf("login: got %q, want %q", reply, replyUnavailable)
					if line := waitLogLine(dc, loginLine, before); line != "" {
						t.Errorf("Dovecot logged the login: %q", line)
					}
				}
				if took > 2*time.Second {
					t.Errorf("the refusal took %v: no TLS handshake failed, the proxy waited for a greeting", took)
				}
				return
			}
			if b != 0 {
				t.Fatalf("login: %q", reply)
			}
			line := waitLogLine(dc, loginLine, before)
			if !strings.Contains(line, ", TLS") {
				t.Errorf("Dovecot's login line does not show TLS: %q", line)
			}
		})
	}
	// Nothing but the successful logins reached Dovecot's authentication.
	want := 0
	for _, tc := range cases {
		if tc.ok {
			want++
		}
	}
	if got := strings.Count(dc.Log(), loginLine); got != want {
		t.Errorf("Dovecot logged %d logins of tls-user, want %d", got, want)
	}
}

// waitLogLine waits up to 5s for Dovecot's log to hold more than before
// lines with s, and returns the last of them ("" if none came).
func waitLogLine(dc *dovecot.Server, s string, before int) string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		log := dc.Log()
		if strings.Count(log, s) > before || time.Now().After(deadline) {
			last := ""
			for _, l := range strings.Split(log, "\n") {
				if strings.Contains(l, s) {
					last = l
				}
			}
			return last
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPoolClientAddress checks that Dovecot sees the client's address
// through proxy_protocol v1 and v2 (on a haproxy listener) and through
// XCLIENT. The client is on loopback too, so it claims 192.0.2.55:4242 with
// a PROXY header to caddy-l4's proxy_protocol handler, which runs before
// pop3; without forwarding, Dovecot sees 127.0.0.1.
func TestPoolClientAddress(t *testing.T) {
	need(t)
	haproxyAddr := freePorts(t, 1)[0]
	haHost, haPort, _ := net.SplitHostPort(haproxyAddr)
	extra := fmt.Sprintf(`login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
service pop3-login {
  inet_listener pop3-haproxy {
    address = %s
    port = %s
    haproxy = yes
  }
}
`, haHost, haPort)
	names := []string{"pp-v1", "pp-v2", "pp-xclient", "pp-none"}
	bs := startBackends(t, 1, names, func(int) string { return extra })
	dc := bs[0].dc
	cases := []struct{ user, body, rip string }{
		{"pp-v1", "upstream " + haproxyAddr + "\nproxy_protocol v1", "192.0.2.55"},
		{"pp-v2", "upstream " + haproxyAddr + "\nproxy_protocol v2", "192.0.2.55"},
		{"pp-xclient", "upstream " + dc.POP3Addr + "\nxclient on", "192.0.2.55"},
		{"pp-none", "upstream " + dc.POP3Addr, "127.0.0.1"}, // the control: nothing forwarded
	}
	addrs := freePorts(t, len(cases))
	const l4proxy = "\t\t\t\tproxy_protocol {\n\t\t\t\t\tallow 127.0.0.0/8\n\t\t\t\t\ttimeout 2s\n\t\t\t\t}\n"
	var servers []string
	for i, tc := range cases {
		servers = append(servers, poolServer(addrs[i], tc.body, l4proxy))
	}
	// The listeners wait for the client's PROXY header before they greet,
	// so the harness's probe (greeting first) does not fit: probe here.
	p := startCaddy(t, "pool-client-address", poolCaddyfile("off", servers...))
	header := func(addr string) string {
		return fmt.Sprintf("PROXY TCP4 192.0.2.55 127.0.0.1 4242 %s\r\n", port(addr))
	}
	for _, a := range addrs {
		waitGreeting(t, p, a, header(a))
	}

	for i, tc := range cases {
		t.Run(tc.user, func(t *testing.T) {
			loginLine := "Login: user=<" + tc.user + ">"
			before := strings.Count(dc.Log(), loginLine)
			mustBackend(t, addrs[i], tc.user, sessionOpts{header: header(addrs[i])})
			line := waitLogLine(dc, loginLine, before)
			if line == "" {
				t.Fatalf("no %q line in Dovecot's log", loginLine)
			}
			if !strings.Contains(line, "rip="+tc.rip+",") {
				t.Errorf("Dovecot's login line: %q, want rip=%s", line, tc.rip)
			}
		})
	}
	// Dovecot accepted XCLIENT: the proxy logged no refusal.
	for _, e := range caddyEntries(p.log()) {
		if m, _ := e["msg"].(string); strings.Contains(m, "XCLIENT") {
			t.Errorf("caddy: %v", e)
		}
	}
}

// waitGreeting connects to addr until it greets +OK after header, for up to
// 30s.
func waitGreeting(t *testing.T, p *caddyProc, addr, header string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := func() error {
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := io.WriteString(conn, header); err != nil {
				return err
			}
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil {
				return err
			}
			if !strings.HasPrefix(line, "+OK") {
				return fmt.Errorf("greeting %q", line)
			}
			_, _ = io.WriteString(conn, "QUIT\r\n")
			return nil
		}()
		if err == nil {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("caddy %s exited: %v\n%s", p.name, p.waitErr, tail(p.log(), 30))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not greet within 30s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPoolMaxConnections fills both upstreams (max_connections 1 each):
// the next login gets -ERR [SYS/TEMP] at once, and a freed slot is used
// again.
func TestPoolMaxConnections(t *testing.T) {
	need(t)
	addr := freePorts(t, 1)[0]
	body := fmt.Sprintf("upstream %s {\nmax_connections 1\n}\nupstream %s {\ntls\ntls_trust_pool file %s\nmax_connections 1\n}\nlb_policy round_robin",
		env.dc.POP3Addr, env.dc.POP3SAddr, env.dc.CACertFile)
	startPoolCaddy(t, "max-connections", []string{addr}, poolServer(addr, body))

	var held []*client
	for i := 0; i < 2; i++ {
		c := dialPOP3(t, addr, nil)
		c.login(alice, alicePass)
		held = append(held, c)
	}
	c := dialPOP3(t, addr, nil)
	c.ok("USER " + alice)
	start := time.Now()
	if got := c.cmd("PASS " + alicePass); sansID(got) != replyUnavailable {
		t.Errorf("third login with both upstreams full: got %q, want %q", got, replyUnavailable)
	}
	c.expectClosed()
	if d := time.Since(start); d > time.Second {
		t.Errorf("the refusal took %v", d)
	}
	held[0].quit()
	time.Sleep(200 * time.Millisecond) // the proxy counts the upstream's close a moment after the client's
	c = dialPOP3(t, addr, nil)
	c.login(alice, alicePass)
	c.ok("STAT")
	c.quit()
	held[1].quit()
}

// TestPoolPlaceholders routes by {pop3.domain}: alice@localhost reaches
// Dovecot on localhost; a domain that does not resolve, an empty one and
// one that is no host name get -ERR [SYS/TEMP] although Dovecot knows
// those users.
func TestPoolPlaceholders(t *testing.T) {
	need(t)
	names := []string{"alice@localhost", "bob@no-such-host.invalid", "nodomain", "eve@local_host", "localhost"}
	bs := startBackends(t, 1, names, nil)
	dc := bs[0].dc
	addrs := freePorts(t, 2)
	addr, byUser := addrs[0], addrs[1]
	startPoolCaddy(t, "placeholders", addrs,
		poolServer(addr, fmt.Sprintf("upstream {pop3.domain}:%s\ndial_timeout 3s\nlb_try_duration 1s", port(dc.POP3Addr))),
		poolServer(byUser, fmt.Sprintf("upstream {pop3.user}:%s\ndial_timeout 3s\nlb_try_duration 1s", port(dc.POP3Addr))))

	if b := mustBackend(t, addr, "alice@localhost", sessionOpts{}); b != 0 {
		t.Errorf("alice@localhost: backend %d", b)
	}
	// {pop3.user} is the whole login: "localhost" reaches Dovecot, a login
	// with '@' is no host name.
	if b := mustBackend(t, byUser, "localhost", sessionOpts{}); b != 0 {
		t.Errorf("{pop3.user} localhost: backend %d", b)
	}
	if reply, _, err := poolSession(byUser, "alice@localhost", poolPass, sessionOpts{}); err != nil || sansID(reply) != replyUnavailable {
		t.Errorf("{pop3.user} alice@localhost: got %q (%v), want %q", reply, err, replyUnavailable)
	}
	for _, user := range names[1:4] {
		t.Run(user, func(t *testing.T) {
			start := time.Now()
			reply, b, err := poolSession(addr, user, poolPass, sessionOpts{})
			if err != nil {
				t.Fatal(err)
			}
			if sansID(reply) != replyUnavailable || b >= 0 {
				t.Errorf("login: got %q, want %q", reply, replyUnavailable)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("the refusal took %v", d)
			}
		})
	}
	// Only alice and localhost reached Dovecot's authentication.
	time.Sleep(100 * time.Millisecond)
	for _, user := range names[1:4] {
		if strings.Contains(dc.Log(), "<"+user+">") {
			t.Errorf("Dovecot's log names %s: the login reached it", user)
		}
	}
}

// TestPoolHealthSurvivesReload lets the passive check mark a silent
// upstream down, reloads the config through the admin API (a new
// greeting), and checks that the upstream is still skipped right after.
func TestPoolHealthSurvivesReload(t *testing.T) {
	need(t)
	silent := startRawUpstream(t, "")
	ports := freePorts(t, 2)
	addr, admin := ports[0], ports[1]
	config := func(greeting string) string {
		return poolCaddyfile(admin, poolServer(addr, upstreams(silent.addr, env.dc.POP3Addr)+
			"lb_policy first\ndial_timeout 1s\nfail_duration 30s\nmax_fails 1\ngreeting \""+greeting+"\""))
	}
	startCaddy(t, "pool-reload", config("before reload"), listener{addr: addr})

	if d := timedLogin(t, addr); d < time.Second {
		t.Fatalf("first login took %v, want dial_timeout (1s) for the silent upstream", d)
	}
	if n := silent.accepts.Load(); n != 1 {
		t.Fatalf("the silent upstream got %d connections, want 1", n)
	}

	req, err := http.NewRequest("POST", "http://"+admin+"/load", strings.NewReader(config("after reload")))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST /load: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %s\n%s", resp.Status, body)
	}
	c := dialPOP3(t, addr, nil)
	if !strings.HasPrefix(c.greeting, "+OK after reload") {
		t.Fatalf("greeting after the reload: %q", c.greeting)
	}
	start := time.Now()
	c.login(alice, alicePass)
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("login after the reload took %v: the upstream marked down before was tried again", d)
	}
	c.quit()
	if n := silent.accepts.Load(); n != 1 {
		t.Errorf("the silent upstream got %d connections, want still 1: the reload forgot its failure", n)
	}
}

// TestPoolAuthNamedUpstreamTLS: the auth server answers 127.0.0.1, the
// config names the same Dovecot as localhost with STLS (and, on its POP3S
// port, implicit TLS). The login must reach Dovecot over TLS, verified
// with the trust pool; an address the config does not name is refused,
// since every configured upstream uses TLS.
func TestPoolAuthNamedUpstreamTLS(t *testing.T) {
	need(t)
	names := []string{"named-stls", "named-tls", "named-unknown"}
	bs := startBackends(t, 1, names, nil)
	dc := bs[0].dc
	_, plainPort, _ := net.SplitHostPort(dc.POP3Addr)
	_, tlsPort, _ := net.SplitHostPort(dc.POP3SAddr)
	unknown := startRawUpstream(t, "+OK not configured")
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{
		"named-stls":    {Password: poolPass, Server: "127.0.0.1:" + plainPort},
		"named-tls":     {Password: poolPass, Server: "127.0.0.1:" + tlsPort},
		"named-unknown": {Password: poolPass, Server: unknown.addr},
	}, NoWait: true}
	url := as.Start(t)
	addr := freePorts(t, 1)[0]
	body := fmt.Sprintf(`auth_http %s
upstream localhost:%s {
starttls
tls_trust_pool file %s
}
upstream localhost:%s {
tls
tls_trust_pool file %s
}
dial_timeout 3s`, url, plainPort, dc.CACertFile, tlsPort, dc.CACertFile)
	p := startPoolCaddy(t, "auth-named-tls", []string{addr}, poolServer(addr, body))

	for _, user := range names[:2] {
		t.Run(user, func(t *testing.T) {
			loginLine := "Login: user=<" + user + ">"
			before := strings.Count(dc.Log(), loginLine)
			if b := mustBackend(t, addr, user, sessionOpts{}); b != 0 {
				t.Fatalf("backend %d", b)
			}
			line := waitLogLine(dc, loginLine, before)
			if !strings.Contains(line, ", TLS") {
				t.Errorf("Dovecot's login line does not show TLS: %q", line)
			}
		})
	}
	t.Run("unknown address", func(t *testing.T) {
		reply, b, err := poolSession(addr, "named-unknown", poolPass, sessionOpts{})
		if err != nil {
			t.Fatal(err)
		}
		if sansID(reply) != replyUnavailable || b >= 0 {
			t.Errorf("login: got %q, want %q", reply, replyUnavailable)
		}
		if n := unknown.accepts.Load(); n != 0 {
			t.Errorf("the address no upstream names got %d connections", n)
		}
	})
	noCaddyErrors(t, p)
}

// TestPoolHealthCheckProxyProtocol: with proxy_protocol v1 or v2 towards a
// Dovecot listener with haproxy = yes, the active health check sends a
// PROXY LOCAL header, so Dovecot greets it and the upstream stays healthy;
// logins work and carry the client's address.
func TestPoolHealthCheckProxyProtocol(t *testing.T) {
	need(t)
	haproxyAddr := freePorts(t, 1)[0]
	haHost, haPort, _ := net.SplitHostPort(haproxyAddr)
	extra := fmt.Sprintf(`haproxy_trusted_networks = 127.0.0.0/8
service pop3-login {
  inet_listener pop3-haproxy {
    address = %s
    port = %s
    haproxy = yes
  }
}
`, haHost, haPort)
	names := []string{"hc-v1", "hc-v2"}
	bs := startBackends(t, 1, names, func(int) string { return extra })
	dc := bs[0].dc
	addrs := freePorts(t, 2)
	var servers []string
	for i, v := range []string{"v1", "v2"} {
		servers = append(servers, poolServer(addrs[i], fmt.Sprintf("upstream %s\nproxy_protocol %s\nhealth_interval 200ms\nhealth_timeout 1s", haproxyAddr, v)))
	}
	p := startPoolCaddy(t, "health-proxy-protocol", addrs, servers...)
	time.Sleep(1500 * time.Millisecond) // several checks, each bounded by health_timeout
	for i, user := range names {
		t.Run(user, func(t *testing.T) {
			loginLine := "Login: user=<" + user + ">"
			before := strings.Count(dc.Log(), loginLine)
			mustBackend(t, addrs[i], user, sessionOpts{})
			if line := waitLogLine(dc, loginLine, before); !strings.Contains(line, "rip=127.0.0.1,") {
				t.Errorf("Dovecot's login line: %q", line)
			}
		})
	}
	for _, e := range caddyEntries(p.log()) {
		if m, _ := e["msg"].(string); m == "upstream unhealthy" {
			t.Errorf("caddy: %v", e)
		}
	}
}

// TestPoolHealthClearedByReload: the active check marks a stopped Dovecot
// down; a reload to a config without health_interval stops the checker,
// and once Dovecot is back, logins reach it (nothing else would clear the
// mark the old checker left).
func TestPoolHealthClearedByReload(t *testing.T) {
	need(t)
	bs := startBackends(t, 1, []string{"hc-reload"}, nil)
	ports := freePorts(t, 2)
	addr, admin := ports[0], ports[1]
	config := func(body string) string {
		return poolCaddyfile(admin, poolServer(addr, upstreams(bs[0].dc.POP3Addr)+"dial_timeout 1s\n"+body))
	}
	p := startCaddy(t, "pool-health-reload", config("health_interval 100ms\nhealth_timeout 1s"), listener{addr: addr})
	bs[0].stop(t)
	if !waitCaddyEntry(p, 10*time.Second, func(e map[string]any) bool { return e["msg"] == "upstream unhealthy" }) {
		t.Fatal("the stopped backend was not marked unhealthy")
	}
	(&adminCaddy{admin: admin}).loadCaddyfile(t, config("greeting \"after reload\""))
	bs[0].restart(t)
	if b := mustBackend(t, addr, "hc-reload", sessionOpts{}); b != 0 {
		t.Errorf("backend %d", b)
	}
}

// TestPoolSNIPlaceholder: with upstream {l4.tls.server_name}:PORT, a real
// TLS client sends an SNI through STLS and through implicit_tls. A host
// name reaches Dovecot; an IP address (Go sends "127.0.0.1." as the SNI
// 127.0.0.1) or a number a C resolver takes for one is refused before any
// dial, and Dovecot never sees the login. (An SNI with a port fails the
// handshake in Caddy's certificate selection already; the unit tests cover
// it with a plain Go TLS server.)
func TestPoolSNIPlaceholder(t *testing.T) {
	need(t)
	bs := startBackends(t, 1, []string{"sni-user"}, nil)
	dc := bs[0].dc
	addrs := freePorts(t, 2)
	stlsAddr, implicitAddr := addrs[0], addrs[1]
	policy := "connection_policy {\ndefault_sni localhost\nfallback_sni localhost\n}"
	server := func(addr, body string) string {
		return fmt.Sprintf("\t\t%s {\n\t\t\troute {\n\t\t\t\tpop3 {\n%s\n\t\t\t\t\tauth_failure_delay 1ms\n\t\t\t\t}\n\t\t\t}\n\t\t}\n", addr, indent(body, "\t\t\t\t\t"))
	}
	upstream := "upstream {l4.tls.server_name}:" + port(dc.POP3Addr) + "\n"
	cf := caddyfileFor(true,
		server(stlsAddr, upstream+"starttls on\n"+policy)+
			server(implicitAddr, upstream+"implicit_tls\n"+policy))
	p := startCaddy(t, "pool-sni", cf, listener{addr: stlsAddr})
	waitSTLS(t, p, stlsAddr)

	loginLine := "Login: user=<sni-user>"
	for _, tc := range []struct {
		name, sni    string
		implicit, ok bool
	}{
		{"stls host name", "localhost", false, true},
		{"implicit host name", "LOCALHOST", true, true},
		{"stls address", "127.0.0.1.", false, false},
		{"implicit address", "127.0.0.1.", true, false},
		{"stls number", "2130706433", false, false},
		{"implicit short address", "127.1.", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			usedSecret("sni-user", poolPass)
			cfg := &tls.Config{ServerName: tc.sni, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}
			var c *client
			if tc.implicit {
				c = dialPOP3(t, implicitAddr, cfg)
			} else {
				c = dialPOP3(t, stlsAddr, nil)
				c.stls(cfg)
			}
			before := strings.Count(dc.Log(), loginLine)
			c.ok("USER sni-user")
			reply := c.cmd("PASS " + poolPass)
			if !tc.ok {
				if sansID(reply) != replyUnavailable {
					t.Errorf("login: got %q, want %q", reply, replyUnavailable)
				}
				time.Sleep(100 * time.Millisecond)
				if strings.Count(dc.Log(), loginLine) != before {
					t.Error("Dovecot logged the login")
				}
				return
			}
			if !strings.HasPrefix(reply, "+OK") {
				t.Fatalf("login: %q", reply)
			}
			c.quit()
		})
	}
}

// TestPoolLogsHoldNoPasswords scans the logs of this file's Caddy runs for
// every password sent so far: TestLogsHoldNoPasswords (logscan_test.go)
// runs before this file's tests, which sort after it.
func TestPoolLogsHoldNoPasswords(t *testing.T) {
	need(t)
	secrets := allSecrets()
	scanned := 0
	for _, p := range caddyRuns() {
		if !strings.HasPrefix(p.name, "pool-") {
			continue
		}
		scanned++
		lower := strings.ToLower(p.log())
		for _, s := range sortedKeys(secrets) {
			if strings.Contains(lower, strings.ToLower(s)) {
				t.Errorf("caddy %s: log holds the %s", p.name, secrets[s])
			}
		}
	}
	t.Logf("scanned %d pool Caddy logs for %d secrets", scanned, len(secrets))
}
