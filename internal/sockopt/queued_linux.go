package sockopt

import (
	"net"

	"golang.org/x/sys/unix"
)

// SpliceSupported: plain relays move bytes with splice(2).
const SpliceSupported = true

// QueuedBytes returns how many bytes wait in c's receive queue (SIOCINQ), so
// that splice(2) is asked for no more than is there: Go's splice holds a
// pipe until it has moved all it was asked for.
func QueuedBytes(c *net.TCPConn) int64 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	queued := 0
	_ = rc.Control(func(fd uintptr) {
		queued, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return int64(queued)
}
