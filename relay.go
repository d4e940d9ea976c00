package pop3

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// relayChunk is how much one splice or copy call moves before the loop
// looks at deadlines again.
const relayChunk = 4 << 20

var relayBuffers = sync.Pool{New: func() any { b := make([]byte, 32*1024); return &b }}

var errIdle = errors.New("relay idle past proxy_timeout")

// relay copies bytes both ways until both sides are done. With plain TCP on
// both legs the kernel moves the bytes (splice(2) through TCPConn.ReadFrom);
// with TLS on either leg a pooled buffer does.
func (s *session) relay() error {
	up := s.upstream
	client := s.cx.Conn // the *layer4.Connection wrapper would hide ReadFrom
	if len(s.cx.MatchingBytes()) > 0 {
		client = s.cx // bytes prefetched by a matcher must be read first
	}

	// Commands the client pipelined after its login, and anything the
	// upstream sent after its +OK, must not be lost.
	s.shared.upConn.Store(&up.conn)
	if _, kicked := s.kicked(); kicked {
		s.result = "closed_by_admin"
		return nil
	}
	n, err := s.r.WriteBufferedTo(up.conn)
	s.shared.fromClient.Add(n)
	if err != nil {
		s.result = "upstream_error"
		return nil
	}
	n, err = up.r.WriteBufferedTo(client)
	s.shared.toClient.Add(n)
	if err != nil {
		return s.ioError(err)
	}
	s.r, up.r, s.w = nil, nil, nil // the relay needs no line buffers

	_, clientTCP := client.(*net.TCPConn)
	_, upstreamTCP := up.conn.(*net.TCPConn)
	s.debug("relay started", zap.Bool("splice", clientTCP && upstreamTCP))

	r := &relayState{idle: time.Duration(s.h.ProxyTimeout)}
	r.touch()
	// Client to upstream in a new goroutine, upstream to client in this one:
	// an idle logged-in session costs two goroutines.
	var upErr error
	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		upErr = r.copy(up.conn, client, &r.upstreamDone, &s.shared.fromClient)
		if upErr == nil && !r.upstreamDone.Load() {
			closeWrite(up.conn) // half-close: let the upstream answer and close
			return
		}
		_ = up.conn.SetReadDeadline(now())
	}()
	downErr := r.copy(client, up.conn, nil, &s.shared.toClient)
	r.upstreamDone.Store(true)
	if downErr == nil {
		closeWrite(client)
	}
	_ = client.SetReadDeadline(now()) // wake the other direction: nothing more can be delivered
	<-upDone

	if _, kicked := s.kicked(); kicked {
		s.result = "closed_by_admin"
		return nil
	}
	switch {
	case errors.Is(upErr, errIdle) || errors.Is(downErr, errIdle):
		s.result = "idle_timeout"
	case downErr != nil:
		s.result = "upstream_error"
		s.debug("relay from upstream", zap.Error(downErr))
	case upErr != nil:
		s.result = "client_error"
		s.debug("relay from client", zap.Error(upErr))
	default:
		s.result = "ok"
	}
	return nil
}

// relayState is shared by both directions of a relay.
type relayState struct {
	idle         time.Duration
	lastActive   atomic.Int64 // unix nanoseconds of the last byte moved either way
	upstreamDone atomic.Bool
}

func (r *relayState) touch() { r.lastActive.Store(now().UnixNano()) }

// copy moves src to dst until EOF (nil), an error, the relay going idle
// (errIdle) or stop turning true. Reads wake every quarter of the idle limit
// so that the session closes between 1 and 1.25 times proxy_timeout after
// the last byte moved either way, even while splice hides the traffic.
func (r *relayState) copy(dst, src net.Conn, stop *atomic.Bool, moved *atomic.Int64) error {
	check := max(r.idle/4, 10*time.Millisecond)
	dstTCP, dstOK := dst.(*net.TCPConn)
	srcTCP, srcOK := src.(*net.TCPConn)
	splice := dstOK && srcOK
	var buf *[]byte
	var head []byte // on the heap: on the stack it would double an idle session's stack
	if splice {
		head = make([]byte, spliceHead)
	} else {
		buf = relayBuffers.Get().(*[]byte)
		defer relayBuffers.Put(buf)
	}
	for {
		if stop != nil && stop.Load() {
			return nil
		}
		t := now()
		_ = src.SetReadDeadline(t.Add(check))
		_ = dst.SetWriteDeadline(t.Add(r.idle))
		var n int64
		var err error
		eof := false
		if splice {
			n, err = spliceStep(dstTCP, srcTCP, head)
			if err == io.EOF {
				eof, err = true, nil
			}
		} else {
			lr := &io.LimitedReader{R: src, N: relayChunk}
			n, err = io.CopyBuffer(writerOnly{dst}, lr, *buf)
			eof = err == nil && lr.N > 0
		}
		if n > 0 {
			moved.Add(n)
			r.touch()
		}
		var ne net.Error
		switch {
		case eof:
			return nil
		case err == nil:
			continue // a whole chunk moved
		case errors.As(err, &ne) && ne.Timeout() && !isWriteTimeout(err):
			if stop != nil && stop.Load() {
				return nil
			}
			if now().Sub(time.Unix(0, r.lastActive.Load())) >= r.idle {
				return errIdle
			}
		default:
			return err
		}
	}
}

// spliceHead is how much a relay step reads before it splices the rest:
// enough for a command or a short reply.
const spliceHead = 256

// spliceStep moves what src has now: a short message by read and write (as
// NGINX does), more by splice(2) of exactly what is queued. Waiting happens
// in the read, which holds neither a pipe nor a pooled buffer, so an idle
// session keeps two descriptors and no buffers.
func spliceStep(dst, src *net.TCPConn, head []byte) (int64, error) {
	m, err := src.Read(head)
	if m > 0 {
		if _, werr := dst.Write(head[:m]); werr != nil {
			return int64(m), werr
		}
	}
	if err != nil || m < len(head) {
		return int64(m), err
	}
	queued := queuedBytes(src)
	if queued == 0 {
		return int64(m), nil
	}
	k, err := dst.ReadFrom(&io.LimitedReader{R: src, N: min(queued, relayChunk)})
	return int64(m) + k, err
}

// isWriteTimeout tells a stuck writer (the peer stopped reading) from an
// idle reader.
func isWriteTimeout(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "write"
}

// writerOnly hides ReadFrom so io.CopyBuffer uses our pooled buffer.
type writerOnly struct{ io.Writer }

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}
