//go:build integration

package integration

// The harness for the Dovecot tests: one Caddy binary built for the package,
// one private Dovecot, Caddy processes started from Caddyfiles, and a small
// POP3 client that sees the exact bytes on the wire.
//
//	go test -race -count=1 -tags integration ./integration/
//
// POP3_TEST_CADDY=/path/to/caddy uses that binary instead of building
// ./cmd/caddy. A missing Dovecot, curl or python3 fails the tests; a
// developer may opt out locally with POP3_TEST_NO_INTEGRATION=1, which skips
// them; with CI set the opt-out is ignored.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

// Test users. bob's name and password hold characters that need care on
// the wire and in passwd-files: '@', a space, ':', '%' and UTF-8.
const (
	alice, alicePass = "alice", "alice-Secr3t-pw"
	bob, bobPass     = "bob@example.com", "p@ss wörd:%"
	carol, carolPass = "carol", "carol-Secr3t-pw" // only the refused-login tests use carol
	dave, davePass   = "dave", "dave-Secr3t-pw"   // mailbox changed by DELE tests
	big, bigPass     = "bigmail", "bigmail-Secr3t-pw"
	// wrongPass is a wrong password for every user; like every password
	// here it must never appear in Caddy's logs.
	wrongPass = "wr0ng-Secr3t-guess"
)

// env is what TestMain prepared for every test.
var env struct {
	skip     bool  // POP3_TEST_NO_INTEGRATION=1
	err      error // setup failed: every test fails with it
	tmp      string
	caddyBin string
	dc       *dovecot.Server
	caddy    *caddyProc // the shared Caddy with every listener below
	// Listeners of the shared Caddy.
	only, on, off, implicit, down string
	implicitOpt                   string // pop3 with implicit_tls, no tls handler
	closedPort                    string // where the down listener's upstream is (nothing listens)

	aliceMsgs, daveMsgs [][]byte
	bigMsgs             [][]byte // [small dot-stuffing message, 32 MiB message]
}

func TestMain(m *testing.M) {
	if os.Getenv("POP3_TEST_NO_INTEGRATION") == "1" {
		if os.Getenv("CI") == "" {
			env.skip = true
			os.Exit(m.Run())
		}
		fmt.Fprintln(os.Stderr, "integration: ignoring POP3_TEST_NO_INTEGRATION=1 in CI")
	}
	start := time.Now()
	env.err = setup()
	if env.err == nil {
		fmt.Fprintf(os.Stderr, "integration: setup took %v\n", time.Since(start).Round(time.Millisecond))
	}
	code := m.Run()
	teardown()
	os.Exit(code)
}

func setup() error {
	for _, tool := range []string{"curl", "python3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not installed (scripts/install-deps.sh installs it; POP3_TEST_NO_INTEGRATION=1 skips these tests): %w", tool, err)
		}
	}
	tmp, err := os.MkdirTemp("/tmp", "pop3-integration-")
	if err != nil {
		return err
	}
	env.tmp = tmp
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}

	// Build Caddy while Dovecot starts and the big message is made.
	buildErr := make(chan error, 1)
	go func() { buildErr <- buildCaddy(tmp) }()

	if err := startDovecot(filepath.Join(tmp, "dovecot")); err != nil {
		<-buildErr
		return err
	}
	if err := <-buildErr; err != nil {
		return err
	}

	closed, err := freePort()
	if err != nil {
		return err
	}
	env.closedPort = closed
	ports := make([]string, 6)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return err
		}
	}
	env.only, env.on, env.off, env.implicit, env.down, env.implicitOpt = ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]
	cf := sharedCaddyfile()
	p, err := launchCaddy("shared", cf, filepath.Join(tmp, "caddy-shared"), nil, []listener{
		{addr: env.only}, {addr: env.on}, {addr: env.off}, {addr: env.implicit, tls: true}, {addr: env.down},
		{addr: env.implicitOpt, tls: true},
	})
	if err != nil {
		return err
	}
	env.caddy = p
	return nil
}

// sharedCaddyfile serves one pop3 handler per STLS policy, implicit TLS
// (by caddy-l4's tls handler and by implicit_tls) and an upstream that is
// down, all in front of the package's Dovecot.
func sharedCaddyfile() string {
	return fmt.Sprintf(`{
	admin off
	log {
		level DEBUG
	}
	local_certs
	skip_install_trust
	tls_automate_names localhost
	layer4 {
		# starttls only (the default): login needs STLS first
		%[1]s {
			route {
				pop3 %[6]s {
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
		# starttls on: STLS offered, plaintext login allowed
		%[2]s {
			route {
				pop3 {
					upstream %[6]s
					starttls on
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
		# starttls off: plaintext only
		%[3]s {
			route {
				pop3 %[6]s {
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
		# implicit TLS, port 995 style, by caddy-l4's tls handler
		%[4]s {
			route {
				tls {
					connection_policy {
						alpn pop3
						default_sni localhost
					}
				}
				pop3 %[6]s {
					auth_failure_delay 1ms
				}
			}
		}
		# implicit TLS, port 995 style, by the pop3 handler (default ALPN pop3)
		%[8]s {
			route {
				pop3 %[6]s {
					implicit_tls
					auth_failure_delay 1ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
		# the upstream is a closed port
		%[5]s {
			route {
				pop3 %[7]s {
					starttls on
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
	}
}
`, env.only, env.on, env.off, env.implicit, env.down, env.dc.POP3Addr, env.closedPort, env.implicitOpt)
}

func teardown() {
	if env.caddy != nil {
		_ = env.caddy.stop()
	}
	if env.dc != nil {
		_ = env.dc.Stop()
	}
	if env.tmp != "" && os.Getenv("POP3_TEST_KEEP") == "" {
		_ = os.RemoveAll(env.tmp)
	}
}

// need returns after skipping the test (opt-out) or failing it (setup
// failed).
func need(t *testing.T) {
	t.Helper()
	if env.skip {
		t.Skip("POP3_TEST_NO_INTEGRATION=1")
	}
	if env.err != nil {
		t.Fatalf("integration setup failed: %v", env.err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dovecot log tail:\n%s", tail(env.dc.Log(), 30))
			t.Logf("shared caddy log tail:\n%s", tail(env.caddy.log(), 40))
		}
	})
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// buildCaddy builds ./cmd/caddy from the repository root, or takes
// POP3_TEST_CADDY.
func buildCaddy(tmp string) error {
	if bin := os.Getenv("POP3_TEST_CADDY"); bin != "" {
		env.caddyBin = bin
		return nil
	}
	root, err := filepath.Abs("..")
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "caddy")); err != nil {
		return fmt.Errorf("finding the repository root: %w", err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(tmp, "caddy")
	start := time.Now()
	cmd := exec.Command(goBin, "build", "-o", bin, "./cmd/caddy")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/caddy: %w\n%s", err, out)
	}
	fmt.Fprintf(os.Stderr, "integration: built caddy in %v\n", time.Since(start).Round(time.Millisecond))
	env.caddyBin = bin
	return nil
}

// startDovecot starts the package's Dovecot. bob's password holds ':',
// which a passwd-file line cannot, so it is stored base64-encoded in a
// second passwd-file that Dovecot asks after the first one fails; bob is
// also in the first one (with an unused password) so that his home exists.
func startDovecot(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b64Users := filepath.Join(dir, "users-b64")
	line := fmt.Sprintf("%s:{PLAIN.b64}%s\n", bob, base64.StdEncoding.EncodeToString([]byte(bobPass)))
	if err := os.WriteFile(b64Users, []byte(line), 0o644); err != nil {
		return err
	}
	extra := fmt.Sprintf("passdb {\n  driver = passwd-file\n  args = username_format=%%u %s\n}\n", b64Users) +
		dovecot.FastFailPassdb

	env.aliceMsgs = [][]byte{
		mkMessage("first", "Hello Alice.\r\n"),
		mkMessage("dots", ".\r\n..\r\n.leading dot\r\nend\r\n"),
		mkMessage("third", strings.Repeat("line of the third message\r\n", 40)),
	}
	env.daveMsgs = make([][]byte, 5)
	for i := range env.daveMsgs {
		env.daveMsgs[i] = mkMessage(fmt.Sprintf("dave %d", i+1), strings.Repeat(fmt.Sprintf("body %d\r\n", i+1), 3*(i+1)))
	}
	env.bigMsgs = [][]byte{dotMessage(), bigMessage(32 << 20)}

	srv, err := dovecot.Start(dovecot.Config{
		Dir: dir,
		Users: []dovecot.User{
			{Name: alice, Password: alicePass, Messages: env.aliceMsgs},
			{Name: bob, Password: "unused-" + fmt.Sprint(time.Now().UnixNano()), Messages: env.aliceMsgs[:2]},
			{Name: carol, Password: carolPass, Messages: env.aliceMsgs[:1]},
			{Name: dave, Password: davePass, Messages: env.daveMsgs},
			{Name: big, Password: bigPass, Messages: env.bigMsgs},
		},
		Extra: extra,
	})
	if err != nil {
		if errors.Is(err, dovecot.ErrNotInstalled) {
			return fmt.Errorf("%w (POP3_TEST_NO_INTEGRATION=1 skips these tests)", err)
		}
		return err
	}
	env.dc = srv
	return nil
}

// mkMessage returns a small RFC 5322 message with CRLF line ends.
func mkMessage(subject, body string) []byte {
	return []byte("From: sender@example.com\r\nTo: someone@example.com\r\nSubject: " + subject +
		"\r\nMessage-ID: <" + strings.ReplaceAll(subject, " ", "-") + "@example.com>\r\n\r\n" + body)
}

// dotMessage is a small message whose RETR needs dot-stuffing.
func dotMessage() []byte {
	return mkMessage("dot stuffing", "before\r\n.\r\n..\r\n...three\r\n. space\r\n.\r\nafter\r\n")
}

// bigMessage returns a message of about size bytes: CRLF lines with 8-bit
// bytes (no NUL, CR or LF: Dovecot rewrites NUL), many lines starting with
// '.', lone "." lines and a line of exactly 998 octets (RFC 5322 §2.1.1).
func bigMessage(size int) []byte {
	rng := rand.New(rand.NewSource(1))
	var b bytes.Buffer
	b.Grow(size + 2048)
	b.WriteString("From: big@example.com\r\nTo: someone@example.com\r\nSubject: 32 MiB\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
	b.Write(bytes.Repeat([]byte("x"), 998))
	b.WriteString("\r\n")
	line := make([]byte, 0, 998)
	for i := 0; b.Len() < size; i++ {
		line = line[:0]
		switch i % 7 {
		case 0:
			line = append(line, '.')
		case 3:
			line = append(line, '.', '.')
		}
		n := rng.Intn(120)
		if i%1000 == 500 {
			n = 998 - len(line)
		}
		for j := 0; j < n; j++ {
			c := byte(rng.Intn(256))
			if c == 0 || c == '\r' || c == '\n' {
				c = 'z'
			}
			line = append(line, c)
		}
		if i%97 == 0 {
			line = append(line[:0], '.') // a lone "." must become ".."
		}
		b.Write(line)
		b.WriteString("\r\n")
	}
	b.WriteString("..last\r\n")
	return b.Bytes()
}

// stuffed returns msg as RETR sends it (RFC 1939 §3): a '.' prepended to
// every line that starts with one.
func stuffed(msg []byte) []byte {
	var b bytes.Buffer
	b.Grow(len(msg) + len(msg)/50)
	for len(msg) > 0 {
		i := bytes.Index(msg, []byte("\r\n"))
		var l []byte
		if i < 0 {
			l, msg = msg, nil
		} else {
			l, msg = msg[:i+2], msg[i+2:]
		}
		if len(l) > 0 && l[0] == '.' {
			b.WriteByte('.')
		}
		b.Write(l)
	}
	return b.Bytes()
}

// freePort is an address for a listener the test starts later: outside
// the ephemeral range, so the proxy's own connections cannot take it first.
func freePort() (string, error) { return dovecot.FreeAddr() }

// --- Caddy processes -------------------------------------------------------

// listener is an address startCaddy waits for: it must greet with +OK,
// after a verified TLS handshake when tls is set.
type listener struct {
	addr string
	tls  bool
}

// caddyProc is a running `caddy run`.
type caddyProc struct {
	name    string
	dir     string // HOME, XDG_DATA_HOME and XDG_CONFIG_HOME live here
	cmd     *exec.Cmd
	out     *syncBuffer
	done    chan struct{}
	waitErr error
	once    sync.Once
}

// allCaddy records every Caddy run of the test binary, for the log scan.
var allCaddy struct {
	sync.Mutex
	procs []*caddyProc
}

func registerCaddy(p *caddyProc) {
	allCaddy.Lock()
	defer allCaddy.Unlock()
	allCaddy.procs = append(allCaddy.procs, p)
}

func caddyRuns() []*caddyProc {
	allCaddy.Lock()
	defer allCaddy.Unlock()
	return append([]*caddyProc(nil), allCaddy.procs...)
}

// startCaddy runs Caddy with caddyfile until the test ends; it returns once
// every listener greets.
func startCaddy(t *testing.T, name, caddyfile string, listeners ...listener) *caddyProc {
	t.Helper()
	return startCaddyWith(t, name, caddyfile, nil, listeners...)
}

// startCaddyWith is startCaddy with the command line prefixed, e.g. by a
// shell that lowers the open files limit first.
func startCaddyWith(t *testing.T, name, caddyfile string, prefix []string, listeners ...listener) *caddyProc {
	t.Helper()
	p, err := launchCaddy(name, caddyfile, t.TempDir(), prefix, listeners)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
		if t.Failed() {
			t.Logf("caddy %s log tail:\n%s", name, tail(p.log(), 40))
		}
	})
	return p
}

// runCaddy starts `caddy run` with caddyfile in dir, the command line
// after prefix, and returns without waiting for anything.
func runCaddy(name, caddyfile, dir string, prefix ...string) (*caddyProc, error) {
	for _, d := range []string{dir, filepath.Join(dir, "data"), filepath.Join(dir, "config")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(caddyfile), 0o600); err != nil {
		return nil, err
	}
	p := &caddyProc{name: name, dir: dir, out: &syncBuffer{}, done: make(chan struct{})}
	args := append(slices.Clone(prefix), env.caddyBin, "run", "--config", file, "--adapter", "caddyfile")
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.Dir = dir
	p.cmd.Env = caddyEnv(dir)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting caddy: %w", err)
	}
	registerCaddy(p)
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// caddyEnv is the environment without the caller's XDG and HOME, which
// point Caddy's storage and autosave into dir.
func caddyEnv(dir string) []string {
	var e []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") {
			continue
		}
		e = append(e, kv)
	}
	return append(e, "HOME="+dir, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
}

// launchCaddy runs Caddy and waits (bounded) until every listener greets;
// TLS listeners need the local CA's root, which it waits for too.
func launchCaddy(name, caddyfile, dir string, prefix []string, listeners []listener) (*caddyProc, error) {
	p, err := runCaddy(name, caddyfile, dir, prefix...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	fail := func(err error) (*caddyProc, error) {
		_ = p.stop()
		return nil, fmt.Errorf("caddy %s: %w\n%s", name, err, tail(p.log(), 40))
	}
	for _, l := range listeners {
		var lastErr error
		for {
			select {
			case <-p.done:
				return fail(fmt.Errorf("exited during startup: %v", p.waitErr))
			default:
			}
			if time.Now().After(deadline) {
				return fail(fmt.Errorf("listener %s did not greet within 30s: %v", l.addr, lastErr))
			}
			if lastErr = p.probe(l); lastErr == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return p, nil
}

// probe reads the greeting of one listener and quits.
func (p *caddyProc) probe(l listener) error {
	conn, err := net.DialTimeout("tcp", l.addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	if l.tls {
		cfg, err := p.tlsConfig()
		if err != nil {
			return err
		}
		tc := tls.Client(conn, cfg)
		if err := tc.Handshake(); err != nil {
			return err
		}
		conn = tc
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+OK") {
		return fmt.Errorf("greeting %q", line)
	}
	_, _ = conn.Write([]byte("QUIT\r\n"))
	return nil
}

// rootCAFile is where Caddy's local CA keeps its root certificate.
func (p *caddyProc) rootCAFile() string {
	return filepath.Join(p.dir, "data", "caddy", "pki", "authorities", "local", "root.crt")
}

// tlsConfig trusts only Caddy's local root and checks the name localhost.
func (p *caddyProc) tlsConfig() (*tls.Config, error) {
	pool, err := certPool(p.rootCAFile())
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}, nil
}

func certPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", file)
	}
	return pool, nil
}

func (p *caddyProc) log() string { return p.out.String() }

// wait waits for Caddy to exit on its own, up to d.
func (p *caddyProc) wait(d time.Duration) error {
	select {
	case <-p.done:
		return p.waitErr
	case <-time.After(d):
		_ = p.stop()
		return fmt.Errorf("caddy %s still running after %v", p.name, d)
	}
}

// stop sends SIGINT, then SIGKILL after 10 s.
func (p *caddyProc) stop() error {
	var err error
	p.once.Do(func() {
		select {
		case <-p.done:
			return
		default:
		}
		_ = p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
			err = fmt.Errorf("caddy %s ignored SIGINT for 10s; killed", p.name)
		}
	})
	return err
}

// syncBuffer is a bytes.Buffer for exec.Cmd's writers and a reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// --- secrets ---------------------------------------------------------------

// secrets holds every password a test sent, for the log scan.
var secrets struct {
	sync.Mutex
	m map[string]string // secret → what it is
}

// usedSecret records a password and the base64 forms a client sends of it.
func usedSecret(user, pass string) {
	secrets.Lock()
	defer secrets.Unlock()
	if secrets.m == nil {
		secrets.m = map[string]string{}
	}
	b64 := base64.StdEncoding.EncodeToString
	what := fmt.Sprintf("password %.3q… tried for %s", pass, user)
	secrets.m[pass] = what
	secrets.m[b64([]byte(pass))] = "AUTH LOGIN base64 of the " + what
	secrets.m[b64([]byte("\x00"+user+"\x00"+pass))] = "AUTH PLAIN base64 of the " + what
	secrets.m[b64([]byte(user+"\x00"+user+"\x00"+pass))] = "AUTH PLAIN base64 (with authzid) of the " + what
}

func allSecrets() map[string]string {
	secrets.Lock()
	defer secrets.Unlock()
	m := make(map[string]string, len(secrets.m))
	for k, v := range secrets.m {
		m[k] = v
	}
	return m
}

// --- POP3 client -----------------------------------------------------------

// client is a POP3 client that keeps the exact bytes: lines come back
// without their CRLF, and a line that does not end in CRLF fails the test.
type client struct {
	t        *testing.T
	name     string
	conn     net.Conn
	tcp      net.Conn
	r        *bufio.Reader
	greeting string
}

// dialPOP3 connects to addr (over TLS when cfg is set) and reads the
// greeting, which must be +OK.
func dialPOP3(t *testing.T, addr string, cfg *tls.Config) *client {
	t.Helper()
	return dialPOP3From(t, "", addr, cfg)
}

// dialPOP3From is dialPOP3 from the source IP local, such as 127.0.0.2
// or ::1 ("" for any).
func dialPOP3From(t *testing.T, local, addr string, cfg *tls.Config) *client {
	t.Helper()
	c := connectFrom(t, local, addr)
	if cfg != nil {
		tc := tls.Client(c.tcp, cfg)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("TLS handshake with %s: %v", addr, err)
		}
		c.conn = tc
		c.r = bufio.NewReaderSize(c.conn, 64*1024)
	}
	c.greeting = c.line()
	if !strings.HasPrefix(c.greeting, "+OK") {
		t.Fatalf("%s: greeting %q", addr, c.greeting)
	}
	return c
}

// connectFrom connects to addr from the source IP local ("" for any; Linux
// routes all of 127.0.0.0/8 to lo, so a test may act as many clients) and
// reads nothing.
func connectFrom(t *testing.T, local, addr string) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	tcp, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, local, err)
	}
	t.Cleanup(func() { tcp.Close() })
	c := &client{t: t, name: addr, conn: tcp, tcp: tcp}
	c.r = bufio.NewReaderSize(c.conn, 64*1024)
	c.deadline(30 * time.Second)
	return c
}

func (c *client) deadline(d time.Duration) { _ = c.tcp.SetDeadline(time.Now().Add(d)) }

// write sends raw bytes in one write.
func (c *client) write(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.t.Fatalf("%s: write: %v", c.name, err)
	}
}

// line reads one CRLF-terminated line.
func (c *client) line() string {
	c.t.Helper()
	l, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("%s: reading a line: %v (got %q)", c.name, err, l)
	}
	if !strings.HasSuffix(l, "\r\n") {
		c.t.Fatalf("%s: line %q does not end in CRLF", c.name, l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// cmd sends one command and reads the one-line reply.
func (c *client) cmd(line string) string {
	c.t.Helper()
	c.write(line + "\r\n")
	return c.line()
}

// ok sends a command whose reply must be +OK.
func (c *client) ok(line string) string {
	c.t.Helper()
	r := c.cmd(line)
	if !strings.HasPrefix(r, "+OK") {
		c.t.Fatalf("%s: %s: got %q, want +OK", c.name, redact(line), r)
	}
	return r
}

// multi reads the lines of a multi-line reply up to the terminating "."
// (still dot-stuffed, without the ".").
func (c *client) multi() []string {
	c.t.Helper()
	var lines []string
	for {
		l := c.line()
		if l == "." {
			return lines
		}
		lines = append(lines, l)
	}
}

// transcript sends each command and records the reply, with the lines of
// the multi-line replies of a +OK to CAPA, LIST, UIDL, TOP and RETR
// without argument where that makes them multi-line.
func (c *client) transcript(cmds ...string) []string {
	c.t.Helper()
	var out []string
	for _, cmd := range cmds {
		r := c.cmd(cmd)
		out = append(out, cmd+" => "+r)
		if strings.HasPrefix(r, "+OK") && isMulti(cmd) {
			for _, l := range c.multi() {
				out = append(out, "  "+l)
			}
		}
	}
	return out
}

func isMulti(cmd string) bool {
	f := strings.Fields(strings.ToUpper(cmd))
	switch {
	case len(f) == 0:
		return false
	case f[0] == "CAPA", f[0] == "TOP", f[0] == "RETR":
		return true
	case f[0] == "LIST", f[0] == "UIDL":
		return len(f) == 1
	}
	return false
}

// stls upgrades with STLS and a verified handshake.
func (c *client) stls(cfg *tls.Config) *tls.ConnectionState {
	c.t.Helper()
	c.ok("STLS")
	if c.r.Buffered() > 0 {
		c.t.Fatalf("%s: %d bytes after the STLS +OK", c.name, c.r.Buffered())
	}
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("%s: STLS handshake: %v", c.name, err)
	}
	c.conn = tc
	c.r = bufio.NewReaderSize(tc, 64*1024)
	st := tc.ConnectionState()
	return &st
}

// expectClosed reads until the server closes; it must send nothing more.
func (c *client) expectClosed() {
	c.t.Helper()
	c.deadline(10 * time.Second)
	b, err := io.ReadAll(c.r)
	if len(b) > 0 {
		c.t.Errorf("%s: got %q before the close, want nothing", c.name, b)
	}
	if err != nil {
		c.t.Errorf("%s: connection did not close cleanly: %v", c.name, err)
	}
}

// quit sends QUIT, expects +OK and the close.
func (c *client) quit() {
	c.t.Helper()
	c.ok("QUIT")
	c.expectClosed()
}

// retrRaw sends RETR n and returns the +OK line, the sha256 and size of
// the raw bytes between it and the terminating ".", and how long the body
// took. It reads in large chunks so that 32 MiB stay quick under -race.
func (c *client) retrRaw(n int) (ok string, sum [32]byte, size int64, took time.Duration) {
	c.t.Helper()
	c.deadline(120 * time.Second)
	start := time.Now()
	ok = c.cmd(fmt.Sprintf("RETR %d", n))
	if !strings.HasPrefix(ok, "+OK") {
		c.t.Fatalf("%s: RETR %d: %q", c.name, n, ok)
	}
	h := sha256.New()
	const end = "\r\n.\r\n"
	// window holds the not yet hashed tail that may be the start of the
	// terminator; it starts with the CRLF of the +OK line so that an empty
	// body (".\r\n" at once) is found as well.
	window := []byte("\r\n")
	buf := make([]byte, 256*1024)
	for {
		m, err := c.r.Read(buf)
		window = append(window, buf[:m]...)
		if i := bytes.Index(window, []byte(end)); i >= 0 {
			body := window[:i+2]
			h.Write(body[2:]) // the leading CRLF was hashed (or is the +OK line's)
			size += int64(len(body) - 2)
			if rest := len(window) - (i + len(end)); rest > 0 || c.r.Buffered() > 0 {
				c.t.Fatalf("%s: %d bytes after the end of RETR %d", c.name, rest+c.r.Buffered(), n)
			}
			break
		}
		if err != nil {
			c.t.Fatalf("%s: RETR %d after %d bytes: %v", c.name, n, size, err)
		}
		// Hash all but the last len(end)-1 bytes, keeping the window's
		// first two bytes out of the hash as above.
		if keep := len(end) - 1; len(window) > keep+2 {
			cut := len(window) - keep
			h.Write(window[2:cut])
			size += int64(cut - 2)
			window = append(window[:0], window[cut-2:]...)
		}
	}
	took = time.Since(start)
	c.deadline(30 * time.Second)
	copy(sum[:], h.Sum(nil))
	return ok, sum, size, took
}

// redact hides the argument of PASS and AUTH lines in test messages.
func redact(line string) string {
	f := strings.Fields(line)
	if len(f) > 1 && (strings.EqualFold(f[0], "PASS") || strings.EqualFold(f[0], "AUTH")) {
		if strings.EqualFold(f[0], "AUTH") {
			return f[0] + " " + f[1] + " …"
		}
		return f[0] + " …"
	}
	return line
}

// --- login methods ---------------------------------------------------------

// loginMethod logs in on c and returns the final reply line.
type loginMethod struct {
	name  string
	login func(c *client, user, pass string) string
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

var loginMethods = []loginMethod{
	{"USER-PASS", func(c *client, user, pass string) string {
		c.ok("USER " + user)
		return c.cmd("PASS " + pass)
	}},
	{"AUTH-PLAIN-initial", func(c *client, user, pass string) string {
		return c.cmd("AUTH PLAIN " + b64("\x00"+user+"\x00"+pass))
	}},
	{"AUTH-PLAIN-authzid", func(c *client, user, pass string) string {
		// An authorization identity equal to the user (RFC 4616 §2).
		return c.cmd("AUTH PLAIN " + b64(user+"\x00"+user+"\x00"+pass))
	}},
	{"AUTH-PLAIN-continuation", func(c *client, user, pass string) string {
		if r := c.cmd("AUTH PLAIN"); r != "+ " && r != "+" {
			c.t.Fatalf("AUTH PLAIN: got %q, want an empty challenge", r)
		}
		return c.cmd(b64("\x00" + user + "\x00" + pass))
	}},
	{"AUTH-LOGIN-initial", func(c *client, user, pass string) string {
		if r := c.cmd("AUTH LOGIN " + b64(user)); r != "+ "+b64("Password:") {
			c.t.Fatalf("AUTH LOGIN <user>: got %q, want the Password: challenge", r)
		}
		return c.cmd(b64(pass))
	}},
	{"AUTH-LOGIN", func(c *client, user, pass string) string {
		if r := c.cmd("AUTH LOGIN"); r != "+ "+b64("Username:") {
			c.t.Fatalf("AUTH LOGIN: got %q, want the Username: challenge", r)
		}
		if r := c.cmd(b64(user)); r != "+ "+b64("Password:") {
			c.t.Fatalf("AUTH LOGIN: got %q, want the Password: challenge", r)
		}
		return c.cmd(b64(pass))
	}},
}

// login logs in with USER/PASS, which must succeed.
func (c *client) login(user, pass string) {
	c.t.Helper()
	usedSecret(user, pass)
	c.ok("USER " + user)
	if r := c.cmd("PASS " + pass); !strings.HasPrefix(r, "+OK") {
		c.t.Fatalf("%s: login as %s: %q", c.name, user, r)
	}
}

// --- sessions for workers ---------------------------------------------------

// sessionOpts are the choices of loginFrom.
type sessionOpts struct {
	local  string // source IP, e.g. 127.0.0.7; "" for any
	header string // sent first, before the greeting (a PROXY header)
}

// rawSession is a POP3 connection for goroutines other than the test's:
// its methods report errors instead of failing the test.
type rawSession struct {
	conn net.Conn
	r    *bufio.Reader
}

// line reads one line and returns it without its CRLF.
func (s *rawSession) line() (string, error) {
	l, err := s.r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading a line: %w (got %q)", err, l)
	}
	return strings.TrimSuffix(l, "\r\n"), nil
}

// cmd sends one command and reads the one-line reply.
func (s *rawSession) cmd(line string) (string, error) {
	if _, err := io.WriteString(s.conn, line+"\r\n"); err != nil {
		return "", err
	}
	return s.line()
}

// quit sends QUIT, expects +OK and a clean close with nothing after it.
func (s *rawSession) quit() error {
	if l, err := s.cmd("QUIT"); err != nil || !strings.HasPrefix(l, "+OK") {
		return fmt.Errorf("QUIT: %q: %v", l, err)
	}
	if rest, err := io.ReadAll(s.r); err != nil || len(rest) > 0 {
		return fmt.Errorf("after QUIT: %q: %v", rest, err)
	}
	return nil
}

// loginFrom connects to addr as o says, expects a +OK greeting and sends
// USER and PASS. It returns the reply to PASS and the session, still open,
// which the caller closes; nil on error. It records no secret: callers
// that send one password for many users record it once (usedSecretValue).
func loginFrom(addr, user, pass string, o sessionOpts) (string, *rawSession, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if o.local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(o.local)}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	s := &rawSession{conn: conn, r: bufio.NewReader(conn)}
	fail := func(err error) (string, *rawSession, error) {
		conn.Close()
		return "", nil, err
	}
	if o.header != "" {
		if _, err := io.WriteString(conn, o.header); err != nil {
			return fail(err)
		}
	}
	if g, err := s.line(); err != nil || !strings.HasPrefix(g, "+OK") {
		return fail(fmt.Errorf("greeting %q: %v", g, err))
	}
	if l, err := s.cmd("USER " + user); err != nil || !strings.HasPrefix(l, "+OK") {
		return fail(fmt.Errorf("USER: %q: %v", l, err))
	}
	reply, err := s.cmd("PASS " + pass)
	if err != nil {
		return fail(fmt.Errorf("PASS: %w", err))
	}
	return reply, s, nil
}

// --- targets ---------------------------------------------------------------

// target is a way to reach a POP3 server ready for login: the proxy on one
// of its listeners or Dovecot directly.
type target struct {
	name string
	dial func(t *testing.T) *client
}

func directPlain() target {
	return target{"direct", func(t *testing.T) *client { return dialPOP3(t, env.dc.POP3Addr, nil) }}
}

func directTLS(t *testing.T) target {
	pool, err := certPool(env.dc.CACertFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	return target{"direct-tls", func(t *testing.T) *client { return dialPOP3(t, env.dc.POP3SAddr, cfg) }}
}

func caddyTLS(t *testing.T) *tls.Config {
	cfg, err := env.caddy.tlsConfig()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func proxyPlain(name, addr string) target {
	return target{name, func(t *testing.T) *client { return dialPOP3(t, addr, nil) }}
}

func proxySTLS() target {
	return target{"proxy-stls", func(t *testing.T) *client {
		c := dialPOP3(t, env.only, nil)
		c.stls(caddyTLS(t))
		return c
	}}
}

func proxyImplicit() target {
	return target{"proxy-implicit-tls", func(t *testing.T) *client { return dialPOP3(t, env.implicit, caddyTLS(t)) }}
}

func proxyImplicitOpt() target {
	return target{"proxy-implicit_tls", func(t *testing.T) *client { return dialPOP3(t, env.implicitOpt, caddyTLS(t)) }}
}

// sortedKeys is for stable output.
func sortedKeys(m map[string]string) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}

// commandIn is a command for the Caddy binary with the environment of a
// Caddy run in dir.
func commandIn(dir, bin string, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = caddyEnv(dir)
	return cmd
}
