package pop3

import (
	"bufio"
	"crypto/tls"
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
		metrics.startTLS("refused")
		s.logger.Warn("plaintext pipelined after STLS, closing")
		s.result = "stls_injection"
		return errSTLSPipelined
	}
	if err := s.writeLine("+OK Begin TLS negotiation"); err != nil {
		return err
	}
	if err := s.w.Flush(); err != nil {
		return err
	}
	_ = s.cx.SetDeadline(now().Add(time.Duration(s.h.Timeout)))
	tc := tls.Server(s.cx, s.h.tlsConfig) // cx, not cx.Conn: it may hold prefetched bytes
	if err := tc.HandshakeContext(s.cx.Context); err != nil {
		metrics.startTLS("failed")
		s.debug("STLS handshake failed", zap.Error(err))
		s.state, s.result = stateDone, "tls_handshake_failed"
		return nil
	}
	_ = s.cx.SetDeadline(time.Time{})
	st := tc.ConnectionState()
	s.cx.SetVar(layer4.TLSConnectionStatesVarName, append(l4tls.GetConnectionStates(s.cx), &st))
	s.cx.Replacer().Set("l4.tls.server_name", st.ServerName) // as the tls handler does, for upstream placeholders

	metrics.startTLS("ok")
	s.shared.mu.Lock()
	s.shared.tls = true
	s.shared.mu.Unlock()

	// Forget everything from before TLS (RFC 2595 §4).
	s.cx = s.cx.Wrap(tc)
	s.r = pop3wire.NewReader(s.cx, s.h.MaxLineLength)
	s.w = bufio.NewWriterSize(s.cx, 1024)
	s.secure = true
	s.user = ""
	s.errors = 0
	return nil
}
