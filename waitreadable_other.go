//go:build !linux

package pop3

import "net"

// waitReadable is needed only where splice(2) is used (Linux): elsewhere a
// relay step may move a whole chunk.
func waitReadable(net.Conn) (int64, error) { return relayChunk, nil }
