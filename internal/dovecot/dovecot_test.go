package dovecot

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// startOrFail starts Dovecot, failing (not skipping) when it is missing
// unless the developer opted out with POP3_TEST_NO_DOVECOT=1.
func startOrFail(t *testing.T, cfg Config) *Server {
	t.Helper()
	srv, err := Start(cfg)
	if errors.Is(err, ErrNotInstalled) && os.Getenv("POP3_TEST_NO_DOVECOT") == "1" {
		t.Skip("dovecot not installed and POP3_TEST_NO_DOVECOT=1")
	}
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
		if t.Failed() {
			t.Logf("dovecot log:\n%s", srv.Log())
		}
	})
	return srv
}

// client is a minimal POP3 client over a raw connection.
type client struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

// dial connects to addr, over TLS when tlsConfig is set, and reads the
// greeting.
func dial(t *testing.T, addr string, tlsConfig *tls.Config) *client {
	t.Helper()
	var conn net.Conn
	var err error
	if tlsConfig != nil {
		conn, err = tls.Dial("tcp", addr, tlsConfig)
	} else {
		conn, err = net.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	c := &client{t: t, conn: conn, r: bufio.NewReader(conn)}
	if line := c.line(); !strings.HasPrefix(line, "+OK") {
		t.Fatalf("greeting = %q, want +OK", line)
	}
	return c
}

func (c *client) line() string {
	c.t.Helper()
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("reading reply: %v", err)
	}
	return strings.TrimRight(line, "\r\n")
}

// cmd sends a command and returns the status line.
func (c *client) cmd(cmd string) string {
	c.t.Helper()
	if _, err := c.conn.Write([]byte(cmd + "\r\n")); err != nil {
		c.t.Fatalf("writing %q: %v", strings.Fields(cmd)[0], err)
	}
	return c.line()
}

func (c *client) mustOK(cmd string) string {
	c.t.Helper()
	line := c.cmd(cmd)
	if !strings.HasPrefix(line, "+OK") {
		c.t.Fatalf("%s: got %q, want +OK", strings.Fields(cmd)[0], line)
	}
	return line
}

// retr fetches message n and undoes dot-stuffing (RFC 1939 section 3).
func (c *client) retr(n string) []byte {
	c.t.Helper()
	c.mustOK("RETR " + n)
	var msg []byte
	for {
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			c.t.Fatalf("reading message: %v", err)
		}
		if string(line) == ".\r\n" {
			return msg
		}
		msg = append(msg, bytes.TrimPrefix(line, []byte("."))...)
	}
}

func (c *client) login(user, pass string) {
	c.t.Helper()
	c.mustOK("USER " + user)
	c.mustOK("PASS " + pass)
}

const testMessage = "From: Alice <alice@example.org>\r\n" +
	"To: Bob <bob@example.org>\r\n" +
	"Subject: test\r\n" +
	"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n" +
	"Message-ID: <1@example.org>\r\n" +
	"\r\n" +
	"Hello.\r\n" +
	".A line that starts with a dot.\r\n" +
	"Bye.\r\n"

func TestStartLoginRetr(t *testing.T) {
	srv := startOrFail(t, Config{
		Dir:   t.TempDir(),
		Users: []User{{Name: "alice", Password: "secret", Messages: [][]byte{[]byte(testMessage)}}},
	})

	c := dial(t, srv.POP3Addr, nil)
	c.login("alice", "secret")
	if got := c.mustOK("STAT"); !strings.HasPrefix(got, "+OK 1 ") {
		t.Errorf("STAT = %q, want one message", got)
	}
	if got := c.retr("1"); string(got) != testMessage {
		t.Errorf("RETR 1 = %q, want %q", got, testMessage)
	}
	uidl := c.mustOK("UIDL 1")
	c.mustOK("QUIT")

	// pop3_uidl_format = %g: the same UIDL in the next session.
	c = dial(t, srv.POP3Addr, nil)
	c.login("alice", "secret")
	if again := c.mustOK("UIDL 1"); again != uidl || len(strings.Fields(uidl)) != 3 {
		t.Errorf("UIDL 1 = %q, then %q; want one stable id", uidl, again)
	}
	c.mustOK("QUIT")

	if log := srv.Log(); !strings.Contains(log, "Login: user=<alice>") {
		t.Errorf("log lacks the login line:\n%s", log)
	}
}

func TestWrongPassword(t *testing.T) {
	tests := []struct {
		name    string
		extra   string
		reply   string
		maxTime time.Duration // for three failures in a row
	}{
		// Dovecot 2.3 answers failures on a 500 ms tick; without
		// auth_failure_delay = 0 and the anvil penalty off, three would
		// take over 6 s.
		{"default", "", "-ERR [AUTH] Authentication failed.", 3 * time.Second},
		{"FastFailPassdb", FastFailPassdb, "-ERR [AUTH] Login disabled for this user", time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startOrFail(t, Config{
				Dir:   t.TempDir(),
				Users: []User{{Name: "alice", Password: "secret"}},
				Extra: tt.extra,
			})
			c := dial(t, srv.POP3Addr, nil)
			start := time.Now()
			for _, user := range []string{"alice", "alice", "nosuchuser"} {
				c.mustOK("USER " + user)
				if got := c.cmd("PASS wrong"); got != tt.reply {
					t.Fatalf("PASS wrong for %s = %q, want %q", user, got, tt.reply)
				}
			}
			if d := time.Since(start); d > tt.maxTime {
				t.Errorf("three failed logins took %v, want at most %v", d, tt.maxTime)
			}
			c.login("alice", "secret")
		})
	}
}

func TestTLSAndSetMessages(t *testing.T) {
	srv := startOrFail(t, Config{
		Dir:   t.TempDir(),
		Users: []User{{Name: "bob", Password: "pw"}},
	})
	pem, err := os.ReadFile(srv.CACertFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in CACertFile")
	}

	second := strings.Replace(testMessage, "Subject: test", "Subject: second", 1)
	if err := srv.SetMessages("bob", [][]byte{[]byte(testMessage), []byte(second)}); err != nil {
		t.Fatalf("SetMessages: %v", err)
	}
	if err := srv.SetMessages("nobody", nil); err == nil {
		t.Error("SetMessages of an unknown user succeeded")
	}

	for _, name := range []string{"localhost", "127.0.0.1"} {
		t.Run("pop3s "+name, func(t *testing.T) {
			c := dial(t, srv.POP3SAddr, &tls.Config{RootCAs: roots, ServerName: name})
			c.login("bob", "pw")
			if got := c.mustOK("STAT"); !strings.HasPrefix(got, "+OK 2 ") {
				t.Errorf("STAT = %q, want two messages", got)
			}
			if got := c.retr("2"); string(got) != second {
				t.Errorf("RETR 2 = %q, want %q", got, second)
			}
			c.mustOK("QUIT")
		})
	}

	t.Run("stls", func(t *testing.T) {
		c := dial(t, srv.POP3Addr, nil)
		c.mustOK("STLS")
		tc := tls.Client(c.conn, &tls.Config{RootCAs: roots, ServerName: "localhost"})
		if err := tc.Handshake(); err != nil {
			t.Fatalf("STLS handshake: %v", err)
		}
		c.conn, c.r = tc, bufio.NewReader(tc)
		c.login("bob", "pw")
		if got := c.retr("1"); string(got) != testMessage {
			t.Errorf("RETR 1 = %q, want %q", got, testMessage)
		}
	})

	// An emptied mailbox shows no messages to a new session.
	if err := srv.SetMessages("bob", nil); err != nil {
		t.Fatalf("SetMessages: %v", err)
	}
	c := dial(t, srv.POP3Addr, nil)
	c.login("bob", "pw")
	if got := c.mustOK("STAT"); !strings.HasPrefix(got, "+OK 0 ") {
		t.Errorf("STAT after emptying = %q, want no messages", got)
	}
}

func TestMessageOrder(t *testing.T) {
	// Messages keep the order given: message n is msgs[n-1].
	var msgs [][]byte
	for i := range 25 {
		msgs = append(msgs, []byte(strings.Replace(testMessage, "Subject: test", fmt.Sprintf("Subject: message %d", i+1), 1)))
	}
	srv := startOrFail(t, Config{
		Dir:   t.TempDir(),
		Users: []User{{Name: "carol", Password: "pw", Messages: msgs}},
	})
	c := dial(t, srv.POP3Addr, nil)
	c.login("carol", "pw")
	for i, want := range msgs {
		if got := c.retr(strconv.Itoa(i + 1)); string(got) != string(want) {
			t.Errorf("RETR %d = %q, want %q", i+1, got, want)
		}
	}
}

func TestFixedAddrAndStop(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	srv := startOrFail(t, Config{Dir: t.TempDir(), POP3Addr: addr})
	if srv.POP3Addr != addr {
		t.Errorf("POP3Addr = %q, want %q", srv.POP3Addr, addr)
	}
	if err := srv.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after Stop", addr)
	}
}

func TestLongDir(t *testing.T) {
	// Subtests get long t.TempDir paths; Dovecot's sockets must still fit.
	dir := filepath.Join(t.TempDir(), strings.Repeat("x", 100))
	srv := startOrFail(t, Config{Dir: dir, Users: []User{{Name: "alice", Password: "secret"}}})
	c := dial(t, srv.POP3Addr, nil)
	c.login("alice", "secret")
}

func TestBusyPort(t *testing.T) {
	if _, err := findBinary(); err != nil && os.Getenv("POP3_TEST_NO_DOVECOT") == "1" {
		t.Skip("dovecot not installed and POP3_TEST_NO_DOVECOT=1")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srv, err := Start(Config{Dir: t.TempDir(), POP3Addr: l.Addr().String()})
	if err == nil {
		srv.Stop()
		t.Fatal("Start succeeded on a busy port")
	}
	if !strings.Contains(err.Error(), "Address already in use") {
		t.Errorf("error lacks the log's reason: %v", err)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"space in dir", Config{Dir: "/tmp/a b"}},
		{"empty user", Config{Users: []User{{Name: ""}}}},
		{"colon in user", Config{Users: []User{{Name: "a:b"}}}},
		{"slash in user", Config{Users: []User{{Name: "../x"}}}},
		{"duplicate user", Config{Users: []User{{Name: "a"}, {Name: "a"}}}},
		{"newline in password", Config{Users: []User{{Name: "a", Password: "x\ny"}}}},
		{"bad address", Config{POP3Addr: "localhost"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := validate(tt.cfg); err == nil {
				t.Error("validate accepted it")
			}
		})
	}
}
