//go:build !linux

package pop3

import (
	"errors"
	"net"
)

// parkingSupported: without epoll every relay direction keeps its goroutine.
const parkingSupported = false

type parker struct{}

var theParker parker

var errNoParking = errors.New("parking needs Linux")

func (parker) park(*direction, *net.TCPConn) error { return errNoParking }
func (parker) forget(uint64)                       {}
func (parker) waitingCount() int                   { return 0 }
