package pop3

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

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

// handleAPOP checks the shape of "APOP name digest" (RFC 1939 §7); the digest
// is verified by the auth server or the upstream that issued the timestamp.
func (s *session) handleAPOP(cmd pop3wire.Command) error {
	switch {
	case !s.h.hasAuth(AuthAPOP):
		return errAPOPDisabled
	case !s.loginAllowed():
		return errPlaintextLogin
	case s.timestamp == "":
		return errAPOPDisabled // the upstream's greeting had no timestamp to relay
	}
	i := strings.LastIndexByte(cmd.Rest, ' ')
	if i <= 0 {
		return errSyntax
	}
	user, digest := cmd.Rest[:i], strings.ToLower(cmd.Rest[i+1:])
	if _, err := hex.DecodeString(digest); err != nil || len(digest) != 32 {
		return errSyntax
	}
	return s.login(loginRequest{method: AuthAPOP, creds: sasl.Credentials{Username: user, Password: digest}, salt: s.timestamp})
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
	var response []byte // nil: no initial response
	if len(args) == 2 {
		r, err := pop3wire.DecodeSASL(args[1])
		if err != nil {
			s.countBadExchange(mechanismMethod(name), errBadBase64)
			return errBadBase64
		}
		response = r
	}
	if name == "CRAM-MD5" && s.h.relayChallenges {
		return s.relayCRAMMD5(response)
	}

	var server sasl.Server
	var salt string
	method := AuthPlain
	switch name {
	case "PLAIN":
		server = sasl.NewPlain()
	case "LOGIN":
		server = sasl.NewLogin()
	case "CRAM-MD5":
		salt, method = newAPOPTimestamp(), AuthCRAMMD5
		server = sasl.NewCRAMMD5(salt)
	case "EXTERNAL":
		server, method = sasl.NewExternal(), AuthExternal
	case "OAUTHBEARER":
		server, method = sasl.NewOAuthBearer(), AuthOAuthBearer
	case "XOAUTH2":
		server, method = sasl.NewXOAuth2(), AuthXOAuth2
	default:
		return errNoMechanism
	}
	if _, err := s.saslExchange(server, response); err != nil {
		s.countBadExchange(method, err)
		return err
	}
	err := s.login(loginRequest{method: method, creds: server.Credentials(), salt: salt})
	if (method == AuthOAuthBearer || method == AuthXOAuth2) && isRefusal(err) {
		// RFC 7628 §3.2.2: a failure is an error challenge, which the client
		// answers with a dummy response before it gets the -ERR.
		if _, cerr := s.saslContinue(oauthErrorChallenge); isConnError(cerr) {
			return cerr
		}
	}
	return err
}

var oauthErrorChallenge = []byte(`{"status":"invalid_token"}`)

// saslExchange runs server to its end and returns the client's last
// response.
func (s *session) saslExchange(server sasl.Server, response []byte) ([]byte, error) {
	for {
		challenge, done, err := server.Next(response)
		if err != nil {
			return nil, errBadCredentials
		}
		if done {
			return response, nil
		}
		if response, err = s.saslContinue(challenge); err != nil {
			return nil, err
		}
	}
}

// mechanismMethod names the auth method a SASL mechanism belongs to.
func mechanismMethod(mechanism string) string {
	switch mechanism {
	case "CRAM-MD5":
		return AuthCRAMMD5
	case "EXTERNAL":
		return AuthExternal
	case "OAUTHBEARER":
		return AuthOAuthBearer
	case "XOAUTH2":
		return AuthXOAuth2
	}
	return AuthPlain
}

// relayCRAMMD5 passes the upstream's own CRAM-MD5 challenge to the client
// and the client's answer back, so the proxy never needs the password.
func (s *session) relayCRAMMD5(initial []byte) error {
	if initial != nil {
		return errSyntax // RFC 2195 has no initial response
	}
	up := s.early
	if up == nil {
		return s.loginFailed(loginRequest{method: AuthCRAMMD5}, "", errChallengeUpstreamLost)
	}
	started := now()
	up.setDeadline(s.ioDeadline())
	challenge, err := up.startSASL("CRAM-MD5")
	if isRejection(err) {
		// Refused before the client sent anything: no wrong password.
		s.log(zap.InfoLevel, "upstream refused AUTH CRAM-MD5", zap.String("upstream", up.address), zap.Error(err))
		s.h.proc.metrics.login(AuthCRAMMD5, "unavailable", -1)
		return errCRAMMD5Unavailable
	}
	if err != nil {
		return s.loginFailed(loginRequest{method: AuthCRAMMD5}, up.address, err)
	}
	server := sasl.NewCRAMMD5(string(challenge))
	response, err := s.saslExchange(server, nil)
	if err == nil && s.badUserName(server.Credentials().Username) {
		err = errBadCredentials // as login refuses it
	}
	if err != nil {
		s.countBadExchange(AuthCRAMMD5, err)
		if isConnError(err) {
			return err // the client is gone; the session ends and closes the upstream
		}
		// Cancel upstream too, so a retry starts clean there. Only its -ERR
		// leaves it usable: after anything else the session ends, since no
		// other upstream can check a digest made over its challenge.
		if _, cerr := up.finishSASL(nil, true); !isRejection(cerr) {
			s.dropEarly()
			if cerr == nil {
				cerr = fmt.Errorf("%w: +OK to a cancelled AUTH", errUpstreamProtocol)
			}
			return s.loginFailed(loginRequest{method: AuthCRAMMD5}, up.address, cerr)
		}
		return err
	}
	req := loginRequest{method: AuthCRAMMD5, creds: server.Credentials(), salt: string(challenge)}
	text, err := up.finishSASL(response, false)
	return s.loginDone(req, up, req.creds.Username, text, started, err)
}

// countBadExchange counts a SASL exchange that ended before a login could
// be tried: cancelled by the client, or malformed.
func (s *session) countBadExchange(method string, err error) {
	switch {
	case errors.Is(err, errAuthCancelled):
		s.h.proc.metrics.login(method, "cancelled", -1)
	case errors.Is(err, errBadCredentials), errors.Is(err, errBadBase64), errors.Is(err, errLineTooLong):
		s.h.proc.metrics.login(method, "invalid", -1)
	}
}

// saslContinue sends a challenge and reads the client's answer; "*" cancels.
func (s *session) saslContinue(challenge []byte) ([]byte, error) {
	if !s.setDeadline(s.ioDeadline()) {
		return nil, net.ErrClosed
	}
	if err := s.writeLine("+ " + pop3wire.EncodeSASL(challenge)); err != nil {
		return nil, err
	}
	if err := s.w.Flush(); err != nil {
		return nil, err
	}
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
