package pop3

import (
	"errors"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// parkingSupported: quiet plain relays wait in an epoll set of their own.
const parkingSupported = true

// parker is one epoll set and one goroutine for every parked relay
// direction in the process: a parked direction costs no goroutine stack,
// which is most of what an idle Go session would otherwise hold.
type parker struct {
	once    sync.Once
	epfd    int
	err     error
	mu      sync.Mutex
	waiting map[uint64]*direction // by registration token, never by descriptor: descriptors are reused
	next    uint64
}

var theParker parker

func (p *parker) start() {
	p.epfd, p.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if p.err != nil {
		return
	}
	p.waiting = make(map[uint64]*direction)
	go p.loop()
}

// park arms a one-shot wait for c to be readable or hung up, after which d
// is woken. Called with d's relay locked, so a wake waits for the caller to
// finish parking.
func (p *parker) park(d *direction, c *net.TCPConn) error {
	p.once.Do(p.start)
	if p.err != nil {
		return p.err
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.next++
	token := p.next
	p.waiting[token] = d
	p.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(token)), Pad: int32(uint32(token >> 32))}
	var ctlErr error
	err = rc.Control(func(fd uintptr) {
		// A socket stays in the set, disarmed, after its one-shot event.
		op := unix.EPOLL_CTL_MOD
		if !d.registered {
			op = unix.EPOLL_CTL_ADD
		}
		ctlErr = unix.EpollCtl(p.epfd, op, int(fd), &ev)
		switch {
		case errors.Is(ctlErr, unix.EEXIST):
			ctlErr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev)
		case errors.Is(ctlErr, unix.ENOENT):
			ctlErr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
		}
	})
	if err == nil {
		err = ctlErr
	}
	if err != nil {
		p.forget(token)
		return err
	}
	d.token, d.registered = token, true
	return nil
}

// forget drops a parked direction whose relay ended; closing its socket
// takes it out of the epoll set.
func (p *parker) forget(token uint64) {
	p.mu.Lock()
	delete(p.waiting, token)
	p.mu.Unlock()
}

// waitingCount is how many directions wait in the parker now.
func (p *parker) waitingCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.waiting)
}

func (p *parker) loop() {
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if !errors.Is(err, unix.EINTR) {
				time.Sleep(10 * time.Millisecond) // not expected; do not spin
			}
			continue
		}
		for _, ev := range events[:n] {
			token := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			p.mu.Lock()
			d := p.waiting[token]
			delete(p.waiting, token)
			p.mu.Unlock()
			if d != nil {
				d.r.wake(d)
			}
		}
	}
}
