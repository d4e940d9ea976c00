//go:build integration

package integration

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// TestKickEndsSessionThatStopsReading: a client that sends commands and
// never reads the replies blocks its session in a write once the socket
// buffers are full; DELETE /pop3/sessions must still end it. timeout is an
// hour here, so only the kick can.
func TestKickEndsSessionThatStopsReading(t *testing.T) {
	need(t)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	a := startAdminCaddy(t, "kick-unread", func(admin string) string {
		return fmt.Sprintf(`{
	admin %s
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
					timeout 1h
				}
			}
		}
	}
}
`, admin, addr, env.dc.POP3Addr)
	}, listener{addr: addr})
	waitFor(t, 5*time.Second, "the listener probe's session to end", func() bool { return len(a.sessions(t, "")) == 0 })

	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.(*net.TCPConn).SetReadBuffer(4096)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if greeting, err := bufio.NewReader(io.LimitReader(conn, 512)).ReadString('\n'); err != nil || !strings.HasPrefix(greeting, "+OK") {
		t.Fatalf("greeting %q, %v", greeting, err)
	}
	// Pipelined CAPAs until the proxy stops reading too: its replies fill
	// both socket buffers, then its writes block.
	batch := []byte(strings.Repeat("CAPA\r\n", 1000))
	sent := 0
	for {
		_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
		n, err := conn.Write(batch)
		sent += n
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			break
		}
		if err != nil {
			t.Fatalf("writing CAPAs: %v", err)
		}
		if sent > 256<<20 {
			t.Fatal("the proxy kept reading 256 MiB of commands whose replies nobody read")
		}
	}
	local := conn.LocalAddr().String()
	if n := a.kick(t, "remote="+local); n != 1 {
		t.Fatalf("DELETE ?remote=%s closed %d sessions, want 1", local, n)
	}
	waitFor(t, 5*time.Second, "the kicked session to end", func() bool {
		for _, s := range a.sessions(t, "") {
			if s.Remote == local {
				return false
			}
		}
		return true
	})
	// The client sees the end: the replies that were on their way, then a
	// close or reset, not a connection that stays open.
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the kicked session's connection is still open")
	}
}
