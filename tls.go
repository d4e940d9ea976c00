package pop3

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4tls"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
)

var (
	errAlreadyTLS    = &replyError{text: "Already using TLS"}
	errNoSTLS        = &replyError{text: "STLS not available"}
	errSTLSPipelined = &replyError{text: "Commands sent after STLS before the TLS handshake, closing", fatal: true}
)

// handleStartTLS upgrades the connection (RFC 2595 §4). Plaintext the client
// pipelined after STLS is never executed: it would run inside the TLS session
// as if the client had sent it there (STARTTLS command injection).
func (s *session) handleStartTLS() error {
	switch {
	case s.secure:
		return errAlreadyTLS
	case !s.canSTLS():
		return errNoSTLS
	case s.r.Buffered() > 0:
		s.h.proc.metrics.startTLS("refused")
		s.log(zap.WarnLevel, "plaintext pipelined after STLS, closing")
		s.result = "stls_injection"
		return errSTLSPipelined
	}
	if err := s.writeLine("+OK Begin TLS negotiation"); err != nil {
		return err
	}
	if err := s.w.Flush(); err != nil {
		return err
	}
	if _, err := s.handshakeTLS(); err != nil {
		s.h.proc.metrics.startTLS("failed")
		s.debug("STLS handshake failed", zap.Error(err))
		s.state, s.result = stateDone, s.handshakeFailure(err)
		return nil
	}
	s.h.proc.metrics.startTLS("ok")
	// Forget everything from before TLS (RFC 2595 §4).
	s.user = ""
	s.errors = 0
	return nil
}

// startImplicitTLS runs the handshake that opens an implicit TLS session
// (POP3S, RFC 8314 §3) before the greeting. It reports whether the session
// goes on; a failed handshake ends it without a word, since the client
// cannot read plaintext.
func (s *session) startImplicitTLS() bool {
	if s.secure {
		// caddy-l4's tls handler ran first: a second handshake would wait
		// for a ClientHello that never comes.
		s.h.warnAlreadyTLS.Do(func() {
			s.h.logger.Warn("implicit_tls: the connection is already TLS (a tls handler runs before pop3 in the route); remove one of them")
		})
		s.debug("implicit_tls: connection already TLS, no handshake")
		return true
	}
	st, err := s.handshakeTLS()
	if err != nil {
		s.h.proc.metrics.implicitTLS("failed")
		s.debug("TLS handshake failed", zap.Error(err))
		s.state, s.result = stateDone, s.handshakeFailure(err)
		return false
	}
	if st.DidResume {
		s.h.proc.metrics.implicitTLS("resumed")
	} else {
		s.h.proc.metrics.implicitTLS("ok")
	}
	return true
}

// handshakeTLS runs the server side of a TLS handshake with the handler's
// one TLS config (so that session tickets work across connections), bounded
// by timeout, and swaps the session onto the TLS connection. Its state goes
// where caddy-l4's tls handler puts it, so TLS looks the same to the rest
// of the session (CAPA, EXTERNAL, Auth-SSL headers, placeholders) whichever
// way it came.
func (s *session) handshakeTLS() (*tls.ConnectionState, error) {
	if !s.setDeadline(s.ioDeadline()) {
		return nil, net.ErrClosed
	}
	sw := &swapConn{Conn: s.cx} // cx, not cx.Conn: it may hold prefetched bytes
	var handshakeGuard *inputGuard
	if s.edge != nil && s.edge.guard != nil {
		// min_input_rate holds for the handshake's bytes too; the guard of
		// the command reader counts the plaintext after it.
		g := s.edge.guard
		handshakeGuard = &inputGuard{Conn: s.cx, bytes: g.bytes, window: g.window, deadline: g.deadline}
		sw.Conn = handshakeGuard
	}
	tc := tls.Server(sw, s.h.tlsConfig)
	// The connection's own context carries its replacer, which SNI
	// matchers of the connection policy read; the session's ends it.
	hctx, stop := context.WithCancel(s.cx.Context)
	defer stop()
	defer context.AfterFunc(s.ctx, stop)()
	err := tc.HandshakeContext(hctx)
	if handshakeGuard != nil {
		handshakeGuard.off = true // not swapped out: the handshake's canceller may be closing it
	}
	if err != nil {
		return nil, err
	}
	_ = s.cx.SetDeadline(time.Time{})
	st := tc.ConnectionState()
	s.cx.SetVar(layer4.TLSConnectionStatesVarName, append(l4tls.GetConnectionStates(s.cx), &st))
	s.cx.Replacer().Set("l4.tls.server_name", st.ServerName) // as the tls handler does, for upstream placeholders

	s.shared.mu.Lock()
	s.shared.tls = true
	s.shared.mu.Unlock()
	s.h.proc.sessions.changed(s)
	s.cx = s.cx.Wrap(tc)
	s.releaseBuffers()
	s.r = s.newReader()
	s.w = pop3wire.NewWriter(s.cx)
	s.secure = true
	return &st, nil
}

// handshakeFailure is the session line's result of a failed handshake.
func (s *session) handshakeFailure(err error) string {
	if _, kicked := s.kicked(); kicked {
		return s.kickResult()
	}
	if errors.Is(err, errInputTooSlow) {
		s.h.limitReached(s, limitMinInputRate)
		return "too_slow"
	}
	return "tls_handshake_failed"
}
