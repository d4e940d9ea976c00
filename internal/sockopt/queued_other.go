//go:build !linux

package sockopt

import "net"

// SpliceSupported: elsewhere TCPConn.ReadFrom copies until its limit or
// EOF in one call, a step nothing can see progress in; plain relays copy
// through a buffer instead, one read at a time.
const SpliceSupported = false

func QueuedBytes(*net.TCPConn) int64 { return 0 }
