package pop3

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
)

type state int

const (
	stateAuthorization state = iota // greeting sent: CAPA, STLS, USER/PASS, AUTH, QUIT
	stateRelay                      // upstream accepted the login: bytes flow both ways
	stateDone                       // QUIT, fatal reply or too many errors
)

// now is replaceable in tests.
var now = time.Now

// session is one client connection.
type session struct {
	h  *Handler
	cx *layer4.Connection // the client; wrapped in TLS after STLS or the implicit_tls handshake
	r  *pop3wire.Reader
	w  *bufio.Writer

	state     state
	secure    bool   // TLS: STLS, implicit_tls or the route's tls handler
	errors    int    // -ERR replies so far, towards max_errors
	user      string // from USER, waiting for PASS
	timestamp string // APOP greeting timestamp, when apop is enabled

	start      time.Time
	result     string // how the session ended, for the session log line
	loginUser  string // user name once logged in
	method     string
	early      *upstreamClient // dialled at accept to relay its APOP timestamp and CRAM-MD5 challenge
	upstream   *upstreamClient // logged in
	attempts   int             // login attempts, for auth_http's Auth-Login-Attempt
	failedUser string          // of the last refused login, for the penalty
	loginTook  time.Duration   // from the credentials to the upstream's +OK
	id         string          // in every log line and in -ERR replies with a code
	remote     string          // client address
	raw        net.Conn        // the accepted connection under any TLS; a duplicate once detached
	detached   bool            // the relay took over the connection and writes the session line
	shared     shared          // what the admin API reads and kick changes

	// ctx ends when the session is kicked or drained, or at login_timeout:
	// auth_http requests, WAIT retries, the failure delay, upstream dials,
	// logins and TLS handshakes stop with it. cx.Context is never cancelled.
	ctx            context.Context
	cancel         context.CancelFunc
	stopEarlyWatch func() bool // undoes closeOnKick of early at login

	// upstreamUser is whose mailbox the upstream opened: loginUser, the
	// AUTH PLAIN authzid (without auth_http), or the auth server's Auth-User.
	upstreamUser string

	notReading bool // the last words found the client not reading: no close_notify either

	edge *edgeState // the limits that apply to the session; nil: none
}

// newReader reads the client's commands from s.cx, through the input
// guard of min_input_rate if there is one.
func (s *session) newReader() *pop3wire.Reader {
	if s.edge != nil && s.edge.guard != nil {
		s.edge.guard.Conn = s.cx
		return pop3wire.NewReader(s.edge.guard, s.h.MaxLineLength)
	}
	return pop3wire.NewReader(s.cx, s.h.MaxLineLength)
}

func newSession(h *Handler, cx *layer4.Connection, id string, edge *edgeState) *session {
	remote := cx.RemoteAddr().String()
	s := &session{
		h:      h,
		cx:     cx,
		edge:   edge,
		w:      pop3wire.NewWriter(cx),
		start:  now(),
		secure: len(l4tls.GetConnectionStates(cx)) > 0,
		id:     id,
		remote: remote,
		raw:    cx.Conn,
	}
	s.shared.tls = s.secure
	s.r = s.newReader()
	// Not from cx.Context: its replacer holds the whole connection, which a
	// parked session, whose handler has returned, must not keep alive.
	s.ctx, s.cancel = context.WithDeadline(context.Background(), s.loginDeadline())
	return s
}

// loginDeadline is when a session that has not logged in is closed,
// however busy it keeps itself with NOOP or CAPA.
func (s *session) loginDeadline() time.Time {
	if s.h.LoginTimeout <= 0 { // a Handler that was not provisioned
		return s.start.Add(defaultLoginTimeout)
	}
	return s.start.Add(time.Duration(s.h.LoginTimeout))
}

// ioDeadline bounds the next read or write before login: timeout, but no
// later than login_timeout.
func (s *session) ioDeadline() time.Time {
	d := now().Add(time.Duration(s.h.Timeout))
	if end := s.loginDeadline(); end.Before(d) {
		return end
	}
	return d
}

// setDeadline sets both deadlines of the client connection and reports
// false if the session was kicked: kick stores its reason before it moves
// the deadlines, so a kick that this call undid is seen here.
func (s *session) setDeadline(t time.Time) bool {
	_ = s.cx.SetDeadline(t)
	if s.edge != nil && s.edge.guard != nil {
		s.edge.guard.deadline = t
	}
	_, kicked := s.kicked()
	return !kicked
}

// ended reports why the session's context ended, or is about to: at
// login_timeout a connection's deadline may wake a wait before the
// context's own timer has fired.
func (s *session) ended() error {
	if err := s.ctx.Err(); err != nil {
		return err
	}
	if s.state == stateAuthorization && !now().Before(s.loginDeadline()) {
		return context.DeadlineExceeded
	}
	return nil
}

// closeOnKick closes c when the session's context ends, which a blocked
// read on c would not notice; stop undoes it.
func (s *session) closeOnKick(c net.Conn) (stop func() bool) {
	return context.AfterFunc(s.ctx, func() { _ = c.Close() })
}

func (s *session) run() error {
	s.h.proc.sessions.add(s)
	s.h.proc.metrics.sessionStarted()
	s.startEdge()
	defer func() {
		if !s.detached { // else the relay ends the session
			s.closeNotify()
			s.logEnd()
		}
	}()
	if s.h.drained != nil && s.h.drained.Load() {
		// Accepted by a replaced config after its drain ran: drain sets the
		// flag before it looks for sessions, so one of the two sees this one.
		s.kick(drainReason)
	}
	if _, kicked := s.kicked(); kicked {
		return s.ioError(net.ErrClosed)
	}
	if s.h.ImplicitTLS && !s.startImplicitTLS() {
		return nil
	}
	if err := s.greet(); err != nil {
		return s.ioError(err)
	}
	for s.state == stateAuthorization {
		// Both directions: a client that sends commands and never reads
		// its replies must not hold the session once the write blocks.
		if !s.setDeadline(s.ioDeadline()) {
			return s.ioError(net.ErrClosed)
		}
		if !s.r.HasLine() {
			if err := s.w.Flush(); err != nil {
				return s.ioError(err)
			}
			if s.edge != nil && s.edge.guard != nil {
				s.edge.guard.waiting()
			}
		}
		line, err := s.r.ReadLine()
		if errors.Is(err, pop3wire.ErrLineTooLong) {
			err = s.reply(errLineTooLong)
		} else if err == nil {
			err = s.dispatch(line)
			if cerr := s.ended(); cerr != nil && s.state == stateAuthorization {
				// Kicked or out of time while the command waited: its own
				// reply (say, auth server unavailable) would mislead.
				return s.ioError(cerr)
			}
			if !isConnError(err) {
				err = s.reply(err)
			}
		}
		if err != nil {
			return s.ioError(err)
		}
	}
	if s.state == stateRelay {
		if s.edge != nil && s.edge.guard != nil {
			s.edge.guard.off = true
		}
		if s.stopEarlyWatch != nil {
			s.stopEarlyWatch() // early is the upstream now
		}
		s.cancel() // logged in: the relay ends itself, kick reaches it there
	}
	// The last replies get their own time: the command may have used up
	// the deadline set before it.
	if !s.setDeadline(now().Add(time.Duration(s.h.Timeout))) {
		return s.ioError(net.ErrClosed)
	}
	if err := s.w.Flush(); err != nil {
		return s.ioError(err)
	}
	if s.state == stateRelay {
		return s.relay()
	}
	return nil
}

// greet sends the greeting. When challenges are relayed it first connects
// to the upstream, whose APOP timestamp the client must sign; an upstream
// that cannot be reached gets the client a -ERR greeting (RFC 1939 §4 allows
// it) instead of a login that cannot work.
func (s *session) greet() error {
	text := s.h.Greeting
	if s.h.relayChallenges {
		up, err := s.h.pool.connect(s.ctx, s.poolRequest(""), s.dialClient(), s.ioDeadline())
		if err != nil {
			if err := s.ended(); err != nil {
				return err // kicked while it dialled
			}
			s.log(zap.WarnLevel, "upstream unavailable", zap.Error(err))
			s.state, s.result = stateDone, "upstream_unavailable"
			return s.writeLine(errUnavailable.line() + s.idSuffix())
		}
		up.setDeadline(time.Time{})
		s.early = up
		s.stopEarlyWatch = s.closeOnKick(up.conn) // its reads before login
		if s.h.hasAuth(AuthAPOP) {
			s.timestamp = up.timestamp
		}
	} else if s.h.hasAuth(AuthAPOP) && s.h.digestsCheckable(AuthAPOP) {
		s.timestamp = newAPOPTimestamp()
	}
	if s.timestamp != "" {
		text += " " + s.timestamp
	}
	return s.writeLine("+OK " + text)
}

// closeNotify ends the client's TLS session with a close_notify alert (RFC
// 8446 §6.1) before the connection closes: OpenSSL 3 clients report a
// close without one as an error. The relay sends it itself when the
// upstream ends first; a second one is never sent. A client that reads
// nothing gets a second for it (closeNotifyWithin).
func (s *session) closeNotify() {
	tc, ok := s.cx.Conn.(*tls.Conn)
	if !ok {
		return
	}
	if s.notReading {
		closeUnderTLS(tc)
		return
	}
	closeNotifyWithin(tc, tc.CloseWrite)
}

// tlsState returns the client connection's TLS state, nil if plaintext.
func (s *session) tlsState() *tls.ConnectionState {
	if states := l4tls.GetConnectionStates(s.cx); len(states) > 0 {
		return states[len(states)-1]
	}
	return nil
}

// newAPOPTimestamp returns an RFC 1939 §7 msg-id style timestamp that no
// other session will share.
func newAPOPTimestamp() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("<%s.%d@%s>", hex.EncodeToString(b[:]), now().UnixNano(), hostname)
}

var hostname = func() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "localhost"
	}
	return h
}()

// dispatch runs one command and returns nil or the -ERR to send.
func (s *session) dispatch(line []byte) error {
	// max_command_length counts the line end as CRLF, as RFC 2449 §4 does.
	// An AUTH line may carry a long initial response (RFC 5034 §4).
	if len(line)+len("\r\n") > s.h.MaxCommandLength && !pop3wire.HasKeyword(line, "AUTH") {
		s.debug("command line too long")
		return errLineTooLong
	}
	cmd, err := pop3wire.ParseCommand(line)
	if err != nil {
		s.debug("malformed command")
		return errUnknownCommand
	}
	switch cmd.Name {
	case "CAPA", "STLS", "USER", "PASS", "AUTH", "APOP", "NOOP", "QUIT":
		s.debug("command", zap.String("verb", cmd.Name))
	default:
		// A short password typed at the wrong prompt parses as a verb.
		s.debug("unknown command")
	}
	switch cmd.Name {
	case "CAPA":
		return s.handleCapa()
	case "STLS":
		return s.handleStartTLS()
	case "USER":
		return s.handleUser(cmd)
	case "PASS":
		return s.handlePass(cmd)
	case "AUTH":
		return s.handleAuth(cmd)
	case "APOP":
		return s.handleAPOP(cmd)
	case "NOOP":
		return s.writeLine("+OK")
	case "QUIT":
		return s.handleQuit()
	}
	return errUnknownCommand
}

func (s *session) handleQuit() error {
	s.state, s.result = stateDone, "quit"
	return s.writeLine("+OK Logging out")
}

func (s *session) writeLine(line string) error {
	if _, err := s.w.WriteString(line); err != nil {
		return err
	}
	_, err := s.w.WriteString("\r\n")
	return err
}

func (s *session) idSuffix() string { return " (session " + s.id + ")" }

// ioError ends the session on a connection error. Client EOF, resets and
// timeouts are ordinary ends: logged at debug, nil for caddy-l4.
func (s *session) ioError(err error) error {
	var ne net.Error
	if reason, ok := s.kicked(); ok {
		s.setResult(s.kickResult())
		s.lastWords(errKicked(reason))
		s.log(zap.InfoLevel, "session closed", zap.String("reason", reason))
		return nil
	}
	switch {
	case errors.Is(err, errInputTooSlow):
		s.setResult("too_slow")
		s.h.limitReached(s, limitMinInputRate)
		s.lastWords(errTooSlow)
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrUnexpectedEOF):
		s.setResult("client_closed")
	case s.state == stateAuthorization && !now().Before(s.loginDeadline()) &&
		(errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()):
		s.setResult("login_timeout")
		s.lastWords(errLoginTimeout(time.Duration(s.h.LoginTimeout)))
	case errors.As(err, &ne) && ne.Timeout():
		s.setResult("timeout")
		s.lastWords(errInactive)
	default:
		s.setResult("client_error")
	}
	s.debug("session ended", zap.Error(err))
	return nil
}

func (s *session) setResult(r string) {
	if s.result == "" {
		s.result = r
	}
}

func (s *session) debug(msg string, fields ...zap.Field) {
	s.log(zap.DebugLevel, msg, fields...)
}

// log writes a line with the session's id and client address. They are
// added per line: a Logger.With clone would hold an encoder buffer for the
// whole session, parked ones included.
func (s *session) log(level zapcore.Level, msg string, fields ...zap.Field) {
	if ce := s.h.logger.Check(level, msg); ce != nil {
		ce.Write(append([]zap.Field{zap.String("session", s.id), zap.String("remote", s.remote)}, fields...)...)
	}
}

// releaseBuffers returns the client's line buffers to their pools.
func (s *session) releaseBuffers() {
	s.r.Release()
	pop3wire.ReleaseWriter(s.w)
	s.r, s.w = nil, nil
}

// logEnd writes the one INFO line per session.
func (s *session) logEnd() {
	s.cancel()
	s.releaseBuffers()
	s.h.proc.sessions.remove(s)
	s.h.proc.slots.release()
	s.edge.release()
	if s.upstream != nil {
		s.upstream.close()
	}
	s.dropEarly()
	s.setResult("closed")
	if ce := s.h.logger.Check(zap.InfoLevel, "session"); ce != nil {
		// One slice of the final size: this line is written for every session.
		fields := make([]zap.Field, 0, 12)
		fields = append(fields,
			zap.String("session", s.id),
			zap.String("remote", s.remote),
			zap.String("result", s.result),
			zap.Bool("tls", s.secure),
			zap.Int64("bytes_from_client", s.shared.fromClient.Load()),
			zap.Int64("bytes_to_client", s.shared.toClient.Load()),
			zap.Duration("duration", now().Sub(s.start)),
		)
		if s.loginUser != "" {
			fields = append(fields, zap.String("user", s.loginUser), zap.String("upstream_user", s.upstreamUser),
				zap.String("method", s.method), zap.Duration("login_duration", s.loginTook))
		}
		if s.upstream != nil {
			fields = append(fields, zap.String("upstream", s.upstream.address))
		}
		ce.Write(fields...)
	}
	s.h.proc.metrics.sessionEnded(s.result, s.shared.fromClient.Load(), s.shared.toClient.Load())
}

// sessionRegistry is every open session of every pop3 handler, for the
// admin API and for draining a replaced config.
type sessionRegistry struct {
	mu sync.Mutex
	m  map[string]*session
	// dirty holds, while the pop3 app registers the sessions in Redis, the
	// sessions that started or changed (nil: ended) since its last look:
	// the login only notes that here, and the app's loop writes them.
	dirty map[string]*session // nil: not tracking
}

func (r *sessionRegistry) add(s *session) {
	r.mu.Lock()
	r.m[s.id] = s
	if r.dirty != nil {
		r.dirty[s.id] = s
	}
	r.mu.Unlock()
}

func (r *sessionRegistry) remove(s *session) {
	r.mu.Lock()
	delete(r.m, s.id)
	if r.dirty != nil {
		r.dirty[s.id] = nil
	}
	r.mu.Unlock()
}

// changed notes that what the cluster's session list shows of s (user,
// upstream, state, TLS) changed.
func (r *sessionRegistry) changed(s *session) {
	r.mu.Lock()
	if r.dirty != nil && r.m[s.id] == s {
		r.dirty[s.id] = s
	}
	r.mu.Unlock()
}

// track starts (on) or stops noting changes for takeChanges.
func (r *sessionRegistry) track(on bool) {
	r.mu.Lock()
	switch {
	case on && r.dirty == nil:
		r.dirty = make(map[string]*session)
	case !on:
		r.dirty = nil
	}
	r.mu.Unlock()
}

// takeChanges returns the sessions noted since the last call, by id (nil:
// ended), and starts a new set.
func (r *sessionRegistry) takeChanges() map[string]*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.dirty) == 0 {
		return nil
	}
	d := r.dirty
	r.dirty = make(map[string]*session)
	return d
}

// matching returns the sessions for which keep is true. keep runs after
// the lock is released: it may be slow (view asks the kernel for the
// socket's counts), and every session start and end waits for the lock.
func (r *sessionRegistry) matching(keep func(*session) bool) []*session {
	r.mu.Lock()
	all := make([]*session, 0, len(r.m))
	for _, s := range r.m {
		all = append(all, s)
	}
	r.mu.Unlock()
	out := all[:0]
	for _, s := range all {
		if keep(s) {
			out = append(out, s)
		}
	}
	return out
}

func newSessionID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// shared is the part of a session other goroutines may read or change.
type shared struct {
	mu           sync.Mutex
	user         string
	upstreamUser string // only when it differs from user
	upstream     string
	relaying     bool
	tls          bool

	fromClient atomic.Int64
	toClient   atomic.Int64
	// TCP_INFO counts of the client socket at login; wireOK says they exist.
	wireIn, wireOut int64
	wireOK          bool
	kickReason      atomic.Pointer[kickCause]
	relay           atomic.Pointer[relay] // set once relaying, for kick
}

// kick ends the session from another goroutine, whatever it waits for.
// Before login the session answers -ERR [SYS/TEMP] with reason and closes;
// after it both connections are closed.
func (s *session) kick(reason string) { s.kickFor(reason, "closed_by_admin") }

// kickCause is why a session was ended from outside: the reason the
// client reads, and the result of the session line.
type kickCause struct{ reason, result string }

// kickFor is kick with the session line's result.
func (s *session) kickFor(reason, result string) {
	if !s.shared.kickReason.CompareAndSwap(nil, &kickCause{reason, result}) {
		return
	}
	if r := s.shared.relay.Load(); r != nil {
		r.end(result)
		return
	}
	// The deadlines wake a read, or a write that a client which stopped
	// reading holds up; the context ends auth_http, the failure delay,
	// upstream dials and logins and TLS handshakes. In this order: the
	// session's last -ERR moves the write deadline again.
	s.shared.mu.Lock()
	raw := s.raw
	s.shared.mu.Unlock()
	_ = raw.SetDeadline(aLongTimeAgo)
	s.cancel()
}

func (s *session) kicked() (string, bool) {
	if c := s.shared.kickReason.Load(); c != nil {
		return c.reason, true
	}
	return "", false
}

// kickResult is the session line's result of a kicked session.
func (s *session) kickResult() string {
	if c := s.shared.kickReason.Load(); c != nil {
		return c.result
	}
	return "closed_by_admin"
}
