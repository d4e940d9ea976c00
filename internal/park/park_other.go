//go:build !linux

package park

import (
	"errors"
	"fmt"
	"net"
)

// Supported reports that parking does not work here: without epoll every
// connection keeps its goroutine.
const Supported = false

// Parker has nothing to wait in here: every Park fails.
type Parker struct{}

// Slot holds nothing here: no socket is ever registered.
type Slot struct{}

var errNoParking = fmt.Errorf("park: parking needs Linux: %w", errors.ErrUnsupported)

// Park fails: the caller keeps its goroutine.
func (*Parker) Park(*net.TCPConn, Waker, *Slot) error { return errNoParking }

// Forget has nothing to drop.
func (*Parker) Forget(*Slot) {}

// Waiting is 0: nothing ever waits here.
func (*Parker) Waiting() int { return 0 }
