package pop3

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// waitReadable blocks until c has data, EOF or an error to read, or its read
// deadline passes, holding no buffer or pipe meanwhile, and returns how many
// bytes are queued (0 at EOF). Go's splice takes a pipe (two descriptors)
// before it waits and keeps it until it has moved what it was asked for, so
// the relay asks for exactly what is queued: an idle relay direction then
// holds no pipe, and an idle session two descriptors, not six.
func waitReadable(c net.Conn) (int64, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return relayChunk, nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return relayChunk, nil
	}
	var b [1]byte
	queued := 0
	err = rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err == syscall.EAGAIN {
			return false
		}
		queued, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		return true
	})
	return int64(queued), err
}
