package sockopt

import (
	"errors"
	"net"
)

// Duplicate returns a second connection on c's socket (a new descriptor for
// the same open socket), so that the socket outlives the caller closing c:
// a relay that parks keeps the client's socket after caddy-l4 closes the
// connection it accepted. It needs nothing but the net package; where the
// system cannot hand out a socket's descriptor (Windows), the error says so.
func Duplicate(c *net.TCPConn) (*net.TCPConn, error) {
	f, err := c.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fc, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	tc, ok := fc.(*net.TCPConn)
	if !ok {
		_ = fc.Close()
		return nil, errors.New("sockopt: duplicated socket is not TCP")
	}
	return tc, nil
}
