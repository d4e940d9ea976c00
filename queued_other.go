//go:build !linux

package pop3

import "net"

// queuedBytes cannot ask the kernel here; ReadFrom then copies a whole
// chunk, streaming as it goes.
func queuedBytes(*net.TCPConn) int64 { return relayChunk }
