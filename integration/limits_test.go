//go:build integration

package integration

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestConnectionFloodLeavesTheListenerServing runs Caddy with 64 open
// files, which leaves room for 16 sessions, fills them with logged-in
// sessions and sends 40 more connections, 8 at a time. Those must get
// -ERR [SYS/TEMP] and a close; and once the sessions end, the listener must
// still serve: caddy-l4 stops accepting for good when accept(2) fails with
// EMFILE, which the session limit keeps from happening. (Held open, the
// 40 connections would need 72 descriptors with the 16 sessions' 32.)
func TestConnectionFloodLeavesTheListenerServing(t *testing.T) {
	need(t)
	p, addr := startLowLimitCaddy(t, "flood")

	const fit = 16 // sessionLimit(64)
	var sessions []*client
	for i := 0; i < fit; i++ {
		c := dialPOP3(t, addr, nil)
		user, pass := alice, alicePass
		if i%2 == 1 {
			user, pass = bob, bobPass
		}
		c.login(user, pass)
		sessions = append(sessions, c)
	}

	floodExpectRefused(t, addr, 40, 8)

	// The sessions that fit work on.
	for _, c := range sessions {
		c.ok("STAT")
		c.quit()
	}
	// And the listener still accepts and serves.
	expectServing(t, p, addr)
	if !strings.Contains(p.log(), "refusing sessions") {
		t.Error("Caddy logged no warning about refused sessions")
	}
}

// floodExpectRefused opens n connections to addr, atOnce at a time, and
// expects each to get "-ERR [SYS/TEMP] Too many connections" and a close.
func floodExpectRefused(t *testing.T, addr string, n, atOnce int) {
	t.Helper()
	replies := make([]string, n)
	var wg sync.WaitGroup
	slots := make(chan struct{}, atOnce)
	for i := range n {
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				replies[i] = "dial: " + err.Error()
				return
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			r := bufio.NewReader(conn)
			line, err := r.ReadString('\n')
			if err != nil {
				replies[i] = fmt.Sprintf("no reply: %v", err)
				return
			}
			if _, err := r.ReadByte(); err == nil {
				replies[i] = "open after: " + line
				return
			}
			replies[i] = strings.TrimSuffix(line, "\r\n")
		}()
	}
	wg.Wait()
	for i, r := range replies {
		if !strings.HasPrefix(r, "-ERR [SYS/TEMP] Too many connections") {
			t.Errorf("flood connection %d: %q, want -ERR [SYS/TEMP] Too many connections and a close", i, r)
		}
	}
}

// startLowLimitCaddy starts a Caddy whose open files limit is 64, with one
// plaintext pop3 listener in front of the shared Dovecot.
func startLowLimitCaddy(t *testing.T, name string) (*caddyProc, string) {
	t.Helper()
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	cf := fmt.Sprintf(`{
	admin off
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
				}
			}
		}
	}
}
`, addr, env.dc.POP3Addr)
	lowLimit := []string{"/bin/sh", "-c", `ulimit -n 64 && exec "$0" "$@"`}
	return startCaddyWith(t, name, cf, lowLimit, listener{addr: addr}), addr
}

// expectServing checks that the listener at addr greets again after a
// flood and that a login works there.
func expectServing(t *testing.T, p *caddyProc, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := p.probe(listener{addr: addr})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the listener no longer greets after the flood (last: %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c := dialPOP3(t, addr, nil)
	c.login(alice, alicePass)
	c.ok("STAT")
	c.quit()
}
