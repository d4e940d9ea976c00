//go:build integration

package integration

// The cluster of issue 15 with real parts: a private redis-server, three
// Caddy processes (instances a, b and c) sharing it through the pop3 app
// and sharing one `storage file_system` directory with an internal-CA
// certificate, and HAProxy in front, balancing round-robin and sending
// PROXY v2 to the instances, whose routes run caddy-l4's proxy_protocol
// handler before pop3. Every client goes through HAProxy; each instance
// greets with its name, so a client knows which instance serves it.
//
// A missing haproxy or redis-server fails the test (scripts/install-deps.sh
// installs both); POP3_TEST_NO_REDIS=1 skips it outside CI.

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
	"github.com/caddy-pop3/caddy-pop3/internal/redistest"
)

const (
	// clusterFailures is failures_per_ip's count: the block must start at
	// this many failures from one address, summed over the instances.
	clusterFailures = 6
	// clusterUserSessions is sessions_per_user.
	clusterUserSessions = 2
	// haproxySource is HAProxy's address towards the instances, the only
	// one whose PROXY headers they use.
	haproxySource = "127.0.0.254"
	// loginBound is how long one login (USER to the PASS reply) may take
	// while Redis is down: its timeout is 200ms per operation, and after a
	// failure an instance leaves Redis alone for 2s.
	loginBound = time.Second
)

var clusterInstances = []string{"a", "b", "c"}

// clusterGreeting finds the instance name in a greeting.
var clusterGreeting = regexp.MustCompile(`^\+OK cluster instance ([a-z]+)\b`)

// cluster is the running cluster of TestCluster.
type cluster struct {
	front   string // HAProxy's frontend
	storage string // the instances' shared Caddy storage
	redis   *redistest.Server
	ha      *haproxyProc
	inst    map[string]*clusterInstance
	tls     *tls.Config // trusts the shared local CA
	ups     []string    // the two upstream addresses (one Dovecot)
}

type clusterInstance struct {
	*adminCaddy
	addr string // its POP3 listener, behind HAProxy
}

// TestCluster runs the cluster and, in order: one certificate for all
// three, a brute force spread over them blocked at the cluster-wide
// threshold, sessions_per_user across instances, user_hash from every
// instance, the cluster's sessions listed and closed from one instance's
// admin API, Redis killed and restarted under a login load, and one
// instance killed under load.
func TestCluster(t *testing.T) {
	need(t)
	start := time.Now()
	cl := startCluster(t)
	t.Logf("cluster up in %v (HAProxy %s, Redis %s)", time.Since(start).Round(time.Millisecond), cl.front, cl.redis.Addr)

	t.Run("OneCertificate", cl.testOneCertificate)
	t.Run("BruteForceBlockedClusterWide", func(t *testing.T) {
		n := cl.bruteForce(t, "127.0.0.31", "cl-bf-1")
		t.Logf("measured cluster-wide block threshold: %d failures (failures_per_ip %d, 3 instances)", n, clusterFailures)
	})
	t.Run("SessionsPerUserAcrossInstances", cl.testSessionsPerUser)
	t.Run("UserHashSameUpstreamFromEveryInstance", cl.testUserHash)
	t.Run("SessionsListedAndClosedAcrossInstances", cl.testClusterSessions) // before c is killed
	t.Run("RedisKilledAndRestartedUnderLoad", cl.testRedisOutage)
	t.Run("InstanceKilledUnderLoad", cl.testInstanceKilled)
	t.Logf("TestCluster took %v", time.Since(start).Round(time.Millisecond))
}

// --- the cluster ---------------------------------------------------------------

func clusterUsers() []string {
	names := []string{"cl-bf-1", "cl-bf-2", "cl-other", "cl-spu"}
	for _, name := range clusterInstances {
		names = append(names, "cl-adm-"+name)
	}
	for i := range 16 {
		names = append(names, fmt.Sprintf("cl-hash-%02d", i))
	}
	for i := range 8 {
		names = append(names, fmt.Sprintf("cl-load-%d", i))
	}
	return names
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	haBin := haproxyBinary(t)
	rs := redistest.Run(t)
	cl := &cluster{redis: rs, storage: filepath.Join(t.TempDir(), "storage"), inst: map[string]*clusterInstance{}}

	// One Dovecot reached at two addresses: its POP3 port and a second
	// plaintext listener.
	second := freePortT(t)
	host, port, _ := net.SplitHostPort(second)
	extra := fmt.Sprintf("service pop3-login {\n  inet_listener pop3-second {\n    address = %s\n    port = %s\n  }\n}\n", host, port) +
		dovecot.FastFailPassdb
	dc := startBackends(t, 1, clusterUsers(), func(int) string { return extra })[0].dc
	cl.ups = []string{dc.POP3Addr, second}
	usedSecret("cl-bf-1", wrongPass)
	usedSecret("cl-bf-2", wrongPass)

	addrs := freePorts(t, 2*len(clusterInstances))
	// Instance a first: it makes the local CA and issues the certificate
	// into the shared storage; b and c start together and find both there.
	// (Caddy's local CA does not lock its first creation, so three first
	// starts at once could each make a root.)
	launch := func(i int) (*clusterInstance, error) {
		name := clusterInstances[i]
		ci := &clusterInstance{addr: addrs[2*i]}
		admin := addrs[2*i+1]
		p, err := launchCaddy("cluster-"+name, cl.caddyfile(name, admin, ci.addr), t.TempDir(), nil, nil)
		if err != nil {
			return nil, err
		}
		ci.adminCaddy = &adminCaddy{caddyProc: p, admin: admin}
		t.Cleanup(func() {
			if err := p.stop(); err != nil {
				t.Errorf("stopping caddy %s: %v", name, err)
			}
			if t.Failed() {
				t.Logf("caddy %s log tail:\n%s", p.name, tail(p.log(), 40))
			}
		})
		return ci, cl.waitInstance(ci, name)
	}
	a, err := launch(0)
	if err != nil {
		t.Fatal(err)
	}
	cl.inst["a"] = a
	var wg sync.WaitGroup
	errs := make([]error, len(clusterInstances))
	insts := make([]*clusterInstance, len(clusterInstances))
	for i := 1; i < len(clusterInstances); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			insts[i], errs[i] = launch(i)
		}()
	}
	wg.Wait()
	for i := 1; i < len(clusterInstances); i++ {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		cl.inst[clusterInstances[i]] = insts[i]
	}

	var servers []string
	for _, name := range clusterInstances {
		servers = append(servers, name+" "+cl.inst[name].addr)
	}
	cl.ha = startHAProxy(t, haBin, servers)
	cl.front = cl.ha.front
	return cl
}

// caddyfile is instance name's config: the pop3 app with the shared Redis,
// the shared storage with the local CA, and one listener behind HAProxy
// whose pop3 handler offers STLS with the local certificate.
func (cl *cluster) caddyfile(name, admin, addr string) string {
	return fmt.Sprintf(`{
	admin %[1]s
	log {
		level DEBUG
	}
	storage file_system %[2]s
	local_certs
	skip_install_trust
	tls_automate_names localhost
	pop3 {
		redis %[3]s
		on_store_failure open
		instance %[4]s
	}
	layer4 {
		%[5]s {
			route {
				proxy_protocol {
					allow %[6]s/32
					timeout 2s
				}
				pop3 {
					upstream %[7]s
					upstream %[8]s
					lb_policy user_hash
					starttls on
					greeting "cluster instance %[4]s"
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
					}
					limits {
						sessions_per_user %[9]d
						failures_per_ip %[10]d 1m 1m
					}
				}
			}
		}
	}
}
`, admin, cl.storage, cl.redis.Addr, name, addr, haproxySource, cl.ups[0], cl.ups[1], clusterUserSessions, clusterFailures)
}

// waitInstance waits (bounded) until the instance's admin endpoint answers
// and its listener greets after a PROXY header from HAProxy's address and
// serves the shared certificate after STLS.
func (cl *cluster) waitInstance(ci *clusterInstance, name string) error {
	deadline := time.Now().Add(30 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-ci.done:
			return fmt.Errorf("caddy %s exited during startup: %v\n%s", name, ci.waitErr, tail(ci.log(), 40))
		default:
		}
		if lastErr = cl.probeInstance(ci, name); lastErr == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("caddy %s not ready within 30s: %v\n%s", name, lastErr, tail(ci.log(), 40))
}

func (cl *cluster) probeInstance(ci *clusterInstance, name string) error {
	if code, _, err := ci.try(http.MethodGet, "/config/", "", nil); err != nil || code != http.StatusOK {
		return fmt.Errorf("admin endpoint: %d %v", code, err)
	}
	if cl.tls == nil {
		pool, err := certPool(filepath.Join(cl.storage, "pki", "authorities", "local", "root.crt"))
		if err != nil {
			return err
		}
		cl.tls = &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	}
	d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(haproxySource)}}
	conn, err := d.Dial("tcp", ci.addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	s := &clSession{rawSession: rawSession{conn: conn, r: bufio.NewReader(conn)}}
	if _, err := io.WriteString(conn, "PROXY UNKNOWN\r\n"); err != nil { // a LOCAL connection, like HAProxy's checks
		return err
	}
	if err := s.greet(); err != nil {
		return err
	}
	if s.instance != name {
		return fmt.Errorf("greeting %q, want instance %s", s.greeting, name)
	}
	_, err = s.stls(cl.tls)
	return err
}

// --- HAProxy ---------------------------------------------------------------------

type haproxyProc struct {
	front  string
	socket string // the stats socket
	cmd    *exec.Cmd
	out    *syncBuffer
	done   chan struct{}
}

// haproxyBinary finds Debian's haproxy (in /usr/sbin, which a user's PATH
// may lack); a missing one fails the test.
func haproxyBinary(t *testing.T) string {
	t.Helper()
	if bin, err := exec.LookPath("haproxy"); err == nil {
		return bin
	}
	if _, err := os.Stat("/usr/sbin/haproxy"); err == nil {
		return "/usr/sbin/haproxy"
	}
	t.Fatal("haproxy not installed (scripts/install-deps.sh installs it; POP3_TEST_NO_INTEGRATION=1 skips the integration tests)")
	return ""
}

// startHAProxy runs `haproxy -f cfg -db` with a round-robin TCP frontend
// in front of servers ("name addr"), PROXY v2 towards them, POP3 health
// checks every 200ms, and waits until it reports every server up.
func startHAProxy(t *testing.T, bin string, servers []string) *haproxyProc {
	t.Helper()
	dir := t.TempDir()
	h := &haproxyProc{front: freePortT(t), socket: filepath.Join(dir, "stats.sock"), out: &syncBuffer{}, done: make(chan struct{})}
	var lines strings.Builder
	for _, s := range servers {
		lines.WriteString("\tserver " + s + "\n")
	}
	cfg := fmt.Sprintf(`global
	log stderr format raw local0 info
	stats socket %s mode 600 level admin
	maxconn 2000

defaults
	mode tcp
	log global
	option tcplog
	timeout connect 1s
	timeout client 60s
	timeout server 60s
	retries 3
	option redispatch 1

frontend pop3
	bind %s
	default_backend instances

backend instances
	balance roundrobin
	option tcp-check
	tcp-check expect string +OK
	tcp-check send QUIT\r\n
	tcp-check expect string +OK
	default-server check inter 200ms fall 3 rise 2 send-proxy-v2 source %s
%s`, h.socket, h.front, haproxySource, lines.String())
	file := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	h.cmd = exec.Command(bin, "-f", file, "-db")
	h.cmd.Dir = dir
	h.cmd.Stdout, h.cmd.Stderr = h.out, h.out
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("starting haproxy: %v", err)
	}
	go func() {
		_ = h.cmd.Wait()
		close(h.done)
	}()
	t.Cleanup(func() {
		_ = h.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.done:
		case <-time.After(5 * time.Second):
			_ = h.cmd.Process.Kill()
			<-h.done
		}
		if t.Failed() {
			t.Logf("haproxy log tail:\n%s", tail(h.out.String(), 40))
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := h.status()
		up := 0
		for _, s := range st {
			if s == "UP" {
				up++
			}
		}
		if err == nil && up == len(servers) {
			return h
		}
		select {
		case <-h.done:
			t.Fatalf("haproxy exited: %s", tail(h.out.String(), 20))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy: servers not all up within 20s: %v %v\n%s", st, err, tail(h.out.String(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// status asks the stats socket for each server's status (UP, DOWN, ...).
func (h *haproxyProc) status() (map[string]string, error) {
	conn, err := net.DialTimeout("unix", h.socket, time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(conn, "show stat\n"); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(conn)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "# ") {
		return nil, fmt.Errorf("show stat: %q", b)
	}
	head := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	col := func(name string) int { return slices.Index(head, name) }
	px, sv, stc := col("pxname"), col("svname"), col("status")
	out := map[string]string{}
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) <= stc || f[px] != "instances" || f[sv] == "BACKEND" {
			continue
		}
		out[f[sv]] = f[stc]
	}
	return out, nil
}

// --- clients -------------------------------------------------------------------

// clSession is a POP3 client through the cluster that reports errors
// instead of failing the test, for workers.
type clSession struct {
	rawSession
	greeting string
	instance string // from the greeting
}

// clusterDial connects to addr from the source IP local ("" for any) and
// reads the greeting.
func clusterDial(addr, local string) (*clSession, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	s := &clSession{rawSession: rawSession{conn: conn, r: bufio.NewReader(conn)}}
	if err := s.greet(); err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

func (s *clSession) greet() error {
	g, err := s.line()
	if err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	s.greeting = g
	m := clusterGreeting.FindStringSubmatch(g)
	if m == nil {
		return fmt.Errorf("greeting %q names no instance", g)
	}
	s.instance = m[1]
	return nil
}

func (s *clSession) local() string { return s.conn.LocalAddr().String() }

// login sends USER and PASS and returns the reply to PASS and how long
// the login took from USER on.
func (s *clSession) login(user, pass string) (string, time.Duration, error) {
	start := time.Now()
	if l, err := s.cmd("USER " + user); err != nil || !strings.HasPrefix(l, "+OK") {
		return "", 0, fmt.Errorf("USER: %q: %v", l, err)
	}
	reply, err := s.cmd("PASS " + pass)
	return reply, time.Since(start), err
}

// quit sends QUIT, expects +OK and a clean close with nothing after it.
func (s *clSession) quit() error {
	defer s.conn.Close()
	return s.rawSession.quit()
}

// stls upgrades with STLS and a verified handshake, and returns the
// server's leaf certificate.
func (s *clSession) stls(cfg *tls.Config) (*x509.Certificate, error) {
	if l, err := s.cmd("STLS"); err != nil || !strings.HasPrefix(l, "+OK") {
		return nil, fmt.Errorf("STLS: %q: %v", l, err)
	}
	tc := tls.Client(s.conn, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("STLS handshake: %w", err)
	}
	s.conn, s.r = tc, bufio.NewReader(tc)
	return tc.ConnectionState().PeerCertificates[0], nil
}

// dial is clusterDial through HAProxy that fails the test.
func (cl *cluster) dial(t *testing.T, local string) *clSession {
	t.Helper()
	s, err := clusterDial(cl.front, local)
	if err != nil {
		t.Fatalf("through HAProxy from %s: %v", local, err)
	}
	t.Cleanup(func() { s.conn.Close() })
	return s
}

// attempt logs in through HAProxy from local and returns the reply to
// PASS, sansID'd, and the session, still open.
func (cl *cluster) attempt(t *testing.T, local, user, pass string) (string, *clSession) {
	t.Helper()
	s := cl.dial(t, local)
	reply, _, err := s.login(user, pass)
	if err != nil {
		t.Fatalf("login as %s from %s on instance %s: %v", user, local, s.instance, err)
	}
	return sansID(reply), s
}

func mustQuit(t *testing.T, s *clSession) {
	t.Helper()
	if err := s.quit(); err != nil {
		t.Errorf("instance %s: %v", s.instance, err)
	}
}

// --- certificates --------------------------------------------------------------

// testOneCertificate: the three instances serve one certificate (one
// serial) through HAProxy, the shared storage holds one certificate for
// localhost, and one instance issued it.
func (cl *cluster) testOneCertificate(t *testing.T) {
	serials := map[string]string{}
	for i := 0; i < 6 && len(serials) < len(clusterInstances); i++ {
		s := cl.dial(t, "")
		cert, err := s.stls(cl.tls)
		if err != nil {
			t.Fatalf("instance %s: %v", s.instance, err)
		}
		serials[s.instance] = cert.SerialNumber.String()
		mustQuit(t, s)
	}
	t.Logf("served serials by instance: %v", serials)
	if len(serials) != len(clusterInstances) {
		t.Fatalf("6 connections through HAProxy reached instances %v, want all of %v", serials, clusterInstances)
	}
	var stored []string
	err := filepath.WalkDir(filepath.Join(cl.storage, "certificates"), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".crt") {
			stored = append(stored, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(stored) != 1 || filepath.Base(stored[0]) != "localhost.crt" {
		t.Fatalf("the shared storage holds certificates %v, want one for localhost", stored)
	}
	b, err := os.ReadFile(stored[0])
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", stored[0])
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for name, serial := range serials {
		if serial != leaf.SerialNumber.String() {
			t.Errorf("instance %s serves serial %s, the stored certificate has %s", name, serial, leaf.SerialNumber)
		}
	}
	issued := map[string]int{}
	total := 0
	for _, name := range clusterInstances {
		n := strings.Count(cl.inst[name].log(), "certificate obtained successfully")
		issued[name], total = n, total+n
	}
	t.Logf("certificate issuances logged by instance: %v; storage: %s", issued, strings.TrimPrefix(stored[0], cl.storage))
	if total != 1 {
		t.Errorf("instances logged %v issuances (%d in all), want one", issued, total)
	}
}

// --- limits ----------------------------------------------------------------------

type clusterBlock struct {
	Zone    string `json:"zone"`
	Limit   string `json:"limit"`
	Address string `json:"address"`
	User    string `json:"user"`
}

// blocked tells on how many live instances the admin API lists a
// failures_per_ip block of address.
func (cl *cluster) blocked(t *testing.T, address string) int {
	t.Helper()
	n := 0
	for _, name := range cl.live() {
		code, b := cl.inst[name].do(t, http.MethodGet, "/pop3/blocks", "", nil)
		if code != http.StatusOK {
			t.Fatalf("instance %s: GET /pop3/blocks: %d %s", name, code, b)
		}
		var blocks []clusterBlock
		if err := json.Unmarshal(b, &blocks); err != nil {
			t.Fatalf("instance %s: GET /pop3/blocks: %v: %s", name, err, b)
		}
		for _, bl := range blocks {
			if bl.Limit == "failures_per_ip" && bl.Address == address {
				n++
				break
			}
		}
	}
	return n
}

// live lists the instances whose Caddy still runs.
func (cl *cluster) live() []string {
	var out []string
	for _, name := range clusterInstances {
		select {
		case <-cl.inst[name].done:
		default:
			out = append(out, name)
		}
	}
	return out
}

// bruteForce sends wrong passwords for user from local through HAProxy,
// one connection each (so round-robin spreads them over the instances),
// until every live instance lists the address's block, and returns the
// number of failures that took. It must be clusterFailures: then the right
// password gets the wrong-password reply on every instance, while another
// address logs in.
func (cl *cluster) bruteForce(t *testing.T, local, user string) int {
	t.Helper()
	live := cl.live()
	byInstance := map[string]int{}
	fail := func() {
		t.Helper()
		reply, s := cl.attempt(t, local, user, wrongPass)
		if reply != replyAuthFailed {
			t.Fatalf("wrong password on instance %s: %q, want %q", s.instance, reply, replyAuthFailed)
		}
		byInstance[s.instance]++
		mustQuit(t, s)
	}
	for range clusterFailures - 1 {
		fail()
	}
	time.Sleep(100 * time.Millisecond) // a block started late would show now
	if n := cl.blocked(t, local); n > 0 {
		t.Fatalf("%s blocked after %d failures (by instance %v), before the threshold %d", local, clusterFailures-1, byInstance, clusterFailures)
	}
	threshold := 0
	for k := clusterFailures; k <= len(live)*clusterFailures+1 && threshold == 0; k++ {
		fail()
		deadline := time.Now().Add(time.Second)
		for threshold == 0 && time.Now().Before(deadline) {
			if cl.blocked(t, local) == len(live) {
				threshold = k
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	t.Logf("%s: failures by instance %v; blocked on all of %v after %d", local, byInstance, live, threshold)
	if len(byInstance) != len(live) {
		t.Errorf("the failures reached instances %v, want all of %v", byInstance, live)
	}
	if threshold != clusterFailures {
		t.Fatalf("%s blocked on every instance after %d failures, want failures_per_ip %d summed over the instances (0: never within %d)",
			local, threshold, clusterFailures, len(live)*clusterFailures+1)
	}
	// The next attempts, with the right password, on every instance.
	refused := map[string]bool{}
	for i := 0; i < 2*len(live) && len(refused) < len(live); i++ {
		reply, s := cl.attempt(t, local, user, poolPass)
		if reply != replyAuthFailed {
			t.Errorf("right password from the blocked %s on instance %s: %q, want the wrong-password reply %q", local, s.instance, reply, replyAuthFailed)
		}
		refused[s.instance] = true
		mustQuit(t, s)
	}
	if len(refused) != len(live) {
		t.Errorf("the blocked attempts reached instances %v, want all of %v", refused, live)
	}
	// Another client through the same HAProxy is not blocked.
	reply, s := cl.attempt(t, "127.0.0.32", "cl-other", poolPass)
	if !strings.HasPrefix(reply, "+OK") {
		t.Errorf("another address's login on instance %s: %q", s.instance, reply)
	}
	mustQuit(t, s)
	return threshold
}

// testSessionsPerUser: two sessions of a user on two instances; a third on
// the third instance is refused with [IN-USE] and succeeds once one of the
// two ended.
func (cl *cluster) testSessionsPerUser(t *testing.T) {
	const user = "cl-spu"
	var held []*clSession
	for range clusterUserSessions {
		reply, s := cl.attempt(t, "", user, poolPass)
		if !strings.HasPrefix(reply, "+OK") {
			t.Fatalf("login %d of %s on instance %s: %q", len(held)+1, user, s.instance, reply)
		}
		held = append(held, s)
	}
	reply, s := cl.attempt(t, "", user, poolPass)
	const inUse = "-ERR [IN-USE] Too many sessions for this user, try again later"
	on := []string{held[0].instance, held[1].instance, s.instance}
	t.Logf("sessions of %s on instances %v", user, on)
	if slices.Contains(on[:2], s.instance) || on[0] == on[1] {
		t.Fatalf("sessions landed on instances %v, want three different ones", on)
	}
	if reply != inUse {
		t.Fatalf("session %d of %s (on instance %s, the others on %v): %q, want %q", clusterUserSessions+1, user, s.instance, on[:2], reply, inUse)
	}
	// One of the two ends; the refused session, still in AUTHORIZATION,
	// logs in.
	first := held[0]
	local := first.local()
	mustQuit(t, first)
	waitFor(t, 5*time.Second, "the ended session to leave the admin list", func() bool {
		return !slices.ContainsFunc(cl.inst[first.instance].sessions(t, ""), func(a adminSession) bool { return a.Remote == local })
	})
	deadline := time.Now().Add(3 * time.Second)
	for {
		reply, _, err := s.login(user, poolPass)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(reply, "+OK") {
			break
		}
		if sansID(reply) != inUse || time.Now().After(deadline) {
			t.Fatalf("retry after a session of %s ended: %q", user, reply)
		}
		time.Sleep(300 * time.Millisecond)
	}
	mustQuit(t, s)
	mustQuit(t, held[1])
}

// --- user_hash ---------------------------------------------------------------

// testUserHash logs each of 16 mailboxes in once through every instance
// and reads from that instance's admin API which upstream the session
// went to: the same one from every instance.
func (cl *cluster) testUserHash(t *testing.T) {
	perUpstream := map[string]int{}
	for i := range 16 {
		user := fmt.Sprintf("cl-hash-%02d", i)
		ups := map[string]string{} // instance → upstream
		for range 2 * len(clusterInstances) {
			if len(ups) == len(clusterInstances) {
				break
			}
			reply, s := cl.attempt(t, "", user, poolPass)
			if !strings.HasPrefix(reply, "+OK") {
				t.Fatalf("login of %s on instance %s: %q", user, s.instance, reply)
			}
			local := s.local()
			var up string
			for _, a := range cl.inst[s.instance].sessions(t, "") {
				if a.Remote == local {
					up = a.Upstream
					if a.User != user {
						t.Errorf("instance %s lists session %s as user %q, want %q", s.instance, local, a.User, user)
					}
				}
			}
			if up == "" {
				t.Fatalf("instance %s lists no session from %s (the PROXY header's client) with an upstream", s.instance, local)
			}
			ups[s.instance] = up
			mustQuit(t, s)
		}
		if len(ups) != len(clusterInstances) {
			t.Fatalf("%s: sessions reached instances %v, want all three", user, ups)
		}
		first := ups["a"]
		for name, up := range ups {
			if up != first {
				t.Errorf("%s: instance %s sent it to %s, instance a to %s", user, name, up, first)
			}
		}
		perUpstream[first]++
	}
	t.Logf("mailboxes per upstream: %v", perUpstream)
	if len(perUpstream) != len(cl.ups) {
		t.Errorf("16 mailboxes went to upstreams %v, want both of %v", perUpstream, cl.ups)
	}
}

// --- the cluster's sessions in the admin API ---------------------------------------

// clusterListed is one entry of GET /pop3/sessions?cluster=1: a session's
// fields without byte counts, and its instance.
type clusterListed struct {
	ID           string    `json:"id"`
	User         string    `json:"user"`
	UpstreamUser string    `json:"upstream_user"`
	Remote       string    `json:"remote"`
	Upstream     string    `json:"upstream"`
	State        string    `json:"state"`
	TLS          bool      `json:"tls"`
	Start        time.Time `json:"start"`
	Instance     string    `json:"instance"`
}

// clusterSessions lists the cluster's sessions through the instance's
// admin API, GET /pop3/sessions?cluster=1, with filters ("&id=...", or ""
// for all).
func (ci *clusterInstance) clusterSessions(t *testing.T, filters string) []clusterListed {
	t.Helper()
	return getList[clusterListed](t, ci.adminCaddy, "/pop3/sessions?cluster=1"+filters)
}

// clusterHeld is a session held open through HAProxy, with the id that its
// instance's own list gives it.
type clusterHeld struct {
	*clSession
	id    string
	user  string // "" before login
	state string // "relay" after login, else "authorization"
}

func (h clusterHeld) String() string {
	return fmt.Sprintf("%s session %s (%s, instance %s)", h.state, h.id, h.local(), h.instance)
}

// testClusterSessions holds, through HAProxy, a logged-in session and one
// before login on each instance, and works on them through instance a's
// admin API only: ?cluster=1 lists all six with their instance (c's as c
// last wrote them to Redis), the list without it a's own only; DELETE
// ?cluster=1&id= closes each of c's two on c, through Redis pub/sub, as a
// kick on c would (a close after login, the administrator's -ERR before),
// after which no instance lists them, while a's and b's work on.
func (cl *cluster) testClusterSessions(t *testing.T) {
	const owner, asker = "c", "a"
	var held []clusterHeld
	have := map[string]int{} // instance → sessions held there (logged in first)
	for i := 0; i < 4*len(clusterInstances) && len(held) < 2*len(clusterInstances); i++ {
		s := cl.dial(t, "")
		h := clusterHeld{clSession: s, state: "authorization"}
		switch have[s.instance] {
		case 0:
			h.user, h.state = "cl-adm-"+s.instance, "relay"
			reply, _, err := s.login(h.user, poolPass)
			if err != nil || !strings.HasPrefix(reply, "+OK") {
				t.Fatalf("login of %s on instance %s: %q %v", h.user, s.instance, reply, err)
			}
		case 1: // stays before login
		default:
			mustQuit(t, s)
			continue
		}
		have[s.instance]++
		local := s.local()
		for _, a := range cl.inst[s.instance].sessions(t, "") {
			if a.Remote == local {
				h.id = a.ID
			}
		}
		if h.id == "" {
			t.Fatalf("instance %s does not list its session from %s", s.instance, local)
		}
		held = append(held, h)
	}
	if len(held) != 2*len(clusterInstances) {
		t.Fatalf("sessions through HAProxy by instance: %v, want two on each of %v", have, clusterInstances)
	}
	var ownerLogged, ownerPre clusterHeld
	var others []clusterHeld // on a and b
	for _, h := range held {
		switch {
		case h.instance != owner:
			others = append(others, h)
		case h.user != "":
			ownerLogged = h
		default:
			ownerPre = h
		}
	}
	t.Logf("held: %v", held)

	// listedAs finds h in list; it must be listed as its instance has it.
	listedAs := func(list []clusterListed, h clusterHeld) (bool, error) {
		for _, l := range list {
			if l.ID != h.id {
				continue
			}
			if l.Instance != h.instance || l.Remote != h.local() || l.User != h.user || l.State != h.state {
				return true, fmt.Errorf("%v listed as %+v", h, l)
			}
			return true, nil
		}
		return false, nil
	}
	// The registry is written about once a second: within ~3s instance a
	// lists every held session with its instance.
	start := time.Now()
	for {
		list := cl.inst[asker].clusterSessions(t, "")
		var missing []clusterHeld
		for _, h := range held {
			found, err := listedAs(list, h)
			if err != nil {
				t.Fatalf("instance %s, GET ?cluster=1: %v", asker, err)
			}
			if !found {
				missing = append(missing, h)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Since(start) > 3*time.Second {
			t.Fatalf("instance %s, GET ?cluster=1 after %v does not list %v; it lists %+v", asker, time.Since(start).Round(time.Millisecond), missing, list)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("instance %s listed the sessions of all instances %v after they opened", asker, time.Since(start).Round(time.Millisecond))
	// Without cluster=1: a's own only.
	own := cl.inst[asker].sessions(t, "")
	for _, h := range held {
		listed := slices.ContainsFunc(own, func(a adminSession) bool { return a.ID == h.id })
		if listed != (h.instance == asker) {
			t.Errorf("instance %s, GET without cluster=1: listed %v for %v", asker, listed, h)
		}
	}
	// The filter of ?cluster=1 by id.
	if got := cl.inst[asker].clusterSessions(t, "&id="+ownerLogged.id); len(got) != 1 || got[0].Instance != owner {
		t.Errorf("instance %s, GET ?cluster=1&id=%s: %+v, want %v", asker, ownerLogged.id, got, ownerLogged)
	}

	// closed kicks h from instance a and expects the end that connection
	// sees: after the -ERR line want, if any, a clean close with nothing
	// else.
	closed := func(h clusterHeld, want string) {
		t.Helper()
		kicked := time.Now()
		if n := cl.inst[asker].kick(t, "cluster=1&id="+h.id); n != 1 {
			t.Errorf("instance %s, DELETE ?cluster=1&id=%s (%v): closed %d, want 1", asker, h.id, h, n)
		}
		_ = h.conn.SetDeadline(time.Now().Add(5 * time.Second))
		if want != "" {
			if l, err := h.line(); l != want {
				t.Errorf("%v after the DELETE: %q %v, want %q", h, l, err, want)
			}
		}
		rest, err := io.ReadAll(h.r)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("%v: still open 5s after the DELETE on instance %s (read %q)", h, asker, rest)
		}
		if len(rest) > 0 || err != nil {
			t.Errorf("%v: %q then %v before the close, want nothing and a clean close", h, rest, err)
		}
		t.Logf("%v closed %v after the DELETE on instance %s", h, time.Since(kicked).Round(time.Millisecond), asker)
	}
	closed(ownerLogged, "")
	// The other session of c is not closed by that DELETE.
	if !slices.ContainsFunc(cl.inst[owner].sessions(t, ""), func(a adminSession) bool { return a.ID == ownerPre.id }) {
		t.Errorf("instance %s no longer lists %v after the DELETE of another session", owner, ownerPre)
	}
	closed(ownerPre, "-ERR [SYS/TEMP] Session closed by the administrator (session "+ownerPre.id+")")

	// No instance lists c's two any more (within ~3s: the registry), and
	// each lists a's and b's.
	start = time.Now()
	for _, name := range clusterInstances {
		for {
			list := cl.inst[name].clusterSessions(t, "")
			var wrong []string
			for _, h := range held {
				found, err := listedAs(list, h)
				switch {
				case err != nil:
					t.Fatalf("instance %s, GET ?cluster=1: %v", name, err)
				case found && h.instance == owner:
					wrong = append(wrong, "still lists closed "+h.String())
				case !found && h.instance != owner:
					wrong = append(wrong, "does not list "+h.String())
				}
			}
			if len(wrong) == 0 {
				break
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("instance %s, GET ?cluster=1 %v after the DELETEs: %v", name, time.Since(start).Round(time.Millisecond), wrong)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("the closed sessions left every instance's list within %v", time.Since(start).Round(time.Millisecond))

	// a's and b's sessions work on.
	for _, h := range others {
		cmd := "STAT"
		if h.user == "" {
			cmd = "USER cl-adm-" + h.instance
		}
		if l, err := h.cmd(cmd); err != nil || !strings.HasPrefix(l, "+OK") {
			t.Errorf("%v after the DELETEs on instance %s: %s: %q %v", h, asker, cmd, l, err)
			continue
		}
		mustQuit(t, h.clSession)
	}
}

// --- load ------------------------------------------------------------------------

// loadResult is one session of a load worker.
type loadResult struct {
	start    time.Time
	instance string // "" when it failed before the greeting
	login    time.Duration
	err      error
}

// runLoad runs workers, each logging in as its own user through HAProxy,
// STAT and QUIT, in a loop. The function it returns stops them and returns
// what they did; a second call returns the same.
func (cl *cluster) runLoad(users []string) func() []loadResult {
	stop := make(chan struct{})
	var mu sync.Mutex
	var results []loadResult
	var wg sync.WaitGroup
	for _, user := range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r := loadResult{start: time.Now()}
				r.err = func() error {
					s, err := clusterDial(cl.front, "")
					if err != nil {
						return err
					}
					defer s.conn.Close()
					r.instance = s.instance
					reply, took, err := s.login(user, poolPass)
					r.login = took
					if err != nil {
						return err
					}
					if !strings.HasPrefix(reply, "+OK") {
						return fmt.Errorf("login: %q", reply)
					}
					if l, err := s.cmd("STAT"); err != nil || !strings.HasPrefix(l, "+OK") {
						return fmt.Errorf("STAT: %q: %v", l, err)
					}
					return s.quit()
				}()
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	return sync.OnceValue(func() []loadResult {
		close(stop)
		wg.Wait()
		return results
	})
}

// loginStats is the median and the longest login of rs.
func loginStats(rs []loadResult) string {
	if len(rs) == 0 {
		return "none"
	}
	ds := make([]time.Duration, len(rs))
	for i, r := range rs {
		ds[i] = r.login
	}
	slices.Sort(ds)
	return fmt.Sprintf("%d, median %v, longest %v", len(ds), ds[len(ds)/2].Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond))
}

// testRedisOutage kills redis-server (SIGKILL) under a login load and
// starts it again: no login waits longer than loginBound, all succeed
// (on_store_failure open), the outage is logged, and afterwards a brute
// force is blocked at the cluster-wide threshold again.
func (cl *cluster) testRedisOutage(t *testing.T) {
	finish := cl.runLoad([]string{"cl-load-0", "cl-load-1", "cl-load-2", "cl-load-3"})
	defer finish()
	time.Sleep(time.Second)
	down := time.Now()
	if err := syscall.Kill(cl.redis.Pid(), syscall.SIGKILL); err != nil {
		t.Fatalf("killing redis-server: %v", err)
	}
	if err := cl.redis.Stop(); err != nil { // reaps it
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	up := time.Now()
	if err := cl.redis.Restart(); err != nil {
		t.Fatalf("restarting redis-server: %v", err)
	}
	// An instance leaves a failed Redis alone for 2s: by the end of the
	// load every instance has used it again.
	time.Sleep(2500 * time.Millisecond)
	results := finish()

	var before, during, after []loadResult
	for _, r := range results {
		switch {
		case r.start.Before(down):
			before = append(before, r)
		case r.start.Before(up):
			during = append(during, r)
		default:
			after = append(after, r)
		}
	}
	// The machine's own load is not a wait for Redis: the bound grows by
	// the slowest login while Redis ran, up to a second.
	var slowest time.Duration
	for _, r := range append(slices.Clone(before), after...) {
		slowest = max(slowest, r.login)
	}
	bound := loginBound + min(slowest, time.Second)
	t.Logf("logins before the outage: %s; during: %s; after: %s; bound %v",
		loginStats(before), loginStats(during), loginStats(after), bound.Round(time.Millisecond))
	for _, r := range results {
		if r.err != nil {
			t.Errorf("session at %+.3fs from the stop (instance %q): %v", r.start.Sub(down).Seconds(), r.instance, r.err)
		}
		if r.login > bound {
			t.Errorf("login at %+.3fs from the stop (instance %s) took %v, more than %v", r.start.Sub(down).Seconds(), r.instance, r.login, bound)
		}
	}
	if len(during) < 4 || len(after) < 4 {
		t.Errorf("too few logins to judge: %d during the outage, %d after", len(during), len(after))
	}
	warned, storeErrors := 0, 0.0
	for _, name := range clusterInstances {
		if strings.Contains(cl.inst[name].log(), "limits store (redis) unavailable") {
			warned++
		}
		storeErrors += cl.inst[name].metrics(t).get(pfx + "store_errors_total")
	}
	t.Logf("instances that logged the outage: %d; %s summed: %v", warned, pfx+"store_errors_total", storeErrors)
	if warned == 0 || storeErrors == 0 {
		t.Error("no instance logged or counted the limits store's outage")
	}
	n := cl.bruteForce(t, "127.0.0.33", "cl-bf-2")
	t.Logf("after the restart: blocked after %d failures", n)
}

// testInstanceKilled kills instance c (SIGKILL) while each instance holds
// sessions and a load runs: c's sessions end, the others' go on, new
// sessions go to a and b once HAProxy sees c down, and no session on a or
// b fails.
func (cl *cluster) testInstanceKilled(t *testing.T) {
	const victim = "c"
	held := map[string][]*clSession{}
	for i := 0; i < 12 && (len(held) < len(clusterInstances) || len(held[victim]) < 2); i++ {
		reply, s := cl.attempt(t, "", fmt.Sprintf("cl-hash-%02d", i), poolPass)
		if !strings.HasPrefix(reply, "+OK") {
			t.Fatalf("held login on instance %s: %q", s.instance, reply)
		}
		held[s.instance] = append(held[s.instance], s)
	}
	finish := cl.runLoad([]string{"cl-load-4", "cl-load-5", "cl-load-6", "cl-load-7"})
	defer finish()
	time.Sleep(700 * time.Millisecond)

	killed := time.Now()
	if err := cl.inst[victim].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	var seenDown time.Time
	for seenDown.IsZero() && time.Since(killed) < 10*time.Second {
		if st, err := cl.ha.status(); err == nil && strings.HasPrefix(st[victim], "DOWN") {
			seenDown = time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	if seenDown.IsZero() {
		t.Fatalf("HAProxy did not mark instance %s down within 10s", victim)
	}
	time.Sleep(1500 * time.Millisecond)
	results := finish()
	t.Logf("HAProxy marked instance %s down %v after the kill", victim, seenDown.Sub(killed).Round(time.Millisecond))

	// The held sessions: c's end, a's and b's work on.
	ended := 0
	for name, ss := range held {
		for _, s := range ss {
			_ = s.conn.SetDeadline(time.Now().Add(5 * time.Second))
			l, err := s.cmd("STAT")
			if name == victim {
				if err == nil {
					t.Errorf("a session held on the killed instance answered STAT: %q", l)
				} else {
					ended++
				}
				continue
			}
			if err != nil || !strings.HasPrefix(l, "+OK") {
				t.Errorf("a session held on instance %s after the kill: STAT %q: %v", name, l, err)
				continue
			}
			mustQuit(t, s)
		}
	}
	// The load: failures only for sessions on c, or before a greeting
	// between the kill and HAProxy's down; after that only a and b.
	perInstance := map[string]int{}
	var failedOnVictim, failedEarly int
	for _, r := range results {
		at := r.start.Sub(killed).Seconds()
		if r.start.After(seenDown) {
			perInstance[r.instance]++
			if r.instance == victim {
				t.Errorf("a session at %+.3fs from the kill, after HAProxy's down, went to instance %s", at, victim)
			}
		}
		if r.err == nil {
			continue
		}
		switch {
		case r.instance == victim:
			failedOnVictim++
		case r.instance == "" && !r.start.Before(killed.Add(-time.Second)) && r.start.Before(seenDown):
			failedEarly++
		default:
			t.Errorf("session at %+.3fs from the kill on instance %q failed: %v", at, r.instance, r.err)
		}
	}
	t.Logf("held sessions on the killed instance ended: %d of %d; load sessions %d, of which ended on %s by the kill %d, failed before a greeting %d; after the down by instance: %v",
		ended, len(held[victim]), len(results), victim, failedOnVictim, failedEarly, perInstance)
	if perInstance["a"] == 0 || perInstance["b"] == 0 {
		t.Errorf("sessions after the down by instance: %v, want both a and b", perInstance)
	}
	// Every session on a and b ended cleanly: none is left logged in.
	for _, name := range []string{"a", "b"} {
		waitFor(t, 5*time.Second, "instance "+name+" to list no logged-in session", func() bool {
			return !slices.ContainsFunc(cl.inst[name].sessions(t, ""), func(a adminSession) bool { return a.User != "" })
		})
	}
}
