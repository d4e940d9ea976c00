package pop3

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/park"
	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

// relayChunk is how much one splice or copy call moves at most.
const relayChunk = 4 << 20

// relayBuffers serve a copying relay (TLS on a leg) while bytes stream: one
// full TLS record of plaintext, which is the most one TLS read returns.
var relayBuffers = sync.Pool{New: func() any { b := make([]byte, copyBurst); return &b }}

const (
	copyBurst = 16 << 10
	// copyHead is what a copying direction reads into while it waits, so
	// that an idle TLS session holds no burst buffer.
	copyHead = 1 << 10
)

// testHookRelayFlush, set only by tests, runs after the relay is visible
// to kick and before it flushes what the login left buffered.
var testHookRelayFlush func(*session)

// parkAfter is how long a plain TCP relay stays quiet before it gives up its
// goroutines: each direction then waits in one process-wide epoll set, and
// the session costs two sockets and a few hundred bytes until data moves.
// Long enough that a session busy with commands never pays for parking.
var parkAfter = newAtomicDuration(time.Second) // atomic: tests change it while relays of earlier tests end

// parker is the one epoll set that parked relay directions of the process
// wait in: one goroutine for all of them.
var parker park.Parker

// atomicDuration is a time.Duration read and set from any goroutine.
type atomicDuration struct{ v atomic.Int64 }

func newAtomicDuration(d time.Duration) *atomicDuration {
	a := new(atomicDuration)
	a.set(d)
	return a
}

func (a *atomicDuration) get() time.Duration  { return time.Duration(a.v.Load()) }
func (a *atomicDuration) set(d time.Duration) { a.v.Store(int64(d)) }

// relay copies bytes both ways until the session ends. With plain TCP on
// both legs Linux moves the bytes (splice(2) through TCPConn.ReadFrom);
// with TLS on either leg a pooled buffer copies. A quiet session parks when
// the proxy can reach both sockets under any TLS: plain TCP, TLS that the
// handler terminated itself (STLS, implicit_tls) and TLS to the upstream;
// not TLS from caddy-l4's tls handler, whose socket it cannot swap.
func (s *session) relay() error {
	up := s.upstream
	client := s.cx.Conn // the *layer4.Connection wrapper would hide ReadFrom
	if len(s.cx.MatchingBytes()) > 0 {
		client = s.cx // bytes prefetched by a matcher must be read first
	}

	r := newRelay(s, client, up.conn)
	quiet := r.quiet
	s.shared.relay.Store(r)
	if _, kicked := s.kicked(); kicked {
		s.result = s.kickResult()
		return nil
	}
	if testHookRelayFlush != nil {
		testHookRelayFlush(s)
	}
	// Commands the client pipelined after its login, and anything the
	// upstream sent after its +OK, must not be lost. The relay's timer is
	// not running yet: a peer that does not read gets proxy_timeout here.
	_ = client.SetWriteDeadline(now().Add(r.idle))
	_ = up.conn.SetWriteDeadline(now().Add(r.idle))
	n, err := s.r.WriteBufferedTo(up.conn)
	s.shared.fromClient.Add(n)
	if err != nil {
		s.result = "upstream_error"
		if _, kicked := s.kicked(); kicked {
			s.result = s.kickResult() // kick closed the connections
		}
		return nil
	}
	n, err = up.r.WriteBufferedTo(client)
	s.shared.toClient.Add(n)
	if err != nil {
		return s.ioError(err)
	}
	s.releaseBuffers() // the relay needs no line buffers
	up.releaseBuffers()
	_ = client.SetDeadline(time.Time{})
	_ = up.conn.SetDeadline(time.Time{})
	s.debug("relay started", zap.Bool("splice", r.splice))

	// Upstream to client in a new goroutine, client to upstream in this one
	// until the session parks: then this goroutine hands the client
	// connection to the relay and returns to caddy-l4.
	r.mu.Lock()
	r.timer = time.AfterFunc(r.nextCheck(0, 0), r.check)
	r.mu.Unlock()
	go r.pump(&r.down)
	if r.pump(&r.up) {
		s.detached = true
		return nil
	}
	<-quiet
	r.timer.Stop()
	s.result = r.result
	return nil
}

type pumpState uint8

const (
	pumpRunning pumpState = iota
	pumpParked
	pumpDone
)

// direction is one way of a relay.
type direction struct {
	r          *relay
	toUpstream bool
	moved      *atomic.Int64
	state      pumpState // guarded by r.mu
	slot       park.Slot // the parker's knowledge of the source socket; guarded by r.mu
}

// Wake runs d again: the parker calls it when d's source has data or hung
// up.
func (d *direction) Wake() { d.r.wake(d) }

// relay is the state both directions share.
type relay struct {
	s          *session
	idle       time.Duration
	splice     bool // plain TCP both ways: splice(2)
	lastActive atomic.Int64

	mu          sync.Mutex
	client      net.Conn // what the client's bytes go through: the socket, or TLS over it
	upstream    net.Conn
	clientRaw   *net.TCPConn // the client's socket (a duplicate once detached); nil: no parking
	upstreamRaw *net.TCPConn
	clientSwap  *swapConn // under the client's TLS, if the handler terminated it
	up, down    direction // client to upstream, upstream to client
	running     int       // pumps with a goroutine, the handler's included
	detached    bool      // the handler returned: the relay ends the session itself
	ended       bool
	counted     bool // counted in the parked_sessions gauge
	result      string
	timer       *time.Timer
	quiet       chan struct{} // closed when ended and no pump runs, if not detached

	// The kernel's byte counts of both sockets (TCP_INFO), which check
	// samples: bytes that a long splice, a blocked write or a draining send
	// queue moves are activity too, at no cost to the pumps.
	clientWire, upstreamWire *net.TCPConn
	wireOK                   bool      // both sockets may have counts
	wireSeen                 int64     // their sum at the last sample; -1 before the first
	wireActive               time.Time // when a sample last saw it change
}

func newRelay(s *session, client, upstream net.Conn) *relay {
	_, clientTCP := client.(*net.TCPConn)
	_, upstreamTCP := upstream.(*net.TCPConn)
	r := &relay{
		s: s, idle: time.Duration(s.h.ProxyTimeout), splice: sockopt.SpliceSupported && clientTCP && upstreamTCP,
		client: client, upstream: upstream, quiet: make(chan struct{}),
		running: 2, // both pumps, from before they start: an early end waits for them
	}
	r.clientRaw, r.clientSwap = clientSocket(client)
	r.upstreamRaw = upstreamSocket(upstream)
	r.up = direction{r: r, toUpstream: true, moved: &s.shared.fromClient}
	r.down = direction{r: r, moved: &s.shared.toClient}
	r.clientWire, r.upstreamWire = socketUnder(client), socketUnder(upstream)
	// The first check takes the first sample: two getsockopt calls fewer
	// for every session that ends before then.
	r.wireOK, r.wireSeen = r.clientWire != nil && r.upstreamWire != nil, -1
	r.wireActive = now()
	r.touch()
	return r
}

func (r *relay) touch() { r.lastActive.Store(now().UnixNano()) }

func (r *relay) quietFor() time.Duration {
	return now().Sub(time.Unix(0, r.lastActive.Load()))
}

// wireProgress sums the kernel's counts of bytes received and acknowledged
// on both sockets. Called with r.mu held, or before the pumps start.
func (r *relay) wireProgress() (int64, bool) {
	if r.clientWire == nil || r.upstreamWire == nil {
		return 0, false
	}
	cin, cout, cok := sockopt.WireBytes(r.clientWire)
	uin, uout, uok := sockopt.WireBytes(r.upstreamWire)
	return cin + cout + uin + uout, cok && uok
}

// idleFor is how long neither a pump nor the kernel has moved a byte, as
// far as the last sample knows, quiet having passed since the pumps last
// did. Called with r.mu held.
func (r *relay) idleFor(quiet time.Duration) time.Duration {
	return min(quiet, now().Sub(r.wireActive))
}

// socketUnder finds the TCP socket under c's TLS, matcher buffer or PROXY
// protocol wrapper, for its kernel counts; nil if there is none.
func socketUnder(c net.Conn) *net.TCPConn {
	for range 5 {
		switch v := c.(type) {
		case *net.TCPConn:
			return v
		case *tls.Conn:
			c = v.NetConn()
		case *swapConn:
			c = v.Conn
		case *layer4.Connection:
			c = v.Conn
		case interface{ Raw() net.Conn }:
			c = v.Raw()
		default:
			return nil
		}
	}
	return nil
}

func (r *relay) canPark() bool {
	return park.Supported && r.clientRaw != nil && r.upstreamRaw != nil
}

// socket is the socket d reads from, for the parker. Called with r.mu held.
func (r *relay) socket(d *direction) *net.TCPConn {
	if d.toUpstream {
		return r.clientRaw
	}
	return r.upstreamRaw
}

// swapConn is the connection under a TLS session that the handler
// terminated itself: a relay that parks puts a duplicate of the socket in
// it, so that caddy-l4 may close the accepted one (see relay.park).
type swapConn struct{ net.Conn }

// clientSocket finds the client's socket under c, and the swapConn above it
// when c is TLS. Bytes a matcher prefetched and nobody read yet would be
// lost with the socket swapped: then there is none.
func clientSocket(c net.Conn) (*net.TCPConn, *swapConn) {
	switch c := c.(type) {
	case *net.TCPConn:
		return c, nil
	case *tls.Conn:
		sw, ok := c.NetConn().(*swapConn)
		if !ok {
			return nil, nil
		}
		under := sw.Conn
		if g, ok := under.(*inputGuard); ok { // min_input_rate's, off since the handshake
			under = g.Conn
		}
		if cx, ok := under.(*layer4.Connection); ok {
			if len(cx.MatchingBytes()) > 0 {
				return nil, nil
			}
			under = cx.Conn
		}
		if tcp, ok := under.(*net.TCPConn); ok {
			return tcp, sw
		}
	}
	return nil, nil
}

// upstreamSocket finds the upstream's socket under c (plain or TLS).
func upstreamSocket(c net.Conn) *net.TCPConn {
	switch c := c.(type) {
	case *net.TCPConn:
		return c
	case *tls.Conn:
		tcp, _ := c.NetConn().(*net.TCPConn)
		return tcp
	}
	return nil
}

// ends returns d's source and destination. Called with r.mu held.
func (r *relay) ends(d *direction) (src, dst net.Conn) {
	if d.toUpstream {
		return r.client, r.upstream
	}
	return r.upstream, r.client
}

func (r *relay) other(d *direction) *direction {
	if d.toUpstream {
		return &r.down
	}
	return &r.up
}

// nextCheck says when check should run next, quiet having passed since a
// pump last moved a byte and idle since any byte moved. With kernel counts
// it samples them every quarter of proxy_timeout: a session then ends
// between 1 and 1.25 proxy_timeouts after its last byte. Called with r.mu
// held.
func (r *relay) nextCheck(quiet, idle time.Duration) time.Duration {
	next := r.idle - idle
	if r.wireOK {
		next = min(next, r.idle/4)
	}
	if r.canPark() && r.running > 0 {
		if after := parkAfter.get(); quiet < after {
			next = min(next, after-quiet)
		} else {
			next = min(next, after)
		}
	}
	return max(next, time.Millisecond)
}

// check runs on the relay's timer: it ends the session after proxy_timeout
// without a byte either way (a stuck writer included) and asks running
// pumps of a quiet plain relay to park.
func (r *relay) check() {
	r.mu.Lock()
	if r.ended {
		r.mu.Unlock()
		return
	}
	quiet := r.quietFor()
	if r.wireOK {
		total, ok := r.wireProgress()
		switch {
		case !ok:
			r.wireOK = false // no kernel counts here: proxy_timeout counts the pumps' bytes only
		case r.wireSeen >= 0 && total != r.wireSeen:
			r.wireActive = now()
		}
		r.wireSeen = total
	}
	idle := r.idleFor(quiet)
	if idle >= r.idle {
		r.mu.Unlock()
		r.end("idle_timeout")
		return
	}
	if r.canPark() && quiet >= parkAfter.get() {
		for _, d := range []*direction{&r.up, &r.down} {
			if d.state == pumpRunning {
				src, _ := r.ends(d)
				_ = src.SetReadDeadline(aLongTimeAgo) // the pump parks when its read returns
			}
		}
	}
	r.timer.Reset(r.nextCheck(quiet, idle))
	r.mu.Unlock()
}

// aLongTimeAgo is a read deadline that wakes a blocked read at once.
var aLongTimeAgo = time.Unix(1, 0)

// pump moves d's bytes until its source ends, the session ends or d parks.
// It reports whether the handler's goroutine may return: the relay took
// over the client connection.
func (r *relay) pump(d *direction) (detached bool) {
	r.mu.Lock()
	src, dst := r.ends(d)
	r.mu.Unlock()
	srcTCP, _ := src.(*net.TCPConn)
	dstTCP, _ := dst.(*net.TCPConn)
	size := spliceHead
	if !r.splice {
		size = copyHead
	}
	head := make([]byte, size) // on the heap: on the stack it would double the goroutine's stack
	var burst *[]byte          // a pooled buffer while a copy streams
	defer func() {
		if burst != nil {
			relayBuffers.Put(burst)
		}
	}()
	for {
		var n int64
		var err error
		eof := false
		if r.splice {
			n, err = spliceStep(dstTCP, srcTCP, head, r.s.h.proc.slots)
			if err == io.EOF {
				eof, err = true, nil
			}
		} else {
			buf := head
			if burst != nil {
				buf = *burst
			}
			n, err = copyStep(dst, src, buf)
			if err == io.EOF {
				eof, err = true, nil
			}
			switch {
			case burst == nil && n == int64(len(head)):
				burst = relayBuffers.Get().(*[]byte) // more is coming
			case burst != nil && n < int64(len(head)):
				relayBuffers.Put(burst) // a short read: the burst ended
				burst = nil
			}
		}
		if n > 0 {
			d.moved.Add(n)
			r.touch()
		}
		var ne net.Error
		var we writeError
		switch {
		case eof:
			r.directionDone(d, nil)
			return false
		case err == nil:
			continue
		case !errors.As(err, &we) && errors.As(err, &ne) && ne.Timeout(): // check asked this pump to park
			if parked, detached := r.park(d); parked {
				return detached
			}
		default:
			r.directionDone(d, err)
			return false
		}
	}
}

// park puts d to sleep in the parker if the relay is still quiet, and
// reports whether it did. The handler's direction parks only when the other
// one is not running, and then detaches: the client socket is duplicated so
// that caddy-l4 may close its copy when the handler returns.
func (r *relay) park(d *direction) (parked, detached bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	src, _ := r.ends(d)
	if r.ended || !r.canPark() || r.quietFor() < parkAfter.get() {
		_ = src.SetReadDeadline(time.Time{})
		return false, false
	}
	if d.toUpstream && !r.detached {
		if r.down.state == pumpRunning {
			_ = src.SetReadDeadline(time.Time{}) // the other direction asks again when it parks
			return false, false
		}
		dup, err := sockopt.Duplicate(r.clientRaw)
		if err != nil {
			r.s.debug("relay keeps its goroutines", zap.Error(err))
			_ = src.SetReadDeadline(time.Time{})
			return false, false
		}
		if r.clientSwap != nil {
			r.clientSwap.Conn = dup // the TLS session goes on over the duplicate
		} else {
			r.client, src = dup, dup
		}
		r.clientRaw, r.clientWire = dup, dup
		r.s.shared.mu.Lock()
		r.s.raw = dup
		r.s.shared.mu.Unlock()
		r.s.cx = nil
		r.detached, detached = true, true
		r.s.debug("relay parked") // once: the handler's goroutine returns
	}
	_ = src.SetReadDeadline(time.Time{})
	if err := parker.Park(r.socket(d), d, &d.slot); err != nil {
		r.s.debug("relay keeps its goroutines", zap.Error(err))
		if detached {
			go r.pump(d) // the handler is leaving: another goroutine goes on
			return true, true
		}
		return false, false
	}
	d.state = pumpParked
	r.running--
	r.countParked()
	if !d.toUpstream && !r.detached && r.up.state == pumpRunning {
		// The handler's direction was told to park while this one ran.
		_ = r.client.SetReadDeadline(aLongTimeAgo)
	}
	return true, detached
}

// countParked keeps the parked_sessions gauge: a session is parked while it
// has not ended, no pump runs and a direction waits in the parker. Called
// with r.mu held after each change of those.
func (r *relay) countParked() {
	parked := !r.ended && r.running == 0 && (r.up.state == pumpParked || r.down.state == pumpParked)
	if parked == r.counted {
		return
	}
	r.counted = parked
	if parked {
		r.s.h.proc.metrics.parked(1)
	} else {
		r.s.h.proc.metrics.parked(-1)
	}
}

// wake runs a parked direction whose source has data or hung up.
func (r *relay) wake(d *direction) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended || d.state != pumpParked {
		return
	}
	d.state = pumpRunning
	r.running++
	r.countParked()
	if r.running == 1 {
		quiet := r.quietFor()
		r.timer.Reset(r.nextCheck(quiet, r.idleFor(quiet))) // it was set for proxy_timeout
	}
	go r.pump(d)
}

// directionDone ends d: at the client's EOF the upstream gets a half-close
// and may still answer; the upstream's EOF ends the session once all it
// sent is written to the client (POP3 has nothing more to relay after it);
// an error ends the session, labelled with the side that failed: a write
// fails on d's destination, anything else on its source.
func (r *relay) directionDone(d *direction, err error) {
	r.mu.Lock()
	d.state = pumpDone
	r.running--
	r.countParked()
	upstream, ended := r.upstream, r.ended
	r.mu.Unlock()
	var we writeError
	clientFailed := d.toUpstream != errors.As(err, &we)
	switch {
	case ended: // the error is the relay closing the connections
		r.settle()
	case d.toUpstream && err == nil:
		closeWrite(upstream) // let the upstream answer and close
		r.settle()
	case err == nil:
		r.end("ok") // closing sends the client its FIN after the queued bytes: no shutdown(2) first
	case clientFailed:
		r.s.debug("relay: client connection failed", zap.Bool("to_upstream", d.toUpstream), zap.Error(err))
		r.end("client_error")
	default:
		r.s.debug("relay: upstream connection failed", zap.Bool("to_upstream", d.toUpstream), zap.Error(err))
		r.end("upstream_error")
	}
}

// writeError marks a relay step's error as its destination's.
type writeError struct{ error }

func (e writeError) Unwrap() error { return e.error }

// end closes both connections once; the first reason wins.
func (r *relay) end(result string) {
	r.mu.Lock()
	if r.ended {
		r.mu.Unlock()
		r.settle() // the caller may have been the last pump
		return
	}
	r.ended, r.result = true, result
	r.countParked()
	for _, d := range []*direction{&r.up, &r.down} {
		if d.state == pumpParked {
			parker.Forget(&d.slot)
			d.state = pumpDone
		}
	}
	client, upstream := r.client, r.upstream
	r.mu.Unlock()
	if result != "ok" {
		// A session cut off sends no close_notify: tls.Conn.Close would
		// wait up to 5 s to write it to a peer that reads nothing, holding
		// up a kick or the timer.
		closeUnderTLS(upstream)
		closeUnderTLS(client)
		_ = upstream.Close()
		_ = client.Close()
	} else {
		_ = upstream.Close()
		closeNotifyWithin(client, client.Close) // after the upstream's last bytes
	}
	r.settle()
}

// closeUnderTLS closes the connection under c if c is TLS.
func closeUnderTLS(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		_ = tc.NetConn().Close()
	}
}

// closeNotifyWithin runs end, which sends c's close_notify if c is TLS,
// for at most closeNotifyTime: tls.Conn gives that write 5 s of its own,
// and a peer that reads nothing would hold the session's end up for them.
// Then the socket closes under the TLS session.
func closeNotifyWithin(c net.Conn, end func() error) {
	if _, ok := c.(*tls.Conn); !ok {
		_ = end()
		return
	}
	bound := time.AfterFunc(closeNotifyTime, func() { closeUnderTLS(c) })
	_ = end()
	bound.Stop()
}

const closeNotifyTime = time.Second

// settle finishes the session once it has ended and no pump runs: the
// handler does it unless the relay detached, in which case this goroutine
// writes the session line.
func (r *relay) settle() {
	r.mu.Lock()
	if !r.ended || r.running > 0 || r.quiet == nil {
		r.mu.Unlock()
		return
	}
	quiet, detached := r.quiet, r.detached
	r.quiet = nil
	r.mu.Unlock()
	if !detached {
		close(quiet)
		return
	}
	r.timer.Stop()
	r.s.result = r.result
	r.s.logEnd()
}

// spliceHead is how much a relay step reads before it splices the rest:
// enough for a command or a short reply.
const spliceHead = 256

// spliceStep moves what src has now: a short message by read and write (as
// NGINX does), more by splice(2) of exactly what is queued. Waiting happens
// in the read, which holds neither a pipe nor a pooled buffer, so an idle
// session keeps two descriptors and no buffers.
func spliceStep(dst, src *net.TCPConn, head []byte, slots *slotCounter) (int64, error) {
	m, err := src.Read(head)
	if m > 0 {
		if _, werr := dst.Write(head[:m]); werr != nil {
			return int64(m), writeError{werr}
		}
	}
	if err != nil || m < len(head) {
		return int64(m), err
	}
	queued := sockopt.QueuedBytes(src)
	if queued == 0 {
		return int64(m), nil
	}
	burst := &io.LimitedReader{R: src, N: min(queued, relayChunk)}
	var k int64
	if slots.takePipe() {
		k, err = dst.ReadFrom(burst)
		slots.releasePipe()
	} else {
		// No descriptors left for a pipe (see slotCounter): copy.
		k, err = copyWithoutSplice(dst, burst)
	}
	// splice's error does not say which socket failed: the one that is
	// gone did. The bytes were queued, so the destination is likelier; a
	// timeout is check's read deadline on the source.
	var ne net.Error
	if err != nil && !(errors.As(err, &ne) && ne.Timeout()) && !(sockopt.SocketFailed(src) && !sockopt.SocketFailed(dst)) {
		err = writeError{err}
	}
	return int64(m) + k, err
}

// copyWithoutSplice copies through a pooled buffer; hiding dst's ReadFrom
// keeps io.CopyBuffer from splicing.
func copyWithoutSplice(dst *net.TCPConn, src io.Reader) (int64, error) {
	buf := relayBuffers.Get().(*[]byte)
	defer relayBuffers.Put(buf)
	return io.CopyBuffer(struct{ io.Writer }{dst}, src, *buf)
}

// copyStep moves one read's worth through buf, so that every step counts
// as activity for proxy_timeout.
func copyStep(dst, src net.Conn, buf []byte) (int64, error) {
	m, err := src.Read(buf)
	if m > 0 {
		if _, werr := dst.Write(buf[:m]); werr != nil {
			return int64(m), writeError{werr}
		}
	}
	return int64(m), err
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

var _ park.Waker = (*direction)(nil)
