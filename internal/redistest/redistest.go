// Package redistest starts a private redis-server on loopback for tests: a
// free port, its own directory, no persistence (`--save "" --appendonly
// no`), run as a child process in the foreground, so no system service is
// touched. Tests can stop, pause and restart it on the same port to see how
// a client rides out an outage.
package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

// ErrNotInstalled is returned by Start when no redis-server binary can be
// found.
var ErrNotInstalled = errors.New("redistest: redis-server not found (install redis-server, e.g. with scripts/install-deps.sh)")

const (
	// startTimeout bounds the wait for the first PONG.
	startTimeout = 10 * time.Second
	// stopTimeout bounds the wait after SIGTERM before SIGKILL.
	stopTimeout = 5 * time.Second
	// startAttempts is how often Start retries with a new free port when
	// one was taken between picking it and redis-server binding it.
	startAttempts = 3
)

// Server is a running private redis-server.
type Server struct {
	Addr    string // "127.0.0.1:PORT"
	LogFile string // redis-server's output

	bin, dir string
	mu       sync.Mutex // serialises Stop, Restart, Pause and Continue
	cmd      *exec.Cmd
	done     chan struct{} // closed when cmd.Wait returned
	waitErr  error         // cmd.Wait's result, set before done is closed
}

// Run starts a redis-server in a directory of t's and stops it when t ends.
// A missing redis-server fails t, unless the developer opted out with
// POP3_TEST_NO_REDIS=1, which skips it; in CI (CI set) the opt-out is
// ignored.
func Run(t testing.TB) *Server {
	t.Helper()
	s, err := Start(t.TempDir())
	if errors.Is(err, ErrNotInstalled) && os.Getenv("POP3_TEST_NO_REDIS") == "1" && os.Getenv("CI") == "" {
		t.Skip("redis-server not installed and POP3_TEST_NO_REDIS=1")
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("redis-server log:\n%s", s.Log())
		}
	})
	return s
}

// Start runs redis-server on a free loopback port with dir as its working
// directory, and waits until it answers PING.
func Start(dir string) (*Server, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, ErrNotInstalled
	}
	s := &Server{bin: bin, dir: dir, LogFile: filepath.Join(dir, "redis.log")}
	for attempt := 1; ; attempt++ {
		if s.Addr, err = dovecot.FreeAddr(); err != nil {
			return nil, err
		}
		err = s.start()
		if err == nil || attempt == startAttempts || !strings.Contains(s.Log(), "Address already in use") {
			return s, err
		}
	}
}

// Stop ends redis-server: SIGTERM, SIGKILL if it has not exited within
// stopTimeout. Stopping a stopped server does nothing.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.kill()
}

// Restart starts a stopped server again on the same address.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running() {
		return errors.New("redistest: restarting a running redis-server")
	}
	return s.start()
}

// Pause stops the process with SIGSTOP: connections are accepted by the
// kernel and never answered, as from a hung server.
func (s *Server) Pause() error { return s.signal(syscall.SIGSTOP) }

// Continue resumes a paused server.
func (s *Server) Continue() error { return s.signal(syscall.SIGCONT) }

// Pid is the running redis-server's process id (0 when it is not
// running), e.g. to read its CPU time from /proc.
func (s *Server) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running() {
		return 0
	}
	return s.cmd.Process.Pid
}

// Log returns what redis-server wrote so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.LogFile)
	return string(b)
}

func (s *Server) signal(sig syscall.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running() {
		return errors.New("redistest: redis-server is not running")
	}
	return s.cmd.Process.Signal(sig)
}

func (s *Server) running() bool {
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

func (s *Server) start() error {
	host, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		return fmt.Errorf("redistest: %w", err)
	}
	out, err := os.OpenFile(s.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("redistest: %w", err)
	}
	defer out.Close() // the child has its own descriptor
	cmd := exec.Command(s.bin,
		"--bind", host, "--port", port, "--dir", s.dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no",
		"--logfile", "", // stdout, which is LogFile
	)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = out, out
	// SIGTERM to redis-server if the test binary dies without calling Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("redistest: starting %s: %w", s.bin, err)
	}
	s.cmd, s.done, s.waitErr = cmd, make(chan struct{}), nil
	done := s.done
	go func() {
		s.waitErr = cmd.Wait()
		close(done)
	}()
	if err := s.waitReady(); err != nil {
		_ = s.kill()
		return fmt.Errorf("%w\n%s", err, s.Log()) // short: the server has just started
	}
	return nil
}

// waitReady polls Addr until it answers PING with PONG, the child exits or
// startTimeout passes.
func (s *Server) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("redistest: redis-server exited during startup: %v", s.waitErr)
		default:
		}
		if lastErr = ping(s.Addr); lastErr == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("redistest: no PONG on %s within %v: %v", s.Addr, startTimeout, lastErr)
}

// ping sends an inline PING.
func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// kill ends the child as Stop describes and waits for it.
func (s *Server) kill() error {
	if !s.running() {
		return nil
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT) // a paused server cannot act on SIGTERM
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return nil
	case <-time.After(stopTimeout):
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	return fmt.Errorf("redistest: redis-server did not exit within %v of SIGTERM; killed", stopTimeout)
}
