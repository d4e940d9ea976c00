//go:build integration

package integration

import (
	"bufio"
	"crypto/sha256"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// TestFloodWhileRetrsStream runs Caddy with 64 open files (16 slots of two
// descriptors), fills them with sessions whose 32 MiB RETRs stream into
// clients that do not read, so that every stream holds a splice pipe, and
// sends 40 more connections, 8 at a time. Every one of them must get
// -ERR [SYS/TEMP] and a close, the streams must then complete intact, and
// the listener must still accept: counted without their pipes, 16 streaming
// sessions would need 64 descriptors, and caddy-l4 stops accepting for good
// at the first EMFILE.
func TestFloodWhileRetrsStream(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	p, addr := startLowLimitCaddy(t, "flood-retr")

	// Sessions until the proxy refuses one, each with a RETR streaming.
	var streams []*client
	for len(streams) < 20 {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", len(streams), err)
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReaderSize(conn, 64*1024)
		greeting, err := r.ReadString('\n')
		if err != nil {
			conn.Close()
			t.Fatalf("session %d: no greeting (%v): the listener stopped accepting", len(streams), err)
		}
		if strings.HasPrefix(greeting, "-ERR [SYS/TEMP] Too many connections") {
			conn.Close()
			break
		}
		c := &client{t: t, name: addr, conn: conn, tcp: conn, r: r, greeting: greeting}
		t.Cleanup(func() { conn.Close() })
		c.login(big, bigPass)
		if ok := c.cmd("RETR 2"); !strings.HasPrefix(ok, "+OK") {
			t.Fatalf("RETR 2: %q", ok)
		}
		streams = append(streams, c)
		time.Sleep(100 * time.Millisecond) // the relay fills the client's buffers and waits in a splice
	}
	if len(streams) == 0 || len(streams) >= 16 {
		t.Fatalf("%d streaming sessions fit in 16 slots, want fewer: each stream's pipe takes a slot", len(streams))
	}

	floodExpectRefused(t, addr, 40, 8)

	// The streams complete, byte for byte.
	wantSum, wantSize := bigRetrBody()
	for i, c := range streams {
		c.deadline(120 * time.Second)
		h := sha256.New()
		var window []byte
		for !strings.HasSuffix(string(window), "\r\n.\r\n") {
			buf := make([]byte, 256*1024)
			n, err := c.r.Read(buf)
			h.Write(buf[:n])
			window = append(window, buf[:n]...)
			if len(window) > 8 {
				window = window[len(window)-8:]
			}
			if err != nil && err != io.EOF || err == io.EOF && n == 0 {
				t.Fatalf("stream %d: %v", i, err)
			}
		}
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		if sum != wantSum {
			t.Errorf("stream %d: RETR 2 differs from the message (want %d bytes)", i, wantSize)
		}
		c.deadline(30 * time.Second)
		c.quit()
	}
	// And the listener still accepts and serves.
	expectServing(t, p, addr)
}
