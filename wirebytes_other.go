//go:build !linux

package pop3

import "net"

// wireBytes has no TCP_INFO to read here; callers fall back to the relay's
// own counts.
func wireBytes(net.Conn) (received, acked int64, ok bool) { return 0, 0, false }

// socketFailed is not needed here: only Linux splices (see spliceSupported).
func socketFailed(*net.TCPConn) bool { return false }
