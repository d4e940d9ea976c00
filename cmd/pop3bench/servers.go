package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

// dovecotExtra tunes the private Dovecot for many sessions from one
// address: login processes that serve many clients, mail processes that
// hold many sessions each (so 10,000 idle sessions do not mean 10,000
// processes), and no per-user-and-address connection cap.
func dovecotExtra(maxSessions int) string {
	perProc := 256
	procs := maxSessions/perProc + 64
	limit := maxSessions + 2000
	return fmt.Sprintf(`default_client_limit = %d
service pop3-login {
  service_count = 0
  process_min_avail = 2
  client_limit = %d
}
service pop3 {
  service_count = 0
  client_limit = %d
  process_limit = %d
}
protocol pop3 {
  mail_max_userip_connections = %d
}
`, limit, limit, perProc, procs, limit)
}

// masterExtra is the master passdb that caddy-pop3's master_login logs in
// with (AUTH PLAIN, the user as authorization identity), from mastersFile.
func masterExtra(mastersFile string) string {
	return fmt.Sprintf(`auth_master_user_separator = *
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%%u %s
  master = yes
}
`, mastersFile)
}

// passwdSetup is what the passwd_file logins need: the proxy's users with
// the passwords they log in with (a bcrypt hash of each in the file), the
// passwd-file, and the Dovecot master user that master_login uses.
type passwdSetup struct {
	users                []userCred
	file                 string
	masterUser, masterPw string
	mastersFile          string
}

// backendPassword is a passwd_file user's own password in Dovecot: not the
// one the client sends, so only the master login gets in.
func backendPassword(u userCred) string { return "dovecot-only-" + u.pass }

// writePasswd writes the passwd-file of pw.users with a BLF-CRYPT hash of
// each password made by `doveadm pw` (its default cost), and the master
// users' file for Dovecot.
func writePasswd(pw *passwdSetup) error {
	var file strings.Builder
	file.WriteString("# pop3bench: users checked at the proxy; hashes by doveadm pw -s BLF-CRYPT\n")
	for _, u := range pw.users {
		out, err := exec.Command("doveadm", "pw", "-s", "BLF-CRYPT", "-p", u.pass).CombinedOutput()
		if err != nil {
			return fmt.Errorf("doveadm pw -s BLF-CRYPT: %w: %s", err, bytes.TrimSpace(out))
		}
		hash := strings.TrimSpace(string(out))
		if !strings.HasPrefix(hash, "{BLF-CRYPT}$2") {
			return fmt.Errorf("doveadm pw -s BLF-CRYPT: unexpected output %q", hash)
		}
		fmt.Fprintf(&file, "%s:%s::::::\n", u.name, hash)
	}
	if err := os.WriteFile(pw.file, []byte(file.String()), 0o600); err != nil {
		return err
	}
	// Dovecot's auth process (an unprivileged user) reads it.
	return os.WriteFile(pw.mastersFile, []byte(pw.masterUser+":{PLAIN}"+pw.masterPw+"\n"), 0o644)
}

// startDovecot starts the private Dovecot with the RETR user (one message
// of msg), the login users (one small message each) and, with pw, the
// passwd_file users (one small message each, a password of their own) and
// the master passdb.
func startDovecot(dir string, msg []byte, retrUser userCred, users []userCred, pw *passwdSetup, maxSessions int) (*dovecot.Server, error) {
	small := []byte("From: bench@example.com\r\nSubject: small\r\n\r\nA small message for STAT.\r\n")
	du := []dovecot.User{{Name: retrUser.name, Password: retrUser.pass, Messages: [][]byte{msg}}}
	for _, u := range users {
		du = append(du, dovecot.User{Name: u.name, Password: u.pass, Messages: [][]byte{small}})
	}
	extra := dovecotExtra(maxSessions)
	if pw != nil {
		for _, u := range pw.users {
			du = append(du, dovecot.User{Name: u.name, Password: backendPassword(u), Messages: [][]byte{small}})
		}
		extra += masterExtra(pw.mastersFile)
	}
	return dovecot.Start(dovecot.Config{
		Dir:   filepath.Join(dir, "dovecot"),
		Users: du,
		Extra: extra,
	})
}

// authServer is the auth_http stand-in for NGINX (and for caddy-pop3 with
// -caddy-auth-http): every login goes to Dovecot's plain port.
type authServer struct {
	addr string
	srv  *http.Server
}

func startAuthServer(upstream string) (*authServer, error) {
	host, port, err := net.SplitHostPort(upstream)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Auth-Status", "OK")
		w.Header().Set("Auth-Server", host)
		w.Header().Set("Auth-Port", port)
		w.WriteHeader(http.StatusOK)
	})
	a := &authServer{addr: ln.Addr().String(), srv: &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}}
	go func() { _ = a.srv.Serve(ln) }()
	return a, nil
}

func (a *authServer) Close() { _ = a.srv.Close() }

// child is a server process pop3bench started in its own process group.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	log  string // file with its output
}

func startChild(name, logFile string, env []string, bin string, args ...string) (*child, error) {
	out, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), env...)
	// Own process group, and SIGKILL if pop3bench dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{}), log: logFile}
	go func() { c.err = cmd.Wait(); close(c.done) }()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends sig to the process group, then SIGKILL after 10 s.
func (c *child) stop(sig syscall.Signal) {
	if c == nil || c.exited() {
		return
	}
	_ = syscall.Kill(-c.pid(), sig)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-c.pid(), syscall.SIGKILL)
		<-c.done
	}
}

func (c *child) tail() string {
	b, _ := os.ReadFile(c.log)
	return fmt.Sprintf("--- last lines of %s:\n%s", c.log, lastLines(string(b), 25))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitGreeting polls addr until it greets with +OK, c exits or timeout.
func waitGreeting(c *child, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if c.exited() {
			return fmt.Errorf("%s exited during startup: %v\n%s", c.name, c.err, c.tail())
		}
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
			line, rerr := bufio.NewReader(conn).ReadString('\n')
			_, _ = conn.Write([]byte("QUIT\r\n"))
			conn.Close()
			if rerr == nil && strings.HasPrefix(line, "+OK") {
				return nil
			}
			err = rerr
			if err == nil {
				err = fmt.Errorf("greeting %q", strings.TrimSpace(line))
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: no POP3 greeting on %s within %v: %v\n%s", c.name, addr, timeout, last, c.tail())
}

// freeAddrs returns n distinct free loopback addresses, outside the
// ephemeral port range that the load's own connections use.
func freeAddrs(n int) ([]string, error) {
	addrs := make([]string, n)
	for i := range addrs {
		a, err := dovecot.FreeAddr()
		if err != nil {
			return nil, err
		}
		addrs[i] = a
	}
	return addrs, nil
}

// caddyProxy is caddy-pop3 running in a Caddy child process.
type caddyProxy struct {
	bin, dir  string
	addrs     [numModes]string
	adminAddr string
	extraEnv  []string // -caddy-env
	child     *child
	// passwd, when set: two more plain listeners whose users are checked
	// at the proxy (passwd_file) and logged in upstream with master_login,
	// the second with auth_cache.
	passwd      *passwdSetup
	passwdAddrs [2]string // uncached, cached
	// limitsAddr: a plain listener like addrs[modePlain] with limitsBlock.
	limitsAddr string
}

// limitsBlock is the pop3 handler's limits block on the "limits on" plain
// listener: every option, with values that the benchmark's clients never
// reach. They all come from 127.0.0.1 as a few users, so the per-address
// and per-user caps are far above any -c, and their logins all succeed, so
// no failure is counted; 127.0.0.1 is not exempt (the exempt network is
// TEST-NET-1), so every limit is evaluated for every session.
var limitsBlock = []string{
	"limits {",
	"\tsessions_per_ip 100000",
	"\tsessions_per_user 100000",
	"\tsessions_per_user_ip 100000",
	"\tconnections_per_ip 1000000 1s",
	"\tfailures_per_user_ip 5 15m 15m",
	"\tfailures_per_ip 50 15m 1h",
	"\tfailures_per_user 20 15m 15m",
	"\tipv6_prefix 56",
	"\texempt 192.0.2.0/24",
	"\tmin_input_rate 1 10s",
	"\tmax_session_lifetime 1h",
	"}",
}

// pop3Handler is a pop3 handler in a layer4 route of a global layer4
// block, with its options extra: to upstream, or asking the auth_http
// stand-in at authURL when that is set.
func pop3Handler(upstream, authURL string, extra ...string) string {
	var b strings.Builder
	if authURL != "" {
		b.WriteString("pop3 {\n\t\t\t\t\tauth_http " + authURL + "\n")
	} else {
		b.WriteString("pop3 " + upstream + " {\n")
	}
	for _, e := range extra {
		b.WriteString("\t\t\t\t\t" + e + "\n")
	}
	b.WriteString("\t\t\t\t}")
	return b.String()
}

// caddyfile writes the configuration: a plain listener (starttls off), an
// STLS listener (starttls only) and an implicit TLS listener (pop3 with
// implicit_tls), all to Dovecot's plain port, or through the auth_http
// stand-in when authURL is set, and a second plain listener that is the
// first with limitsBlock. Certificates come from Caddy's internal CA.
// With p.passwd two plain listeners follow whose users caddy-pop3 checks in
// a passwd_file and logs in to Dovecot's plain port as the master user,
// without and with auth_cache.
func (p *caddyProxy) caddyfile(upstream, authURL, logLevel string) string {
	pop3 := func(extra ...string) string { return pop3Handler(upstream, authURL, extra...) }
	policy := []string{"connection_policy {", "\talpn pop3", "\tdefault_sni localhost", "}"}
	passwd := ""
	if pw := p.passwd; pw != nil {
		auth := []string{"starttls off", "passwd_file " + pw.file, "master_login " + pw.masterUser + " " + pw.masterPw}
		static := func(extra ...string) string { return pop3Handler(upstream, "", extra...) }
		passwd = fmt.Sprintf(`		# plain, users checked at the proxy (passwd_file, bcrypt), master login upstream
		%s {
			route {
				%s
			}
		}
		# the same with auth_cache
		%s {
			route {
				%s
			}
		}
`, p.passwdAddrs[0], static(auth...),
			p.passwdAddrs[1], static(append(auth, "auth_cache {", "\tttl 1h", "}")...))
	}
	return fmt.Sprintf(`# Written by pop3bench.
{
	admin %s
	local_certs
	skip_install_trust
	tls_automate_names localhost
	log {
		level %s
	}
	layer4 {
		# plain, port 110 style, no STLS
		%s {
			route {
				%s
			}
		}
		# STLS, port 110 style
		%s {
			route {
				%s
			}
		}
		# implicit TLS, port 995 style
		%s {
			route {
				%s
			}
		}
		# plain as the first, with every limit on and none reached
		%s {
			route {
				%s
			}
		}
%s	}
}
`, p.adminAddr, logLevel,
		p.addrs[modePlain], pop3("starttls off"),
		p.addrs[modeSTLS], pop3(append([]string{"starttls only"}, policy...)...),
		p.addrs[modeTLS], pop3(append([]string{"implicit_tls"}, policy...)...),
		p.limitsAddr, pop3(append([]string{"starttls off"}, limitsBlock...)...),
		passwd)
}

func newCaddyProxy(bin, dir, upstream, authURL, logLevel string, extraEnv []string, pw *passwdSetup) (*caddyProxy, error) {
	addrs, err := freeAddrs(7)
	if err != nil {
		return nil, err
	}
	p := &caddyProxy{bin: bin, dir: dir, adminAddr: addrs[3], extraEnv: extraEnv, passwd: pw, limitsAddr: addrs[6]}
	copy(p.addrs[:], addrs[:3])
	copy(p.passwdAddrs[:], addrs[4:6])
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(p.caddyfile(upstream, authURL, logLevel)), 0o644); err != nil {
		return nil, err
	}
	return p, p.start()
}

// rootCA is Caddy's local CA root, which signs the certificate it serves.
func (p *caddyProxy) rootCA() string {
	return filepath.Join(p.dir, "data", "caddy", "pki", "authorities", "local", "root.crt")
}

func (p *caddyProxy) start() error {
	env := []string{
		"XDG_DATA_HOME=" + filepath.Join(p.dir, "data"),
		"XDG_CONFIG_HOME=" + filepath.Join(p.dir, "config"),
		"HOME=" + p.dir,
	}
	env = append(env, p.extraEnv...)
	c, err := startChild("caddy", filepath.Join(p.dir, "caddy.log"), env, p.bin,
		"run", "--config", filepath.Join(p.dir, "Caddyfile"), "--adapter", "caddyfile")
	if err != nil {
		return err
	}
	p.child = c
	if err := waitGreeting(c, p.addrs[modePlain], 60*time.Second); err != nil {
		p.stop()
		return err
	}
	if p.addrs[modeTLS] == "" { // a Caddy with plain listeners only
		return nil
	}
	// The internal CA writes its root at start; the certificate for
	// localhost follows in the background: wait for a TLS handshake.
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := p.tlsReady()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || c.exited() {
			p.stop()
			return fmt.Errorf("caddy: no TLS on %s: %v\n%s", p.addrs[modeTLS], err, c.tail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (p *caddyProxy) tlsReady() error {
	pem, err := os.ReadFile(p.rootCA())
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return errors.New("bad root.crt")
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", p.addrs[modeTLS], &tls.Config{RootCAs: pool, ServerName: "localhost"})
	if err != nil {
		return err
	}
	return c.Close()
}

func (p *caddyProxy) stop() { p.child.stop(syscall.SIGTERM) }

func (p *caddyProxy) restart() error {
	p.stop()
	return p.start()
}

func (p *caddyProxy) pids() ([]int, error) {
	if p.child.exited() {
		return nil, fmt.Errorf("caddy exited: %v\n%s", p.child.err, p.child.tail())
	}
	return []int{p.child.pid()}, nil
}

// adminGet fetches path from Caddy's admin endpoint.
func (p *caddyProxy) adminGet(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.adminAddr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// goroutines is Caddy's goroutine count, from /debug/pprof/goroutine.
func (p *caddyProxy) goroutines() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := p.adminGet(ctx, "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	// "goroutine profile: total 123"
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) == 0 {
		return 0, fmt.Errorf("goroutine profile: %q", line)
	}
	return strconv.Atoi(f[len(f)-1])
}

// goStack is the memory of Caddy's goroutine stacks, from the Go
// collector's go_memstats_stack_inuse_bytes on the admin endpoint's /metrics.
func (p *caddyProxy) goStack() (float64, error) { return p.goMetric("go_memstats_stack_inuse_bytes") }

// goMetric reads one unlabelled sample (of the Go collector, or a counter
// without labels) from /metrics.
func (p *caddyProxy) goMetric(name string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := p.adminGet(ctx, "/metrics")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("no %s in /metrics", name)
}

// liveHeap runs a garbage collection in Caddy (/debug/pprof/heap?gc=1, as
// the runtime itself does at the latest every two minutes) and returns the
// heap that stayed allocated.
func (p *caddyProxy) liveHeap() (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := p.adminGet(ctx, "/debug/pprof/heap?gc=1"); err != nil {
		return 0, err
	}
	return p.goMetric("go_memstats_heap_alloc_bytes")
}

// nginxProxy is NGINX's mail proxy: a private master with its workers.
type nginxProxy struct {
	bin, dir string
	addrs    [numModes]string
	child    *child
}

// nginxConf writes the configuration: the same three listeners as Caddy's,
// every login sent by auth_http to Dovecot's plain port.
func (p *nginxProxy) nginxConf(authAddr, certFile, keyFile, workers, proxyBuffer string, fdLimit uint64, connections int) string {
	buffer := ""
	if proxyBuffer != "" {
		buffer = "\tproxy_buffer " + proxyBuffer + ";\n"
	}
	return fmt.Sprintf(`# Written by pop3bench.
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
worker_processes %s;
worker_rlimit_nofile %d;
pid %s;
error_log %s warn;

events {
	worker_connections %d;
}

mail {
	server_name localhost;
	auth_http 127.0.0.1:%s/auth;
	ssl_certificate %s;
	ssl_certificate_key %s;
	# NGINX 1.22 leaves TLS 1.3 out by default; 1.23.4 and later have it.
	ssl_protocols TLSv1.2 TLSv1.3;
%s
	# plain, port 110 style, no STLS
	server {
		listen %s;
		protocol pop3;
		pop3_auth plain;
		starttls off;
	}
	# STLS, port 110 style
	server {
		listen %s;
		protocol pop3;
		pop3_auth plain;
		starttls only;
	}
	# implicit TLS, port 995 style
	server {
		listen %s ssl;
		protocol pop3;
		pop3_auth plain;
	}
}
`, workers, fdLimit, filepath.Join(p.dir, "nginx.pid"), filepath.Join(p.dir, "error.log"), connections,
		portOf(authAddr), certFile, keyFile, buffer,
		p.addrs[modePlain], p.addrs[modeSTLS], p.addrs[modeTLS])
}

func portOf(addr string) string {
	_, port, _ := net.SplitHostPort(addr)
	return port
}

func newNginxProxy(bin, dir, authAddr, certFile, keyFile, workers, proxyBuffer string, maxSessions int) (*nginxProxy, error) {
	addrs, err := freeAddrs(3)
	if err != nil {
		return nil, err
	}
	p := &nginxProxy{bin: bin, dir: dir}
	copy(p.addrs[:], addrs)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	_, hard := fdLimit()
	// Two descriptors per session, all in one worker at worst.
	conns := 2*maxSessions + 1024
	conf := p.nginxConf(authAddr, certFile, keyFile, workers, proxyBuffer, hard, conns)
	if err := os.WriteFile(filepath.Join(p.dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return p, p.start()
}

func (p *nginxProxy) start() error {
	c, err := startChild("nginx", filepath.Join(p.dir, "output.log"), nil, p.bin,
		"-p", p.dir, "-c", filepath.Join(p.dir, "nginx.conf"), "-e", filepath.Join(p.dir, "error.log"), "-g", "daemon off;")
	if err != nil {
		return err
	}
	p.child = c
	if err := waitGreeting(c, p.addrs[modePlain], 30*time.Second); err != nil {
		b, _ := os.ReadFile(filepath.Join(p.dir, "error.log"))
		p.stop()
		return fmt.Errorf("%w\n--- error.log:\n%s", err, lastLines(string(b), 20))
	}
	return nil
}

// stop: SIGQUIT is NGINX's graceful shutdown, which waits for sessions;
// SIGTERM is its fast one.
func (p *nginxProxy) stop() { p.child.stop(syscall.SIGTERM) }

func (p *nginxProxy) restart() error {
	p.stop()
	return p.start()
}

// pids is the master and its workers.
func (p *nginxProxy) pids() ([]int, error) {
	if p.child.exited() {
		return nil, fmt.Errorf("nginx exited: %v\n%s", p.child.err, p.child.tail())
	}
	master := p.child.pid()
	return append([]int{master}, children(master)...), nil
}

func versionOf(bin string, args ...string) string {
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}
