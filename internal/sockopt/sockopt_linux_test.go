package sockopt

import (
	"io"
	"net"
	"testing"
	"time"
)

func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// waitFor polls cond for up to 2 seconds: loopback delivery is quick but
// not synchronous with Write.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestQueuedAndWireBytes(t *testing.T) {
	client, server := tcpPair(t)
	received0, _, ok := WireBytes(server)
	_, acked0, cok := WireBytes(client) // the kernel counts the SYN as acknowledged
	if !ok || !cok {
		t.Fatal("no TCP_INFO counts on Linux")
	}
	if _, err := client.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "1000 queued bytes", func() bool { return QueuedBytes(server) == 1000 })
	waitFor(t, "1000 bytes received and acknowledged", func() bool {
		received, _, _ := WireBytes(server)
		_, acked, _ := WireBytes(client)
		return received-received0 == 1000 && acked-acked0 == 1000
	})
	if SocketFailed(server) {
		t.Error("an open socket counts as failed")
	}
	client.Close()
	if !SocketFailed(client) {
		t.Error("a closed socket does not count as failed")
	}
}

func TestOpenFilesLimit(t *testing.T) {
	if n := OpenFilesLimit(); n == 0 {
		t.Error("no open files limit read on Linux")
	}
}

// TestDuplicate: the duplicate carries the connection on after the original
// is closed, and closing it too ends the connection.
func TestDuplicate(t *testing.T) {
	client, server := tcpPair(t)
	dup, err := Duplicate(server)
	if err != nil {
		t.Fatal(err)
	}
	server.Close()
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = dup.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(dup, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v through the duplicate", buf, err)
	}
	if _, err := dup.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	_ = client.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("read %q, %v from the duplicate", buf, err)
	}
	dup.Close()
	if n, err := client.Read(buf); err != io.EOF {
		t.Fatalf("after closing the duplicate: %d bytes, %v; want EOF", n, err)
	}
}
