package pop3

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// namedUpstreams starts n fake upstreams whose STAT replies carry their index.
func namedUpstreams(t *testing.T, n int) ([]*pop3test.Upstream, []*Upstream) {
	var fakes []*pop3test.Upstream
	var cfg []*Upstream
	for i := 0; i < n; i++ {
		u, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Name = fmt.Sprintf("up%d", i) })
		fakes = append(fakes, u)
		cfg = append(cfg, &Upstream{Address: addr})
	}
	return fakes, cfg
}

// chooseFor returns the index of the upstream the pool picks for user.
func chooseFor(t *testing.T, h *Handler, user string) int {
	t.Helper()
	for _, u := range h.pool.order(poolRequest{user: user}) {
		if h.pool.available(u) {
			for i, c := range h.Upstream {
				if c == u.cfg {
					return i
				}
			}
		}
	}
	return -1
}

func TestUserHashIsStableAndMovesOnlyTheLeaversUsers(t *testing.T) {
	t.Parallel()
	_, ups := namedUpstreams(t, 3)
	h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups })
	const users = 3000
	before := make([]int, users)
	counts := make([]int, 3)
	for i := range before {
		before[i] = chooseFor(t, h, fmt.Sprintf("user%d@example.com", i))
		counts[before[i]]++
		if again := chooseFor(t, h, fmt.Sprintf("  USER%d@Example.COM", i)); again != before[i] {
			t.Fatalf("the same mailbox in other case went to %d, then %d", before[i], again)
		}
	}
	for i, c := range counts {
		if c < users/3-users/10 || c > users/3+users/10 {
			t.Errorf("upstream %d got %d of %d users: uneven %v", i, c, users, counts)
		}
	}
	h.pool.upstreams[1].peer.unhealthy.Store(true) // upstream 1 leaves
	defer h.pool.upstreams[1].peer.unhealthy.Store(false)
	moved := 0
	for i := range before {
		after := chooseFor(t, h, fmt.Sprintf("user%d@example.com", i))
		if after != before[i] {
			moved++
			if before[i] != 1 {
				t.Fatalf("user%d moved from live upstream %d to %d", i, before[i], after)
			}
		}
	}
	if moved != counts[1] {
		t.Errorf("%d users moved, want exactly upstream 1's %d", moved, counts[1])
	}
	t.Logf("user_hash: %d of %d users moved (%.1f%%) when 1 of 3 upstreams left; ideal 33.3%%", moved, users, 100*float64(moved)/users)
}

func TestPolicies(t *testing.T) {
	t.Parallel()
	_, ups := namedUpstreams(t, 3)
	t.Run("round_robin", func(t *testing.T) {
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyRoundRobin })
		counts := make([]int, 3)
		for i := 0; i < 30; i++ {
			counts[chooseFor(t, h, "same-user")]++
		}
		if counts[0] != 10 || counts[1] != 10 || counts[2] != 10 {
			t.Errorf("round_robin spread %v", counts)
		}
	})
	t.Run("first", func(t *testing.T) {
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyFirst })
		for i := 0; i < 10; i++ {
			if got := chooseFor(t, h, fmt.Sprint(i)); got != 0 {
				t.Fatalf("first chose %d", got)
			}
		}
	})
	t.Run("random weighted", func(t *testing.T) {
		weighted := []*Upstream{{Address: ups[0].Address, Weight: 8}, {Address: ups[1].Address, Weight: 1}, {Address: ups[2].Address, Weight: 1}}
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = weighted; h.LBPolicy = PolicyRandom })
		counts := make([]int, 3)
		for i := 0; i < 2000; i++ {
			counts[chooseFor(t, h, "")]++
		}
		if counts[0] < 1400 || counts[1] < 50 || counts[2] < 50 {
			t.Errorf("weights 8:1:1 gave %v", counts)
		}
	})
	t.Run("least_conn", func(t *testing.T) {
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyLeastConn })
		h.pool.upstreams[0].peer.active.Add(5)
		h.pool.upstreams[2].peer.active.Add(3)
		defer h.pool.upstreams[0].peer.active.Add(-5)
		defer h.pool.upstreams[2].peer.active.Add(-3)
		for i := 0; i < 10; i++ {
			if got := chooseFor(t, h, ""); got != 1 {
				t.Fatalf("least_conn chose %d", got)
			}
		}
	})
	t.Run("ip_hash", func(t *testing.T) {
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyIPHash })
		seen := map[int]bool{}
		for i := 0; i < 50; i++ {
			ip := netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})
			first := h.pool.order(poolRequest{clientIP: ip})[0]
			if again := h.pool.order(poolRequest{clientIP: ip})[0]; again != first {
				t.Fatal("ip_hash is not stable")
			}
			seen[chooseIndex(h, first)] = true
		}
		if len(seen) != 3 {
			t.Errorf("50 addresses reached only %v", seen)
		}
	})
}

func chooseIndex(h *Handler, u *poolUpstream) int {
	for i, c := range h.Upstream {
		if c == u.cfg {
			return i
		}
	}
	return -1
}

// login runs USER/PASS and STAT and returns the STAT line, which names the
// upstream.
func loginAndStat(t *testing.T, h *Handler, user string) string {
	t.Helper()
	_, logs := observer.New(zap.DebugLevel)
	ts := startSession(t, h, logs, false)
	ts.send("USER "+user, "PASS secret-pw", "STAT", "QUIT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	stat := ts.expect("+OK 1 ")
	ts.expect("+OK bye")
	ts.closed()
	return stat
}

func TestFailoverBeforeLogin(t *testing.T) {
	_, ups := namedUpstreams(t, 1)
	silent := &pop3test.Upstream{Silent: true}
	silentAddr := silent.Start(t)
	_, badGreeting := fakeUpstream(t, func(u *pop3test.Upstream) { u.Greeting = "-ERR [SYS/TEMP] maintenance" })
	h, _ := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = []*Upstream{{Address: closedPort(t)}, {Address: badGreeting}, {Address: silentAddr}, ups[0]}
		h.LBPolicy = PolicyFirst
		h.Timeout = caddy.Duration(2 * time.Second)
		h.DialTimeout = caddy.Duration(300 * time.Millisecond)
		h.FailDuration = caddy.Duration(time.Minute)
	})
	start := time.Now()
	if stat := loginAndStat(t, h, "alice"); !strings.HasSuffix(stat, "up0") {
		t.Fatalf("STAT %q", stat)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("failover took %v", d)
	}
	// Passive checks now skip the three bad ones: no wait for the silent one.
	start = time.Now()
	loginAndStat(t, h, "alice")
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("second login took %v: failed upstreams were not skipped", d)
	}
}

func TestAllUpstreamsFull(t *testing.T) {
	t.Parallel()
	_, ups := namedUpstreams(t, 2)
	for _, u := range ups {
		u.MaxConnections = 1
	}
	h, logs := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyRoundRobin })
	var held []*testSession
	for i := 0; i < 2; i++ {
		ts := startSession(t, h, logs, false)
		ts.send("USER alice", "PASS secret-pw")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		held = append(held, ts)
	}
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("-ERR [SYS/TEMP]")
	ts.closed()
	held[0].send("QUIT")
	held[0].expect("+OK bye")
	held[0].closed()
	loginAndStat(t, h, "alice") // a slot is free again
}

func TestActiveHealthCheck(t *testing.T) {
	_, good := fakeUpstream(t, nil)
	bad := &pop3test.Upstream{Greeting: "-ERR down"}
	badAddr := bad.Start(t)
	h, _ := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = []*Upstream{{Address: badAddr}, {Address: good}}
		h.LBPolicy = PolicyFirst
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.pool.healthChecker(ctx, 20*time.Millisecond, time.Second, 1, 2)
	deadline := time.Now().Add(5 * time.Second)
	for !h.pool.upstreams[0].peer.unhealthy.Load() {
		if time.Now().After(deadline) {
			t.Fatal("an upstream greeting -ERR never became unhealthy")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if h.pool.upstreams[1].peer.unhealthy.Load() {
		t.Error("the good upstream is unhealthy")
	}
	if got := chooseFor(t, h, ""); got != 1 {
		t.Errorf("chose %d, want the healthy one", got)
	}
	h.pool.upstreams[0].peer.unhealthy.Store(false)
}

func TestAddressPlaceholders(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["alice@localhost"] = "secret-pw"; u.Name = "by-domain" })
	_, port, _ := net.SplitHostPort(addr)
	h, logs := newTestHandler(t, "", func(h *Handler) { h.Upstream = []*Upstream{{Address: "{pop3.domain}:" + port}} })
	if stat := loginAndStat(t, h, "alice@localhost"); !strings.HasSuffix(stat, "by-domain") {
		t.Errorf("STAT %q", stat)
	}
	for _, user := range []string{"bob", "eve@evil.example:25", "eve@{pop3.user}", "eve@..", "x@-"} {
		ts := startSession(t, h, logs, false)
		ts.send("USER "+user, "PASS secret-pw")
		ts.expect("+OK")
		ts.expect("-ERR [SYS/TEMP]")
		ts.closed()
	}
}

func TestUpstreamTLS(t *testing.T) {
	t.Parallel()
	cert := testCertificate(t) // for "localhost"
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	serverTLS := &tls.Config{Certificates: []tls.Certificate{cert}}
	for _, tc := range []struct {
		name       string
		stls       bool
		serverName string
		skip       bool
		ok         bool
	}{
		{"implicit verified", false, "localhost", false, true},
		{"stls verified", true, "localhost", false, true},
		{"implicit wrong name", false, "wrong.example", false, false},
		{"stls wrong name", true, "wrong.example", false, false},
		{"insecure skip verify", false, "wrong.example", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.TLS = serverTLS; u.STLS = tc.stls; u.Name = "tls" })
			h, logs := newTestHandler(t, "", func(h *Handler) {
				h.Upstream = []*Upstream{{Address: addr, StartTLS: tc.stls, TLS: &reverseproxy.TLSConfig{ServerName: tc.serverName, InsecureSkipVerify: tc.skip}}}
			})
			h.pool.upstreams[0].tlsConfig.RootCAs = roots
			ts := startSession(t, h, logs, false)
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			if !tc.ok {
				ts.expect("-ERR [SYS/TEMP]")
				return
			}
			ts.expect("+OK Logged in.")
			ts.send("STAT")
			ts.expect("+OK 1 ")
			if lines := fake.Lines(); tc.stls && (len(lines) < 1 || lines[0] != "STLS") {
				t.Errorf("upstream lines %q: no STLS first", lines)
			}
		})
	}
}

func TestProxyProtocolAndXCLIENT(t *testing.T) {
	t.Parallel()
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan string, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				br := bufio.NewReader(c)
				header, err := proxyproto.Read(br)
				if err != nil {
					got <- "error: " + err.Error()
					return
				}
				got <- fmt.Sprintf("v%d %s", header.Version, header.SourceAddr)
				_, _ = c.Write([]byte("-ERR enough\r\n"))
			}()
			h, logs := newTestHandler(t, ln.Addr().String(), func(h *Handler) { h.ProxyProtocol = version })
			ts := startSession(t, h, logs, true)
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			ts.expect("-ERR [SYS/TEMP]")
			want := fmt.Sprintf("%s %s", version, ts.conn.LocalAddr())
			if g := <-got; g != want {
				t.Errorf("upstream got PROXY header %q, want %q", g, want)
			}
		})
	}
	t.Run("xclient", func(t *testing.T) {
		fake, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.XClient = true })
		ts := startSession(t, h, logs, true)
		ts.send("USER alice", "PASS secret-pw")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		ap := netip.MustParseAddrPort(ts.conn.LocalAddr().String())
		if want := fmt.Sprintf("XCLIENT ADDR=%s PORT=%d", ap.Addr(), ap.Port()); fake.Lines()[0] != want {
			t.Errorf("upstream lines %q, want %q first", fake.Lines(), want)
		}
	})
}

func TestBareTLSStillMeansTLS(t *testing.T) {
	t.Parallel()
	for _, stls := range []bool{false, true} {
		h, _ := newTestHandler(t, "", func(h *Handler) {
			h.Upstream = []*Upstream{{Address: "127.0.0.1:995", TLS: &reverseproxy.TLSConfig{}, StartTLS: stls}}
		})
		if h.pool.upstreams[0].tlsConfig == nil {
			t.Errorf("starttls %v: an empty tls block turned TLS off", stls)
		}
	}
}

func TestUpstreamCAPAIsCached(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, _ := newTestHandler(t, addr, nil)
	for i := 0; i < 3; i++ {
		loginAndStat(t, h, "alice")
	}
	if n := strings.Count(strings.Join(up.Lines(), "\n"), "CAPA"); n != 1 {
		t.Errorf("upstream was asked CAPA %d times in three logins, want once", n)
	}
}

// round_robin's counter is unsigned: past the int range (on 32-bit, after
// 2^31 sessions) it must still give an index in range.
func TestRoundRobinCounterWraps(t *testing.T) {
	t.Parallel()
	_, ups := namedUpstreams(t, 3)
	h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = ups; h.LBPolicy = PolicyRoundRobin })
	h.pool.rr.Store(1 << 63)
	seen := map[int]bool{}
	for i := 0; i < 3; i++ {
		seen[chooseIndex(h, h.pool.order(poolRequest{})[0])] = true
	}
	if len(seen) != 3 {
		t.Errorf("three sessions reached %v", seen)
	}
}

// A reload to a config without health_interval: once the old checker
// stops, the upstream it marked down is usable again (nothing else would
// clear the mark).
func TestHealthStateClearedWithoutChecker(t *testing.T) {
	t.Parallel()
	bad := &pop3test.Upstream{Greeting: "-ERR down"}
	badAddr := bad.Start(t)
	before, _ := newTestHandler(t, badAddr, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	before.pool.startHealthChecker(ctx, 20*time.Millisecond, time.Second, 1, 1)
	waitFor(t, "the upstream to be marked unhealthy", func() bool { return before.pool.upstreams[0].peer.unhealthy.Load() })

	after, _ := newTestHandler(t, badAddr, func(h *Handler) { h.proc = before.proc }) // a reload: shares the address's state
	if after.pool.upstreams[0].peer != before.pool.upstreams[0].peer {
		t.Fatal("the new config does not share the upstream's state")
	}
	cancel() // the old config stops
	waitFor(t, "the upstream to be usable without a checker", func() bool { return after.pool.available(after.pool.upstreams[0]) })
}

// A check that its config's end interrupts ends at once and counts neither
// way: a reload does not mark an upstream down.
func TestCancelledHealthCheckCountsNothing(t *testing.T) {
	silent := &pop3test.Upstream{Silent: true}
	addr := silent.Start(t)
	h, _ := newTestHandler(t, addr, nil)
	u := h.pool.upstreams[0]
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		h.pool.checkOne(ctx, u, time.Minute, 1, 1)
		close(done)
	}()
	time.Sleep(100 * time.Millisecond) // connected, waiting for the greeting
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a stopped check still waits for the greeting")
	}
	if u.peer.unhealthy.Load() || u.peer.failsRun.Load() != 0 {
		t.Errorf("a cancelled check counted: unhealthy %v, failed run %d", u.peer.unhealthy.Load(), u.peer.failsRun.Load())
	}
}

// With proxy_protocol, the active check sends a LOCAL header (v1: PROXY
// UNKNOWN): a listener that wants a header greets nobody without one.
func TestHealthCheckSendsProxyLocal(t *testing.T) {
	t.Parallel()
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan *proxyproto.Header, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				br := bufio.NewReader(c)
				header, err := proxyproto.Read(br)
				got <- header
				if err != nil {
					return
				}
				_, _ = c.Write([]byte("+OK ready\r\n"))
				_, _ = br.ReadString('\n')
			}()
			h, _ := newTestHandler(t, ln.Addr().String(), func(h *Handler) { h.ProxyProtocol = version })
			u := h.pool.upstreams[0]
			h.pool.checkOne(context.Background(), u, 2*time.Second, 1, 1)
			if u.peer.unhealthy.Load() {
				t.Error("the upstream was marked unhealthy")
			}
			header := <-got
			if header == nil || header.Command != proxyproto.LOCAL || header.Version != map[string]byte{"v1": 1, "v2": 2}[version] {
				t.Errorf("header %+v, want a %s LOCAL one", header, version)
			}
		})
	}
}

// A placeholder value, whoever chose it, is a host name or nothing: never
// an address, a port or another syntax; the port is the template's.
func TestResolveAddressTakesOnlyAHostName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		tmpl, port, value, want string
	}{
		{"{l4.tls.server_name}", "110", "mail.example.com", "mail.example.com:110"},
		{"{l4.tls.server_name}", "110", "MAIL.Example.COM", "mail.example.com:110"},
		{"{l4.tls.server_name}", "110", "localhost", "localhost:110"},
		{"pop.{l4.tls.server_name}", "995", "example.com", "pop.example.com:995"},
		{"pop-{l4.tls.server_name}.internal", "110", "10", "pop-10.internal:110"},
		{"{l4.tls.server_name}", "110", "10.0.0.5:2110", ""},
		{"{l4.tls.server_name}", "110", "10.0.0.5", ""},
		{"{l4.tls.server_name}", "110", "2130706433", ""},
		{"{l4.tls.server_name}", "110", "0x7f000001", ""},
		{"{l4.tls.server_name}", "110", "127.1", ""},
		{"{l4.tls.server_name}", "110", "[::1]", ""},
		{"{l4.tls.server_name}", "110", "::1", ""},
		{"{l4.tls.server_name}", "110", "a..b", ""},
		{"{l4.tls.server_name}", "110", ".a", ""},
		{"{l4.tls.server_name}", "110", "-a.example", ""},
		{"{l4.tls.server_name}", "110", "a_b.example", ""},
		{"{l4.tls.server_name}", "110", "mail.example.com.", ""},
		{"{l4.tls.server_name}", "110", "mäil.example", ""},
		{"{l4.tls.server_name}", "110", "a/b", ""},
		{"{l4.tls.server_name}", "110", "a b", ""},
		{"{l4.tls.server_name}", "110", "", ""},
		{"{l4.tls.server_name}", "110", strings.Repeat("a", 64) + ".example", ""},
		{"{l4.tls.server_name}", "110", strings.Repeat("abcdefg.", 32) + "example", ""},
		{"10.0.0.{l4.tls.server_name}", "110", "5", ""},
		{"{l4.tls.server_name}", "110", "{pop3.user}", ""},
		{"{no.such.placeholder}", "110", "x", ""},
	} {
		repl := caddy.NewReplacer()
		repl.Set("l4.tls.server_name", tc.value)
		repl.Set("pop3.user", "alice")
		got, err := resolveAddress(tc.tmpl, tc.port, repl)
		if tc.want == "" {
			if err == nil {
				t.Errorf("%s with %q: %q, want an error", tc.tmpl, tc.value, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s with %q: %q, %v; want %q", tc.tmpl, tc.value, got, err, tc.want)
		}
	}
}

func TestAddressTemplatePort(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		tmpl, defaultPort, host, port string
	}{
		{"{pop3.domain}", "110", "{pop3.domain}", "110"},
		{"pop.{pop3.domain}:1110", "110", "pop.{pop3.domain}", "1110"},
		{"{pop3.domain}:{env.PORT}", "110", "", ""},
		{"{pop3.domain}:+1", "110", "", ""},
		{"{pop3.domain}:70000", "110", "", ""},
		{"{pop3.domain}:", "110", "", ""},
		{"a:b:{pop3.domain}", "110", "", ""},
		{"mail:{pop3.domain}", "110", "", ""},
	} {
		host, port, err := splitTemplate(tc.tmpl, tc.defaultPort)
		if tc.host == "" {
			if err == nil {
				t.Errorf("%s: %q %q, want an error", tc.tmpl, host, port)
			}
			continue
		}
		if err != nil || host != tc.host || port != tc.port {
			t.Errorf("%s: %q %q %v, want %q %q", tc.tmpl, host, port, err, tc.host, tc.port)
		}
	}
	// Without a port, a template takes the one its TLS mode implies.
	for _, tc := range []struct {
		u    *Upstream
		port string
	}{
		{&Upstream{Address: "pop.{pop3.domain}"}, "110"},
		{&Upstream{Address: "pop.{pop3.domain}", TLS: &reverseproxy.TLSConfig{}}, "995"},
		{&Upstream{Address: "pop.{pop3.domain}", TLS: &reverseproxy.TLSConfig{}, StartTLS: true}, "110"},
	} {
		h, _ := newTestHandler(t, "", func(h *Handler) { h.Upstream = []*Upstream{tc.u} })
		if got := h.pool.upstreams[0].port; got != tc.port {
			t.Errorf("%+v: port %s, want %s", tc.u, got, tc.port)
		}
	}
	h := &Handler{Upstream: []*Upstream{{Address: "{pop3.domain}:{l4.tls.server_name}"}}, logger: zap.NewNop()}
	if err := h.setup(); err == nil || !strings.Contains(err.Error(), "port") {
		t.Errorf("a placeholder in the port: setup %v, want an error", err)
	}
}

// A real TLS client sets an SNI through STLS and implicit TLS: a host name
// reaches the upstream, an address with a port does not.
func TestSNIPlaceholderTakesNoAddress(t *testing.T) {
	t.Parallel()
	fake, addr := fakeUpstream(t, nil)
	_, port, _ := net.SplitHostPort(addr)
	for _, tc := range []struct {
		name, tmpl, sni string
		implicit, ok    bool
	}{
		{"stls host name", "{l4.tls.server_name}:" + port, "localhost", false, true},
		{"implicit host name", "{l4.tls.server_name}:" + port, "LocalHost", true, true},
		{"stls address and port", "{l4.tls.server_name}", "127.0.0.1:" + port, false, false},
		{"implicit address and port", "{l4.tls.server_name}", "127.0.0.1:" + port, true, false},
		{"stls host and port", "{l4.tls.server_name}", "localhost:" + port, false, false},
		{"implicit numeric address", "{l4.tls.server_name}:" + port, "2130706433", true, false},
		{"stls address", "{l4.tls.server_name}:" + port, "127.0.0.1.", false, false}, // Go sends the SNI 127.0.0.1
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, logs := newTestHandler(t, "", func(h *Handler) {
				h.Upstream = []*Upstream{{Address: tc.tmpl}}
				h.StartTLS, h.ImplicitTLS = StartTLSOn, tc.implicit
			})
			before := len(fake.Lines())
			ts := handleOn(t, h, logs, false)
			if !tc.implicit {
				if g := ts.readLine(); !strings.HasPrefix(g, "+OK") {
					t.Fatalf("greeting %q", g)
				}
				ts.send("STLS")
				ts.expect("+OK")
			}
			tc2 := tls.Client(ts.conn, &tls.Config{InsecureSkipVerify: true, ServerName: tc.sni})
			if err := tc2.Handshake(); err != nil {
				t.Fatalf("TLS handshake: %v", err)
			}
			ts.conn, ts.r = tc2, bufio.NewReader(tc2)
			if tc.implicit {
				ts.expect("+OK")
			}
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			if !tc.ok {
				ts.expect("-ERR [SYS/TEMP]")
				if len(fake.Lines()) != before {
					t.Errorf("the upstream got %q", fake.Lines()[before:])
				}
				return
			}
			ts.expect("+OK Logged in")
			ts.send("QUIT")
			ts.expect("+OK")
		})
	}
}

// max_connections on an address template counts all its sessions.
func TestTemplateMaxConnections(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["alice@localhost"] = "secret-pw" })
	_, port, _ := net.SplitHostPort(addr)
	h, logs := newTestHandler(t, "", func(h *Handler) { h.Upstream = []*Upstream{{Address: "{pop3.domain}:" + port, MaxConnections: 1}} })
	held := startSession(t, h, logs, false)
	held.send("USER alice@localhost", "PASS secret-pw")
	held.expect("+OK")
	held.expect("+OK Logged in")
	ts := startSession(t, h, logs, false)
	ts.send("USER alice@localhost", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("-ERR [SYS/TEMP]")
	held.send("QUIT")
	held.expect("+OK")
}

// A failed newPool gives back the shared state it took.
func TestBuildPoolFailureReleasesState(t *testing.T) {
	t.Parallel()
	addr := closedPort(t)
	h := &Handler{Upstream: []*Upstream{{Address: addr}, {Address: "127.0.0.1:2", TLS: &reverseproxy.TLSConfig{ClientCertificateFile: "x.pem"}}}, logger: zap.NewNop()}
	if err := h.setup(); err == nil {
		t.Fatal("setup accepted a client certificate without a key")
	}
	if n, ok := h.proc.peers.References(addr); ok {
		t.Errorf("%d references to %s left", n, addr)
	}
}

// Everything that may change an upstream's CAPA answer is in the cache
// key: the client it was told of by XCLIENT (or PROXY), and the TLS
// identity.
func TestCAPACacheKey(t *testing.T) {
	t.Parallel()
	fake, addr := fakeUpstream(t, nil)
	stls, stlsPort, roots := stlsUpstream(t)
	h, _ := newTestHandler(t, addr, nil)
	capaCount := func(u *pop3test.Upstream) int { return strings.Count(strings.Join(u.Lines(), "\n"), "CAPA") }
	connect := func(address string, o upstreamOptions, remote string) {
		t.Helper()
		client := dialClient{remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(remote)), local: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 110}}
		o.capas = h.proc.capas
		c, err := connectUpstream(context.Background(), h.pool.dialer, address, o, client, time.Now().Add(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		c.quit()
	}
	for i, step := range []struct {
		o      upstreamOptions
		remote string
		want   int
	}{
		{upstreamOptions{}, "192.0.2.1:1000", 1},
		{upstreamOptions{}, "192.0.2.2:1000", 1}, // told nothing of the client: one answer for all
		{upstreamOptions{xclient: true}, "192.0.2.1:1000", 2},
		{upstreamOptions{xclient: true}, "192.0.2.1:2000", 2},
		{upstreamOptions{xclient: true}, "192.0.2.2:1000", 3},
	} {
		connect(addr, step.o, step.remote)
		if got := capaCount(fake); got != step.want {
			t.Fatalf("step %d: %d CAPAs, want %d", i, got, step.want)
		}
	}
	withCert := testCertificate(t)
	for i, cfg := range []*tls.Config{
		{RootCAs: roots, ServerName: "localhost"},
		{RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{withCert}},
	} {
		connect("127.0.0.1:"+stlsPort, upstreamOptions{tls: cfg, startTLS: true}, "192.0.2.1:1000")
		if got := capaCount(stls); got != i+1 {
			t.Errorf("TLS identity %d: %d CAPAs, want %d", i, got, i+1)
		}
	}
}

// A session that ends while it connects (a kick, a drain) counts no failure
// against the upstreams and tries no more of them.
func TestEndedSessionCountsNoUpstreamFailure(t *testing.T) {
	t.Parallel()
	h, _ := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = []*Upstream{{Address: closedPort(t)}, {Address: closedPort(t)}, {Address: closedPort(t)}}
		h.LBPolicy = PolicyFirst
		h.FailDuration = caddy.Duration(time.Minute)
	})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := h.pool.connect(ctx, poolRequest{}, dialClient{}, time.Now().Add(time.Second)); err == nil {
		t.Fatal("connected with an ended context")
	}
	for i, u := range h.pool.upstreams {
		if n := u.peer.fails.since(time.Now().Add(-time.Minute)); n != 0 {
			t.Errorf("upstream %d: %d failures counted", i, n)
		}
	}
}

// Each config counts the passive failures within its own fail_duration: a
// reload that shortens it (or turns it off) takes effect at once, not when
// the old config's count would have expired.
func TestReloadAppliesItsFailDuration(t *testing.T) {
	addr := closedPort(t)
	before, _ := newTestHandler(t, addr, func(h *Handler) { h.FailDuration = caddy.Duration(time.Hour) })
	before.pool.countFailure(before.pool.upstreams[0])
	if before.pool.available(before.pool.upstreams[0]) {
		t.Fatal("a failure within fail_duration left the upstream available")
	}
	// Reloads: the new configs share the address's state with the old one.
	after, _ := newTestHandler(t, addr, func(h *Handler) {
		h.FailDuration = caddy.Duration(50 * time.Millisecond)
		h.proc = before.proc
	})
	if after.pool.upstreams[0].peer != before.pool.upstreams[0].peer {
		t.Fatal("the new config does not share the upstream's state")
	}
	off, _ := newTestHandler(t, addr, func(h *Handler) { h.proc = before.proc })
	if !off.pool.available(off.pool.upstreams[0]) {
		t.Error("a config without fail_duration counts the old config's failure")
	}
	time.Sleep(100 * time.Millisecond)
	if !after.pool.available(after.pool.upstreams[0]) {
		t.Error("the new config's fail_duration has passed, but the upstream is still down")
	}
	if before.pool.available(before.pool.upstreams[0]) {
		t.Error("the old config forgot the failure within its fail_duration")
	}
	h := &Handler{Upstream: []*Upstream{{Address: addr}}, FailDuration: caddy.Duration(time.Second), MaxFails: maxFailsLimit + 1, logger: zap.NewNop()}
	if err := h.setup(); err == nil {
		t.Errorf("max_fails %d accepted; failures remembered are %d", h.MaxFails, maxFailsLimit)
	}
}
