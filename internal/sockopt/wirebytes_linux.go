package sockopt

import (
	"net"

	"golang.org/x/sys/unix"
)

// WireBytes returns how many bytes the kernel has received from the peer of
// c and how many the peer has acknowledged, from TCP_INFO. It lets the admin
// API show live counts of a relay that splice(2) moves without the proxy
// seeing the bytes, and the relay see bytes move while one step blocks.
func WireBytes(c net.Conn) (received, acked int64, ok bool) {
	if raw, isWrapped := c.(interface{ Raw() net.Conn }); isWrapped { // PROXY protocol handler
		c = raw.Raw()
	}
	tc, isTCP := c.(*net.TCPConn)
	if !isTCP {
		return 0, 0, false
	}
	info, ok := tcpInfo(tc)
	if !ok {
		return 0, 0, false
	}
	return int64(info.Bytes_received), int64(info.Bytes_acked), true
}

// SocketFailed reports whether c's connection is gone (reset, or closed
// here), so that a failed splice can tell which of its sockets failed.
func SocketFailed(c *net.TCPConn) bool {
	info, ok := tcpInfo(c)
	return !ok || info.State == unix.BPF_TCP_CLOSE
}

func tcpInfo(c *net.TCPConn) (*unix.TCPInfo, bool) {
	sc, err := c.SyscallConn()
	if err != nil {
		return nil, false
	}
	var info *unix.TCPInfo
	if cerr := sc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); cerr != nil || err != nil {
		return nil, false
	}
	return info, true
}
