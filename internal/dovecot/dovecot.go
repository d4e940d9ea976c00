// Package dovecot starts a private Dovecot that serves POP3 on loopback, for
// integration tests and the demo backend. It writes its own configuration,
// users, maildirs and a self-signed certificate into one directory and runs
// `dovecot -F` as a child process, so no system service is touched.
//
// Only the Dovecot 2.3 configuration syntax (Debian 12) is written; Start
// fails with a clear error on other versions. As root, the mailboxes belong
// to nobody:nogroup (Dovecot refuses mail access as root); as another user,
// every Dovecot service runs as that user, without chroot.
package dovecot

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrNotInstalled is returned by Start when no dovecot binary can be found.
var ErrNotInstalled = errors.New("dovecot: binary not found (install dovecot-core and dovecot-pop3d, e.g. with scripts/install-deps.sh)")

const (
	// startTimeout bounds the wait for the first "+OK" greeting.
	startTimeout = 10 * time.Second
	// stopTimeout bounds the wait after SIGTERM before SIGKILL.
	stopTimeout = 5 * time.Second
	// mailUID and mailGID own the mailboxes when running as root: Dovecot
	// refuses mail access as root, and nobody:nogroup exists everywhere.
	mailUID = 65534
	mailGID = 65534
	// dhFile is Debian's pre-generated DH parameters, used when present.
	dhFile = "/usr/share/dovecot/dh.pem"
	// startAttempts is how often Start retries with new free ports when one
	// was taken between picking it and Dovecot binding it.
	startAttempts = 3
)

// FastFailPassdb, appended to Config.Extra, makes failed USER/PASS and AUTH
// PLAIN/LOGIN logins answer at once. Dovecot 2.3 holds every failure back
// for its next 500 ms timer tick even with auth_failure_delay = 0; this
// last passdb accepts any password with nologin and nodelay, so the reply is
// immediate, but its text is "-ERR [AUTH] Login disabled for this user"
// rather than "-ERR [AUTH] Authentication failed.".
const FastFailPassdb = `passdb {
  driver = static
  args = nopassword=y nologin=y nodelay=y
}
`

// User is a mailbox with a plaintext password and its messages.
type User struct {
	Name     string
	Password string
	Messages [][]byte // raw RFC 5322 messages, written byte for byte into Maildir cur/ (use CRLF line ends in content)
}

// Config describes a private Dovecot.
type Config struct {
	// Dir is the private directory; created if missing. Dovecot's login and
	// auth users must traverse it, so Start adds o+rx to it and its levels
	// below /tmp (t.TempDir makes them 0700) and refuses a directory that
	// they cannot reach elsewhere. Empty: a new /tmp/dovecot-* directory,
	// left in place.
	Dir   string
	Users []User
	// Extra lines appended to dovecot.conf (for tests that need e.g.
	// auth_mechanisms or login_trusted_networks). A setting given again
	// overrides the one written before; a service or protocol block merges
	// with the earlier one of the same name, so `service pop3-login {
	// inet_listener NAME { ... haproxy = yes } }` adds a listener; a passdb
	// block adds a passdb after the users' one (see FastFailPassdb).
	Extra string
	// POP3Addr, if set, is the plaintext POP3 listen address ("127.0.0.1:PORT"); empty picks a free port.
	POP3Addr string
	// POP3SAddr, if set, is the implicit TLS POP3 listen address ("127.0.0.1:PORT"); empty picks a free port.
	POP3SAddr string
}

// Server is a running private Dovecot.
type Server struct {
	POP3Addr   string // "127.0.0.1:PORT", plaintext POP3 (STLS offered by Dovecot too)
	POP3SAddr  string // "127.0.0.1:PORT", implicit TLS POP3
	CACertFile string // PEM file of the self-signed cert Dovecot serves (CN/SAN localhost + IP 127.0.0.1)
	LogFile    string // Dovecot's log_path

	dir      string
	runDir   string // base_dir: inside dir, or a short temp dir removed by Stop
	tempRun  bool
	uid, gid int
	homes    map[string]string // user name → home directory
	cmd      *exec.Cmd
	output   *syncBuffer   // Dovecot's stdout and stderr (fatal errors before logging starts)
	done     chan struct{} // closed when cmd.Wait returned
	waitErr  error         // cmd.Wait's result, set before done is closed
	mu       sync.Mutex    // serialises SetMessages and Stop
	stopped  bool          // Stop was called; later calls return stopErr
	stopErr  error
	msgCount atomic.Uint64 // makes Maildir file names unique across SetMessages calls
}

var instances atomic.Uint64

// Start writes the configuration, users, maildirs and certificate into
// cfg.Dir, runs Dovecot in the foreground as a child process and waits until
// the POP3 port greets with "+OK". On failure the error includes the tail of
// Dovecot's log.
func Start(cfg Config) (*Server, error) {
	bin, err := findBinary()
	if err != nil {
		return nil, err
	}
	if err := checkVersion(bin); err != nil {
		return nil, err
	}
	if err := validate(cfg); err != nil {
		return nil, err
	}
	dir, err := prepareDir(cfg.Dir)
	if err != nil {
		return nil, err
	}

	s := &Server{
		CACertFile: filepath.Join(dir, "tls", "cert.pem"),
		LogFile:    filepath.Join(dir, "dovecot.log"),
		dir:        dir,
		uid:        mailUID,
		gid:        mailGID,
		homes:      make(map[string]string),
	}
	rootless := os.Geteuid() != 0
	if rootless {
		s.uid, s.gid = os.Geteuid(), os.Getegid()
	}
	for _, sub := range []string{"run", "state", "tls", "home"} {
		if err := mkdir(filepath.Join(dir, sub)); err != nil {
			return nil, err
		}
	}
	if err := s.makeRunDir(); err != nil {
		return nil, err
	}
	if err := writeCert(filepath.Join(dir, "tls")); err != nil {
		return nil, err
	}
	if err := s.writeUsers(cfg.Users); err != nil {
		return nil, err
	}
	for _, u := range cfg.Users {
		if err := s.SetMessages(u.Name, u.Messages); err != nil {
			return nil, err
		}
	}

	var lastErr error
	for attempt := 1; attempt <= startAttempts; attempt++ {
		pop3, pop3s, err := pickAddrs(cfg.POP3Addr, cfg.POP3SAddr)
		if err != nil {
			return nil, err
		}
		s.POP3Addr, s.POP3SAddr = pop3, pop3s
		conf, err := s.config(cfg.Extra, rootless)
		if err != nil {
			return nil, err
		}
		confFile := filepath.Join(dir, "dovecot.conf")
		if err := os.WriteFile(confFile, conf, 0o644); err != nil {
			return nil, fmt.Errorf("dovecot: writing config: %w", err)
		}
		// A fresh log per attempt, so the error tail shows this attempt only.
		_ = os.Remove(s.LogFile)
		lastErr = s.run(bin, confFile)
		if lastErr == nil {
			return s, nil
		}
		if !retryable(s.Log()+s.output.String(), cfg) {
			break
		}
	}
	s.removeRunDir()
	return nil, lastErr
}

// retryable tells whether a failed start is worth another try with new
// ports: only when a port that Start picked was taken meanwhile. Dovecot logs
// "listen(127.0.0.1, PORT) failed: Address already in use".
func retryable(log string, cfg Config) bool {
	if !strings.Contains(log, "Address already in use") {
		return false
	}
	for _, addr := range []string{cfg.POP3Addr, cfg.POP3SAddr} {
		if addr == "" {
			continue
		}
		if _, port, _ := net.SplitHostPort(addr); strings.Contains(log, ", "+port+")") {
			return false
		}
	}
	return cfg.POP3Addr == "" || cfg.POP3SAddr == ""
}

// maxRunDirLen keeps base_dir short enough for the Unix sockets Dovecot
// creates in it (up to about 30 more bytes, such as
// "/token-login/tokenlogin") to fit sun_path's 108 bytes.
const maxRunDirLen = 70

// makeRunDir picks base_dir: dir/run, or a short directory under /tmp when
// that path is too long, as t.TempDir paths of subtests often are.
func (s *Server) makeRunDir() error {
	s.runDir = filepath.Join(s.dir, "run")
	if len(s.runDir) <= maxRunDirLen {
		return nil
	}
	d, err := os.MkdirTemp("/tmp", "dovecot-run-")
	if err != nil {
		return fmt.Errorf("dovecot: creating base_dir: %w", err)
	}
	if err := os.Chmod(d, 0o755); err != nil {
		_ = os.RemoveAll(d)
		return fmt.Errorf("dovecot: creating base_dir: %w", err)
	}
	s.runDir, s.tempRun = d, true
	return nil
}

func (s *Server) removeRunDir() {
	if s.tempRun {
		_ = os.RemoveAll(s.runDir)
	}
}

// run starts the child and waits for the greeting; on failure it stops the
// child and returns an error with the log tail.
func (s *Server) run(bin, confFile string) error {
	s.output = &syncBuffer{}
	s.done = make(chan struct{})
	s.waitErr = nil
	cmd := exec.Command(bin, "-F", "-c", confFile)
	cmd.Dir = s.dir
	cmd.Stdout = s.output
	cmd.Stderr = s.output
	// Own process group, so Stop can signal every Dovecot process; SIGTERM
	// to the master if the test binary dies without calling Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("dovecot: starting %s: %w", bin, err)
	}
	s.cmd = cmd
	done := s.done
	go func() {
		s.waitErr = cmd.Wait()
		close(done)
	}()
	if err := s.waitReady(); err != nil {
		_ = s.kill()
		return fmt.Errorf("%w\n%s", err, s.tail())
	}
	return nil
}

// waitReady polls the POP3 port until it answers "+OK", the child exits or
// startTimeout passes.
func (s *Server) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("dovecot: exited during startup: %v", s.waitErr)
		default:
		}
		line, err := greeting(s.POP3Addr)
		if err == nil {
			if strings.HasPrefix(line, "+OK") {
				return nil
			}
			return fmt.Errorf("dovecot: unexpected greeting on %s: %q", s.POP3Addr, line)
		}
		lastErr = err
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("dovecot: no POP3 greeting on %s within %v: %v", s.POP3Addr, startTimeout, lastErr)
}

func greeting(addr string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return "", err
	}
	_, _ = conn.Write([]byte("QUIT\r\n"))
	return strings.TrimRight(line, "\r\n"), nil
}

// Stop sends SIGTERM to Dovecot's process group, SIGKILL if it has not exited
// within a few seconds, and waits for it. It is safe to call twice.
//
// The whole group gets the signal because a master alone waits for its
// login processes, and those keep serving connected clients.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return s.stopErr
	}
	s.stopped = true
	s.stopErr = s.kill()
	s.removeRunDir()
	return s.stopErr
}

// kill ends the child as Stop describes and waits for it.
func (s *Server) kill() error {
	if s.cmd == nil {
		return nil
	}
	select {
	case <-s.done:
		return nil // already gone; waitReady or the caller saw why
	default:
	}
	// SIGTERM again every half second: a process the master forked just
	// as the first signal went out would otherwise keep the master waiting.
	deadline := time.After(stopTimeout)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for waiting := true; waiting; {
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-s.done:
			return nil
		case <-tick.C:
		case <-deadline:
			waiting = false
		}
	}
	alive := groupProcesses(s.cmd.Process.Pid)
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
	return fmt.Errorf("dovecot: did not exit within %v of SIGTERM; killed %s", stopTimeout, strings.Join(alive, ", "))
}

// groupProcesses lists "pid (name)" of the processes in process group pgid,
// from /proc, for the error when Dovecot does not stop.
func groupProcesses(pgid int) []string {
	var procs []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) < 3 || fields[2] != strconv.Itoa(pgid) {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		name := strings.TrimRight(strings.ReplaceAll(string(cmdline), "\x00", " "), " ")
		procs = append(procs, fmt.Sprintf("%d (%s, state %s)", pid, name, fields[0]))
	}
	return procs
}

// Log returns the contents of LogFile, or "" if it cannot be read.
func (s *Server) Log() string {
	b, err := os.ReadFile(s.LogFile)
	if err != nil {
		return ""
	}
	return string(b)
}

// tail is the end of Dovecot's log and output, for error messages.
func (s *Server) tail() string {
	var b strings.Builder
	if out := strings.TrimSpace(s.output.String()); out != "" {
		b.WriteString("dovecot output:\n" + lastLines(out, 20) + "\n")
	}
	if log := strings.TrimSpace(s.Log()); log != "" {
		b.WriteString("dovecot log (" + s.LogFile + "):\n" + lastLines(log, 30))
	} else {
		b.WriteString("dovecot log (" + s.LogFile + ") is empty")
	}
	return b.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// SetMessages replaces the user's mailbox with msgs. The Maildir, including
// Dovecot's index and uidlist files, is removed and written anew, so call it
// while no session of that user is open.
func (s *Server) SetMessages(userName string, msgs [][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	home, ok := s.homes[userName]
	if !ok {
		return fmt.Errorf("dovecot: unknown user %q", userName)
	}
	maildir := filepath.Join(home, "Maildir")
	if err := os.RemoveAll(maildir); err != nil {
		return fmt.Errorf("dovecot: removing maildir: %w", err)
	}
	for _, d := range []string{home, maildir, filepath.Join(maildir, "cur"), filepath.Join(maildir, "new"), filepath.Join(maildir, "tmp")} {
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("dovecot: creating maildir: %w", err)
		}
		if err := s.chown(d); err != nil {
			return err
		}
	}
	now := time.Now().Unix()
	for _, msg := range msgs {
		// Maildir names sort by time then sequence, so Dovecot numbers
		// messages in the order given.
		name := fmt.Sprintf("%d.M%09dP%d.localhost:2,", now, s.msgCount.Add(1), os.Getpid())
		path := filepath.Join(maildir, "cur", name)
		if err := os.WriteFile(path, msg, 0o600); err != nil {
			return fmt.Errorf("dovecot: writing message: %w", err)
		}
		if err := s.chown(path); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) chown(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	if err := os.Chown(path, s.uid, s.gid); err != nil {
		return fmt.Errorf("dovecot: chown %s: %w", path, err)
	}
	return nil
}

// writeUsers writes the passwd-file and creates each user's home.
func (s *Server) writeUsers(users []User) error {
	var b strings.Builder
	for _, u := range users {
		fmt.Fprintf(&b, "%s:{PLAIN}%s\n", u.Name, u.Password)
		s.homes[u.Name] = filepath.Join(s.dir, "home", u.Name)
	}
	// The auth process runs as the dovecot user and reads this file; the
	// passwords are test passwords.
	if err := os.WriteFile(filepath.Join(s.dir, "users"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("dovecot: writing users: %w", err)
	}
	return nil
}

// config renders dovecot.conf in Dovecot 2.3 syntax.
func (s *Server) config(extra string, rootless bool) ([]byte, error) {
	_, pop3Port, _ := net.SplitHostPort(s.POP3Addr)
	pop3Host, _, _ := net.SplitHostPort(s.POP3Addr)
	pop3sHost, pop3sPort, _ := net.SplitHostPort(s.POP3SAddr)
	var b bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("# Written by internal/dovecot for a private test instance (Dovecot 2.3 syntax).")
	p("instance_name = dovecot-test-%d-%d", os.Getpid(), instances.Add(1))
	p("base_dir = %s", s.runDir)
	p("state_dir = %s", filepath.Join(s.dir, "state"))
	p("log_path = %s", s.LogFile)
	p("listen = 127.0.0.1")
	p("protocols = pop3")
	p("")
	p("ssl = yes")
	p("ssl_cert = <%s", s.CACertFile)
	p("ssl_key = <%s", filepath.Join(s.dir, "tls", "key.pem"))
	if _, err := os.Stat(dhFile); err == nil {
		p("ssl_dh = <%s", dhFile)
	}
	p("")
	p("disable_plaintext_auth = no")
	p("auth_mechanisms = plain login")
	p("auth_verbose = yes")
	p("# No 2 s delay after a failed login (replies still wait for the next")
	p("# 500 ms tick in 2.3; see FastFailPassdb), and no anvil penalty below.")
	p("auth_failure_delay = 0")
	p("")
	p("mail_location = maildir:~/Maildir")
	p("pop3_uidl_format = %%g")
	p("first_valid_uid = %d", min(s.uid, 500))
	p("first_valid_gid = %d", min(s.gid, 1))
	p("")
	p("passdb {")
	p("  driver = passwd-file")
	p("  args = scheme=PLAIN username_format=%%u %s", filepath.Join(s.dir, "users"))
	p("}")
	p("userdb {")
	p("  driver = static")
	p("  args = uid=%d gid=%d home=%s/%%u", s.uid, s.gid, filepath.Join(s.dir, "home"))
	p("}")
	p("")
	p("# Many sessions from one address, as load and proxy tests make.")
	p("default_client_limit = 4100")
	p("service pop3-login {")
	p("  inet_listener pop3 {")
	p("    address = %s", pop3Host)
	p("    port = %s", pop3Port)
	p("  }")
	p("  inet_listener pop3s {")
	p("    address = %s", pop3sHost)
	p("    port = %s", pop3sPort)
	p("    ssl = yes")
	p("  }")
	p("  service_count = 0")
	p("  process_min_avail = 2")
	p("  client_limit = 2000")
	if rootless {
		p("  chroot =")
	}
	p("}")
	p("service pop3 {")
	p("  process_limit = 2000")
	p("}")
	p("protocol pop3 {")
	p("  mail_max_userip_connections = 2000")
	p("}")
	p("# No growing delay after failed logins from one address.")
	p("service anvil {")
	p("  unix_listener anvil-auth-penalty {")
	p("    mode = 0")
	p("  }")
	if rootless {
		p("  chroot =")
	}
	p("}")
	if rootless {
		// Dovecot's rootless setup: every service runs as the current user.
		u, err := user.Current()
		if err != nil {
			return nil, fmt.Errorf("dovecot: looking up current user: %w", err)
		}
		g, err := user.LookupGroupId(strconv.Itoa(s.gid))
		if err != nil {
			return nil, fmt.Errorf("dovecot: looking up current group: %w", err)
		}
		p("")
		p("# Not running as root: every service runs as %s.", u.Username)
		p("default_internal_user = %s", u.Username)
		p("default_internal_group = %s", g.Name)
		p("default_login_user = %s", u.Username)
	}
	if extra != "" {
		p("")
		p("# Extra settings from Config.Extra.")
		p("%s", extra)
	}
	return b.Bytes(), nil
}

// findBinary looks for dovecot in PATH and in /usr/sbin, which a non-root
// PATH often lacks.
func findBinary() (string, error) {
	if bin, err := exec.LookPath("dovecot"); err == nil {
		return bin, nil
	}
	for _, bin := range []string{"/usr/sbin/dovecot", "/usr/local/sbin/dovecot"} {
		if fi, err := os.Stat(bin); err == nil && !fi.IsDir() {
			return bin, nil
		}
	}
	return "", ErrNotInstalled
}

// checkVersion accepts Dovecot 2.3 only: 2.4 changed the configuration
// syntax (dovecot_config_version, mail_driver/mail_path, passdb names...).
func checkVersion(bin string) error {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return fmt.Errorf("dovecot: running %s --version: %w", bin, err)
	}
	version := strings.TrimSpace(string(out))
	fields := strings.Fields(version)
	if len(fields) == 0 {
		return fmt.Errorf("dovecot: empty output from %s --version", bin)
	}
	parts := strings.SplitN(fields[0], ".", 3)
	if len(parts) < 2 {
		return fmt.Errorf("dovecot: cannot parse version %q", version)
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return fmt.Errorf("dovecot: cannot parse version %q", version)
	}
	if major != 2 || minor != 3 {
		return fmt.Errorf("dovecot: version %s is not supported: this package writes Dovecot 2.3 configuration syntax (Debian 12's dovecot-core); 2.4 changed the syntax", fields[0])
	}
	return nil
}

// validate rejects values that would break the passwd-file or the config
// syntax, where a space splits args and '%' starts a variable.
func validate(cfg Config) error {
	if strings.ContainsAny(cfg.Dir, " \t\r\n\"'%<>{}#") {
		return fmt.Errorf("dovecot: dir %q holds a character dovecot.conf cannot take", cfg.Dir)
	}
	seen := make(map[string]bool)
	for i, u := range cfg.Users {
		if u.Name == "" || u.Name == "." || u.Name == ".." || strings.ContainsFunc(u.Name, func(r rune) bool {
			return r <= ' ' || r >= 0x7f || strings.ContainsRune(":/%\\", r)
		}) {
			return fmt.Errorf("dovecot: user %d: invalid name %q", i, u.Name)
		}
		if seen[u.Name] {
			return fmt.Errorf("dovecot: user %d: duplicate name %q", i, u.Name)
		}
		seen[u.Name] = true
		if strings.ContainsAny(u.Password, ":\r\n\x00") {
			return fmt.Errorf("dovecot: user %d (%s): password holds ':', CR, LF or NUL", i, u.Name)
		}
	}
	for _, addr := range []string{cfg.POP3Addr, cfg.POP3SAddr} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("dovecot: listen address %q: %w", addr, err)
		}
	}
	return nil
}

// prepareDir creates dir (a new one under /tmp if empty) and makes it and its
// ancestors traversable by Dovecot's unprivileged login and auth users; it
// only changes the modes of ancestors below the temp directory.
func prepareDir(dir string) (string, error) {
	if dir == "" {
		d, err := os.MkdirTemp("/tmp", "dovecot-")
		if err != nil {
			return "", fmt.Errorf("dovecot: creating dir: %w", err)
		}
		dir = d
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("dovecot: dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("dovecot: creating dir: %w", err)
	}
	tmpRoots := []string{"/tmp", filepath.Clean(os.TempDir())}
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return "", fmt.Errorf("dovecot: dir: %w", err)
		}
		mode := fi.Mode().Perm()
		if mode&0o005 == 0o005 {
			continue
		}
		underTmp := false
		for _, root := range tmpRoots {
			if strings.HasPrefix(d, root+"/") {
				underTmp = true
			}
		}
		if !underTmp {
			return "", fmt.Errorf("dovecot: %s (mode %v) cannot be traversed by dovecot's login and auth users; use a dir under /tmp", d, mode)
		}
		// t.TempDir makes its levels 0700; the dovenull and dovecot users
		// need to look inside ("temporary authentication failure" otherwise).
		if err := os.Chmod(d, mode|0o055); err != nil {
			return "", fmt.Errorf("dovecot: making %s traversable: %w", d, err)
		}
	}
	return dir, nil
}

func mkdir(d string) error {
	if err := os.MkdirAll(d, 0o755); err != nil {
		return fmt.Errorf("dovecot: creating %s: %w", d, err)
	}
	return os.Chmod(d, 0o755)
}

// pickAddrs returns the configured addresses, or free loopback ports for
// the empty ones (FreeAddr never gives the same port twice).
func pickAddrs(pop3, pop3s string) (string, string, error) {
	pick := func(addr string) (string, error) {
		if addr != "" {
			return addr, nil
		}
		return FreeAddr()
	}
	a, err := pick(pop3)
	if err != nil {
		return "", "", err
	}
	b, err := pick(pop3s)
	if err != nil {
		return "", "", err
	}
	return a, b, nil
}

// writeCert writes a self-signed ECDSA certificate for localhost and
// 127.0.0.1 to dir/cert.pem and its key to dir/key.pem. It is marked as a CA
// so that OpenSSL-based clients (curl, fetchmail, Python) accept it as their
// trust anchor.
func writeCert(dir string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("dovecot: generating key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return fmt.Errorf("dovecot: generating serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"caddy-pop3 test dovecot"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("dovecot: creating certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("dovecot: encoding key: %w", err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if err := os.WriteFile(filepath.Join(dir, "cert.pem"), certPEM, 0o644); err != nil {
		return fmt.Errorf("dovecot: writing certificate: %w", err)
	}
	// The config process reads the key as root (or as the rootless user).
	if err := os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("dovecot: writing key: %w", err)
	}
	return nil
}

// syncBuffer is a bytes.Buffer safe for the writer goroutines of exec.Cmd
// and a concurrent reader.
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
