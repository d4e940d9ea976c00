// Package pop3test has test doubles: a scripted POP3 upstream that records
// what it received.
package pop3test

import (
	"bufio"
	"crypto/hmac"
	"crypto/md5"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
)

// Upstream is a fake POP3 server on a loopback port.
type Upstream struct {
	// Users maps user names to passwords.
	Users map[string]string
	// Greeting is the first line; default "+OK fake ready".
	Greeting string
	// SASL lists the mechanisms CAPA advertises (e.g. "PLAIN"); empty: no SASL line.
	SASL []string
	// NoCAPA answers CAPA with -ERR.
	NoCAPA bool
	// Silent accepts connections but never greets.
	Silent bool
	// CloseAfter closes the connection after reading this command
	// (e.g. "PASS") instead of answering it.
	CloseAfter string
	// Messages are served by RETR n after login.
	Messages []string
	// FailText is the -ERR line sent for a wrong password.
	FailText string
	// Timestamp, when set, is the APOP timestamp of the greeting; APOP
	// and AUTH CRAM-MD5 are then served (CRAM-MD5 needs "CRAM-MD5" in SASL).
	Timestamp string
	// TLS, when set, serves POP3S (TLS from the first byte), or STLS when
	// STLS is also set.
	TLS  *tls.Config
	STLS bool
	// Name is put in the STAT reply ("+OK 1 23 <Name>") so a test can tell
	// upstreams apart.
	Name string

	ln    net.Listener
	mu    sync.Mutex
	lines []string
	conns []net.Conn
}

// Start listens on 127.0.0.1 and serves until the test ends.
func (u *Upstream) Start(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.ln = ln
	t.Cleanup(u.Close)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns = append(u.conns, c)
			u.mu.Unlock()
			go u.serve(c)
		}
	}()
	return ln.Addr().String()
}

// Close stops the listener and every connection.
func (u *Upstream) Close() {
	if u.ln != nil {
		_ = u.ln.Close()
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.conns {
		_ = c.Close()
	}
}

// CloseConnections closes every connection so far and keeps accepting new
// ones.
func (u *Upstream) CloseConnections() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.conns {
		_ = c.Close()
	}
	u.conns = nil
}

// Lines returns every command line received, in order.
func (u *Upstream) Lines() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.lines...)
}

func (u *Upstream) serve(c net.Conn) {
	defer func() { _ = c.Close() }()
	if u.TLS != nil && !u.STLS {
		tc := tls.Server(c, u.TLS)
		if err := tc.Handshake(); err != nil {
			return
		}
		c = tc
	}
	if u.Silent {
		_, _ = bufio.NewReader(c).ReadString(0)
		return
	}
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	send := func(s string) { _, _ = w.WriteString(s + "\r\n"); _ = w.Flush() }
	greeting := u.Greeting
	if greeting == "" {
		greeting = "+OK fake ready"
		if u.Timestamp != "" {
			greeting += " " + u.Timestamp
		}
	}
	send(greeting)
	if strings.HasPrefix(greeting, "-") {
		return
	}
	// readLine reads and records one line from the client.
	readLine := func() (string, bool) {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", false
		}
		line = strings.TrimRight(line, "\r\n")
		u.mu.Lock()
		u.lines = append(u.lines, line)
		u.mu.Unlock()
		return line, true
	}
	var user string
	loggedIn := false
	for {
		line, ok := readLine()
		if !ok {
			return
		}
		verb, arg, _ := strings.Cut(line, " ")
		verb = strings.ToUpper(verb)
		if u.CloseAfter != "" && verb == u.CloseAfter {
			return
		}
		switch {
		case verb == "CAPA" && u.NoCAPA:
			send("-ERR no CAPA")
		case verb == "CAPA":
			send("+OK")
			send("TOP")
			send("UIDL")
			if len(u.SASL) > 0 {
				send("SASL " + strings.Join(u.SASL, " "))
			}
			if u.STLS {
				send("STLS")
			}
			send(".")
		case verb == "STLS" && u.STLS && u.TLS != nil:
			send("+OK Begin TLS")
			tc := tls.Server(c, u.TLS)
			if err := tc.Handshake(); err != nil {
				return
			}
			c = tc
			r, w = bufio.NewReader(c), bufio.NewWriter(c)
		case verb == "XCLIENT" && !loggedIn:
			send("+OK Updated")
		case verb == "USER" && !loggedIn:
			user = arg
			send("+OK")
		case verb == "PASS" && !loggedIn:
			loggedIn = u.check(user, arg, send)
		case verb == "APOP" && !loggedIn && u.Timestamp != "":
			user, digest, _ := strings.Cut(arg, " ")
			sum := md5.Sum([]byte(u.Timestamp + u.Users[user]))
			loggedIn = u.check(user, u.Users[user], func(string) {}) && hex.EncodeToString(sum[:]) == digest
			if loggedIn {
				send("+OK Logged in.")
			} else {
				send("-ERR [AUTH] Authentication failed.")
			}
		case verb == "AUTH" && strings.EqualFold(arg, "CRAM-MD5") && !loggedIn && u.Timestamp != "":
			send("+ " + base64.StdEncoding.EncodeToString([]byte(u.Timestamp)))
			line, ok := readLine()
			if !ok {
				return
			}
			if line == "*" {
				send("-ERR Authentication cancelled")
				continue
			}
			b, _ := base64.StdEncoding.DecodeString(line)
			user, digest, _ := strings.Cut(string(b), " ")
			mac := hmac.New(md5.New, []byte(u.Users[user]))
			mac.Write([]byte(u.Timestamp))
			if _, ok := u.Users[user]; ok && hex.EncodeToString(mac.Sum(nil)) == digest {
				loggedIn = true
				send("+OK Logged in.")
			} else {
				send("-ERR [AUTH] Authentication failed.")
			}
		case verb == "AUTH" && !loggedIn:
			mech, ir, _ := strings.Cut(arg, " ")
			b, err := base64.StdEncoding.DecodeString(ir)
			parts := strings.Split(string(b), "\x00")
			if !strings.EqualFold(mech, "PLAIN") || err != nil || len(parts) != 3 {
				send("-ERR bad AUTH")
				continue
			}
			loggedIn = u.check(parts[1], parts[2], send)
		case verb == "QUIT":
			send("+OK bye")
			return
		case verb == "NOOP" && loggedIn:
			send("+OK")
		case verb == "STAT" && loggedIn:
			size := 0
			for _, m := range u.Messages {
				size += len(m)
			}
			send(strings.TrimSpace(fmt.Sprintf("+OK %d %d %s", len(u.Messages), size, u.Name)))
		case verb == "RETR" && loggedIn:
			var n int
			if _, err := fmt.Sscan(arg, &n); err != nil || n < 1 || n > len(u.Messages) {
				send("-ERR no such message")
				continue
			}
			_, _ = w.WriteString(fmt.Sprintf("+OK %d octets\r\n", len(u.Messages[n-1])))
			_, _ = w.WriteString(u.Messages[n-1])
			send(".")
		default:
			send("-ERR unknown")
		}
	}
}

func (u *Upstream) check(user, pass string, send func(string)) bool {
	if want, ok := u.Users[user]; ok && want == pass {
		send("+OK Logged in.")
		return true
	}
	if u.FailText != "" {
		send(u.FailText)
	} else {
		send("-ERR [AUTH] Authentication failed.")
	}
	return false
}
