//go:build !linux

package pop3

import "net"

// spliceSupported: elsewhere TCPConn.ReadFrom copies until its limit or
// EOF in one call, a step nothing can see progress in; plain relays copy
// through a buffer instead, one read at a time.
const spliceSupported = false

func queuedBytes(*net.TCPConn) int64 { return 0 }
