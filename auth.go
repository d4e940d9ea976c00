package pop3

import (
	"context"
	"errors"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

var (
	errNoUser         = &replyError{text: "No user name given, send USER first"}
	errUserDisabled   = &replyError{text: "USER/PASS is not enabled"}
	errAPOPDisabled   = &replyError{text: "APOP is not enabled"}
	errNoMechanism    = &replyError{text: "Unsupported authentication mechanism"}
	errAuthCancelled  = &replyError{code: codeAuth, text: "Authentication cancelled"}
	errBadBase64      = &replyError{code: codeAuth, text: "Invalid base64 data"}
	errBadCredentials = &replyError{code: codeAuth, text: "Invalid credentials syntax"}
)

// loginRequest is what the client proved or claimed.
type loginRequest struct {
	method string // plain, apop, cram-md5, external
	creds  sasl.Credentials
}

// loginTarget says which upstream to log in to and with which credentials.
type loginTarget struct {
	address string
	creds   sasl.Credentials
}

// authenticator turns a client's login into a loginTarget. A refusal is a
// *replyError; any other error means the decision could not be made.
type authenticator interface {
	authenticate(ctx context.Context, req loginRequest) (loginTarget, error)
}

// passThrough sends the client's own credentials to one fixed upstream
// (NGINX's proxy_pass).
type passThrough struct{ upstream string }

func (p passThrough) authenticate(_ context.Context, req loginRequest) (loginTarget, error) {
	return loginTarget{address: p.upstream, creds: req.creds}, nil
}

func (s *session) handleUser(cmd pop3wire.Command) error {
	switch {
	case !s.h.hasAuth(AuthPlain):
		return errUserDisabled
	case !s.loginAllowed():
		return errPlaintextLogin
	case cmd.Rest == "":
		return errSyntax
	}
	s.user = cmd.Rest
	return s.writeLine("+OK")
}

func (s *session) handlePass(cmd pop3wire.Command) error {
	switch {
	case !s.h.hasAuth(AuthPlain):
		return errUserDisabled
	case !s.loginAllowed():
		return errPlaintextLogin
	case s.user == "":
		return errNoUser
	case cmd.Rest == "":
		return errSyntax
	}
	user := s.user
	s.user = ""
	return s.login(loginRequest{method: AuthPlain, creds: sasl.Credentials{Username: user, Password: cmd.Rest}})
}

func (s *session) handleAPOP() error {
	if !s.h.hasAuth(AuthAPOP) {
		return errAPOPDisabled
	}
	if !s.loginAllowed() {
		return errPlaintextLogin
	}
	return errAPOPDisabled
}

// handleAuth runs a SASL exchange (RFC 5034).
func (s *session) handleAuth(cmd pop3wire.Command) error {
	args := cmd.Args()
	if len(args) == 0 {
		return s.listMechanisms()
	}
	if len(args) > 2 {
		return errSyntax
	}
	if !s.loginAllowed() {
		return errPlaintextLogin
	}
	name := strings.ToUpper(args[0])
	if !s.allowsMechanism(name) {
		return errNoMechanism
	}
	var server sasl.Server
	switch name {
	case "PLAIN":
		server = sasl.NewPlain()
	case "LOGIN":
		server = sasl.NewLogin()
	default:
		return errNoMechanism
	}
	var response []byte // nil: no initial response
	if len(args) == 2 {
		r, err := pop3wire.DecodeSASL(args[1])
		if err != nil {
			return errBadBase64
		}
		response = r
	}
	for {
		challenge, done, err := server.Next(response)
		if err != nil {
			return errBadCredentials
		}
		if done {
			break
		}
		if response, err = s.saslContinue(challenge); err != nil {
			return err
		}
	}
	return s.login(loginRequest{method: AuthPlain, creds: server.Credentials()})
}

// saslContinue sends a challenge and reads the client's answer; "*" cancels.
func (s *session) saslContinue(challenge []byte) ([]byte, error) {
	if err := s.writeLine("+ " + pop3wire.EncodeSASL(challenge)); err != nil {
		return nil, err
	}
	if err := s.w.Flush(); err != nil {
		return nil, err
	}
	_ = s.cx.SetReadDeadline(now().Add(time.Duration(s.h.Timeout)))
	line, err := s.r.ReadLine()
	switch {
	case errors.Is(err, pop3wire.ErrLineTooLong):
		return nil, errLineTooLong
	case err != nil:
		return nil, err
	case string(line) == "*":
		return nil, errAuthCancelled
	}
	r, err := pop3wire.DecodeSASL(string(line))
	if err != nil {
		return nil, errBadBase64
	}
	return r, nil
}

func (s *session) listMechanisms() error {
	if err := s.writeLine("+OK"); err != nil {
		return err
	}
	for _, m := range s.mechanisms() {
		if err := s.writeLine(m); err != nil {
			return err
		}
	}
	return s.writeLine(".")
}

// login asks the authenticator where to go, logs in upstream and, on
// success, switches the session to relaying.
func (s *session) login(req loginRequest) error {
	ctx := s.cx.Context
	started := now()
	target, err := s.h.authenticator.authenticate(ctx, req)
	if err != nil {
		return s.loginFailed(req, "", err)
	}
	deadline := started.Add(time.Duration(s.h.Timeout))
	up, greeting, err := s.h.loginUpstream(ctx, target, deadline)
	if err != nil {
		return s.loginFailed(req, target.address, err)
	}
	s.upstream = up
	s.loginUser, s.method = req.creds.Username, req.method
	s.state = stateRelay
	s.logger.Info("login",
		zap.String("user", req.creds.Username),
		zap.String("method", req.method),
		zap.String("upstream", target.address),
		zap.Duration("duration", now().Sub(started)))
	return s.writeLine("+OK " + greeting)
}

// loginFailed logs why a login failed and picks what the client sees: the
// upstream's text only with pass_error_message, its response code always.
func (s *session) loginFailed(req loginRequest, upstream string, err error) error {
	fields := []zap.Field{
		zap.String("user", req.creds.Username),
		zap.String("method", req.method),
		zap.String("upstream", upstream),
		zap.Error(err),
	}
	var rejected *upstreamRejection
	switch {
	case errors.As(err, &rejected):
		s.logger.Info("login failed", fields...)
		re := &replyError{code: rejected.code, text: errAuthFailed.text}
		if re.code == "" {
			re.code = codeAuth
		}
		if s.h.PassErrorMessage && rejected.text != "" {
			re.text = rejected.text
		}
		return re
	case errors.As(err, new(*replyError)):
		s.logger.Info("login refused", fields...)
		return err
	}
	s.logger.Warn("upstream unavailable", fields...)
	s.result = "upstream_unavailable"
	return errUnavailable
}
