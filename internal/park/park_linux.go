package park

import (
	"errors"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Supported reports that parking works here: Linux has epoll.
const Supported = true

// Parker is one epoll set and one goroutine for every connection parked in
// it. Its zero value is ready to use: the set and the goroutine start with
// the first Park, so a process that never parks pays nothing, and an error
// creating the set is remembered and returned by every Park. Nothing stops
// the goroutine: a Parker lives as long as the process. It must not be
// copied.
type Parker struct {
	once    sync.Once
	epfd    int
	err     error
	mu      sync.Mutex
	waiting map[uint64]Waker // by registration token, never by descriptor: descriptors are reused
	next    uint64
}

// Slot is what a Parker knows of one socket between its waits: the token of
// the current wait and whether the socket is in the epoll set (it stays
// there, disarmed, after its one-shot event, until it is closed). Its owner
// keeps it beside the socket, zero for a new socket, and calls Park and
// Forget with it one at a time.
type Slot struct {
	token      uint64 // the Parker's key while parked
	registered bool   // the socket is in the Parker's epoll set
}

func (p *Parker) start() {
	p.epfd, p.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if p.err != nil {
		return
	}
	p.waiting = make(map[uint64]Waker)
	go p.loop()
}

// Park arms a one-shot wait for c to be readable or hung up, after which w
// is woken once; s is c's Slot. The wake may come before Park returns: a
// caller that parks with a lock held, as the relay does, makes it wait
// until parking is finished. On an error nothing waits and s is unchanged.
func (p *Parker) Park(c *net.TCPConn, w Waker, s *Slot) error {
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
	p.waiting[token] = w
	p.mu.Unlock()
	// The event's 64-bit data carries the token; x/sys/unix splits it into
	// Fd and Pad.
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(token)), Pad: int32(uint32(token >> 32))}
	var ctlErr error
	err = rc.Control(func(fd uintptr) {
		// A socket stays in the set, disarmed, after its one-shot event.
		op := unix.EPOLL_CTL_MOD
		if !s.registered {
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
	s.token, s.registered = token, true
	return nil
}

// Forget drops the wait in s, if one is left, so that its Waker is not
// woken: for a connection whose owner ended it while parked. Closing the
// socket takes it out of the epoll set.
func (p *Parker) Forget(s *Slot) {
	p.forget(s.token)
}

func (p *Parker) forget(token uint64) {
	p.mu.Lock()
	delete(p.waiting, token)
	p.mu.Unlock()
}

// Waiting reports how many connections wait in p now.
func (p *Parker) Waiting() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.waiting)
}

func (p *Parker) loop() {
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
			w := p.waiting[token]
			delete(p.waiting, token)
			p.mu.Unlock()
			if w != nil {
				w.Wake()
			}
		}
	}
}
