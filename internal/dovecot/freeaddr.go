package dovecot

import (
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

var (
	portsMu    sync.Mutex
	handedOut  = map[int]bool{}
	firstPort  = 10000
	ephemerals = ephemeralStart()
)

// FreeAddr returns a loopback address whose port nothing listens on and
// that the kernel does not hand out as a connection's local port: a port
// from net.Listen(":0") is an ephemeral one, which a busy test's outgoing
// connections can take before the server that was given it binds it. No
// port is handed out twice in a process.
func FreeAddr() (string, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	if ephemerals-firstPort > 1000 {
		for range 1000 {
			p := firstPort + mrand.IntN(ephemerals-firstPort)
			if handedOut[p] {
				continue
			}
			l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err != nil {
				continue
			}
			_ = l.Close()
			handedOut[p] = true
			return l.Addr().String(), nil
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("picking a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// ephemeralStart is the first port of Linux's ephemeral range.
func ephemeralStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	if f := strings.Fields(string(b)); len(f) == 2 {
		if n, err := strconv.Atoi(f[0]); err == nil {
			return n
		}
	}
	return 32768
}
