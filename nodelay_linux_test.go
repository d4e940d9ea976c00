package pop3

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestUpstreamSocketsSendAtOnce: the upstream leg must not wait for Nagle's
// algorithm: every command and every relayed reply is one small write that
// the peer is waiting for, and a delayed ACK would hold it up to 40 ms. It
// carries no keep-alive either: proxy_timeout ends idle sessions.
func TestUpstreamSocketsSendAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	d := &tcpDialer{timeout: 5 * time.Second}
	conn, err := d.dial(context.Background(), ln.Addr().String(), time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if v := getsockoptInt(t, conn, unix.IPPROTO_TCP, unix.TCP_NODELAY); v != 1 {
		t.Errorf("upstream socket: TCP_NODELAY is %d, want 1", v)
	}
	if v := getsockoptInt(t, conn, unix.SOL_SOCKET, unix.SO_KEEPALIVE); v != 0 {
		t.Errorf("upstream socket: SO_KEEPALIVE is %d, want 0 (proxy_timeout ends idle sessions)", v)
	}
}

func getsockoptInt(t *testing.T, c net.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}
