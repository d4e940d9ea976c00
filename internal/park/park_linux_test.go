package park

import (
	"io"
	"net"
	"testing"
	"time"
)

// Each test has a Parker of its own, so they run in parallel; its epoll
// goroutine outlives the test, as a Parker lives as long as the process.

// wakeTimeout bounds the wait for a wake that must come; quietTime is how
// long a connection that must not be woken is watched.
const (
	wakeTimeout = 5 * time.Second
	quietTime   = 100 * time.Millisecond
)

// pair is a connection over loopback, both ends.
type pair struct{ client, server *net.TCPConn }

// tcpPairs connects n clients to a listener on loopback; the test's end
// closes them all.
func tcpPairs(t *testing.T, n int) []pair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pairs := make([]pair, n)
	for i := range pairs {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		pairs[i] = pair{c.(*net.TCPConn), s.(*net.TCPConn)}
		t.Cleanup(func() { c.Close(); s.Close() })
	}
	return pairs
}

func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	p := tcpPairs(t, 1)[0]
	return p.client, p.server
}

// waker sends its id on a channel at each wake; the channel has room for
// every wake a test expects, so the Parker's goroutine never blocks on it.
type waker struct {
	id    int
	woken chan<- int
}

func (w waker) Wake() { w.woken <- w.id }

func newWaker() (waker, <-chan int) {
	ch := make(chan int, 16)
	return waker{woken: ch}, ch
}

func expectWake(t *testing.T, woken <-chan int, what string) {
	t.Helper()
	select {
	case <-woken:
	case <-time.After(wakeTimeout):
		t.Fatalf("not woken within %v %s", wakeTimeout, what)
	}
}

func expectNoWake(t *testing.T, woken <-chan int, what string) {
	t.Helper()
	select {
	case <-woken:
		t.Fatalf("woken %s", what)
	case <-time.After(quietTime):
	}
}

func park(t *testing.T, p *Parker, c *net.TCPConn, w Waker, s *Slot) {
	t.Helper()
	if err := p.Park(c, w, s); err != nil {
		t.Fatalf("Park: %v", err)
	}
}

func expectWaiting(t *testing.T, p *Parker, want int) {
	t.Helper()
	if got := p.Waiting(); got != want {
		t.Fatalf("%d connections waiting, want %d", got, want)
	}
}

func send(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
}

// receive reads msg from c: parking leaves the bytes in the socket.
func receive(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(wakeTimeout))
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}

func TestWakeOnData(t *testing.T) {
	t.Parallel()
	var p Parker
	client, server := tcpPair(t)
	w, woken := newWaker()
	var s Slot
	park(t, &p, server, w, &s)
	expectWaiting(t, &p, 1)
	send(t, client, "STAT\r\n")
	expectWake(t, woken, "after the peer wrote")
	expectWaiting(t, &p, 0)
	send(t, client, "NOOP\r\n")
	expectNoWake(t, woken, "twice by one Park")
	receive(t, server, "STAT\r\nNOOP\r\n")
}

// TestWakeOnDataAlreadyQueued: bytes that arrived before Park wake at once,
// so none are stranded by a connection parking just after they came.
func TestWakeOnDataAlreadyQueued(t *testing.T) {
	t.Parallel()
	var p Parker
	client, server := tcpPair(t)
	send(t, client, "STAT\r\n")
	// Reading the first byte waits for the segment; the rest stays queued.
	receive(t, server, "S")
	w, woken := newWaker()
	var s Slot
	park(t, &p, server, w, &s)
	expectWake(t, woken, "with bytes queued")
	receive(t, server, "TAT\r\n")
}

func TestWakeOnHangUp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		hangUp func(*net.TCPConn) error
	}{
		{"close", (*net.TCPConn).Close},
		{"half-close", (*net.TCPConn).CloseWrite},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var p Parker
			client, server := tcpPair(t)
			w, woken := newWaker()
			var s Slot
			park(t, &p, server, w, &s)
			if err := tc.hangUp(client); err != nil {
				t.Fatal(err)
			}
			expectWake(t, woken, "after the peer hung up")
			expectWaiting(t, &p, 0)
			_ = server.SetReadDeadline(time.Now().Add(wakeTimeout))
			if n, err := server.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("read %d bytes, %v after the hang-up; want EOF", n, err)
			}
		})
	}
}

func TestQuietNotWoken(t *testing.T) {
	t.Parallel()
	var p Parker
	_, server := tcpPair(t)
	w, woken := newWaker()
	var s Slot
	park(t, &p, server, w, &s)
	expectNoWake(t, woken, "with nothing sent")
	expectWaiting(t, &p, 1)
	p.Forget(&s)
	expectWaiting(t, &p, 0)
}

func TestForget(t *testing.T) {
	t.Parallel()
	var p Parker
	client, server := tcpPair(t)
	w, woken := newWaker()
	var s Slot
	park(t, &p, server, w, &s)
	p.Forget(&s)
	expectWaiting(t, &p, 0)
	send(t, client, "STAT\r\n")
	expectNoWake(t, woken, "after Forget")
	p.Forget(&s) // twice, or after the wake: nothing left to drop
	expectWaiting(t, &p, 0)
}

// TestParkAgain: a socket woken once stays in the epoll set, disarmed; the
// next Park re-arms it (EPOLL_CTL_MOD).
func TestParkAgain(t *testing.T) {
	t.Parallel()
	var p Parker
	client, server := tcpPair(t)
	w, woken := newWaker()
	var s Slot
	for i := range 3 {
		park(t, &p, server, w, &s)
		if !s.registered {
			t.Fatalf("round %d: the slot does not know its socket is registered", i)
		}
		expectWaiting(t, &p, 1)
		send(t, client, "STAT\r\n")
		expectWake(t, woken, "after the peer wrote")
		receive(t, server, "STAT\r\n")
	}
	park(t, &p, server, w, &s)
	expectNoWake(t, woken, "parked again with nothing sent")
	expectWaiting(t, &p, 1)
}

// TestSlotDisagrees: a slot that is wrong about its socket being in the set
// (a zero slot for a registered socket, a registered one for a new socket)
// still parks, by the other epoll operation.
func TestSlotDisagrees(t *testing.T) {
	t.Parallel()
	var p Parker
	pairs := tcpPairs(t, 2)
	w, woken := newWaker()

	var first Slot
	park(t, &p, pairs[0].server, w, &first)
	send(t, pairs[0].client, "STAT\r\n")
	expectWake(t, woken, "after the peer wrote")
	receive(t, pairs[0].server, "STAT\r\n")
	var fresh Slot // EPOLL_CTL_ADD fails with EEXIST
	park(t, &p, pairs[0].server, w, &fresh)
	send(t, pairs[0].client, "NOOP\r\n")
	expectWake(t, woken, "parked with a zero slot")

	stale := Slot{registered: true} // EPOLL_CTL_MOD fails with ENOENT
	park(t, &p, pairs[1].server, w, &stale)
	send(t, pairs[1].client, "STAT\r\n")
	expectWake(t, woken, "parked with a slot from elsewhere")
	expectWaiting(t, &p, 0)
}

func TestManySockets(t *testing.T) {
	t.Parallel()
	const n = 200
	var p Parker
	pairs := tcpPairs(t, n)
	woken := make(chan int, 2*n)
	slots := make([]Slot, n)
	for i, pr := range pairs {
		park(t, &p, pr.server, waker{id: i, woken: woken}, &slots[i])
	}
	expectWaiting(t, &p, n)
	for _, pr := range pairs {
		send(t, pr.client, "STAT\r\n")
	}
	wakes := make([]int, n)
	deadline := time.After(wakeTimeout)
	for range n {
		select {
		case i := <-woken:
			wakes[i]++
		case <-deadline:
			t.Fatalf("%d connections still waiting after %v", p.Waiting(), wakeTimeout)
		}
	}
	for i, k := range wakes {
		if k != 1 {
			t.Errorf("connection %d woken %d times", i, k)
		}
	}
	expectNoWake(t, woken, "again")
	expectWaiting(t, &p, 0)
}

func TestParkClosed(t *testing.T) {
	t.Parallel()
	var p Parker
	pairs := tcpPairs(t, 2)
	w, woken := newWaker()
	var live Slot
	park(t, &p, pairs[0].server, w, &live) // the Parker has started and holds one
	pairs[1].server.Close()
	var s Slot
	if err := p.Park(pairs[1].server, w, &s); err == nil {
		t.Fatal("Park of a closed connection succeeded")
	}
	expectWaiting(t, &p, 1)
	if s != (Slot{}) {
		t.Errorf("slot %+v after a failed Park, want it unchanged", s)
	}
	expectNoWake(t, woken, "by the failed Park")
}
