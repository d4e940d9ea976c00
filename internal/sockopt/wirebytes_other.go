//go:build !linux

package sockopt

import "net"

// WireBytes has no TCP_INFO to read here; callers fall back to the relay's
// own counts.
func WireBytes(net.Conn) (received, acked int64, ok bool) { return 0, 0, false }

// SocketFailed is not needed here: only Linux splices (see SpliceSupported).
func SocketFailed(*net.TCPConn) bool { return false }
