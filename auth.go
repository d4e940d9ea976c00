package pop3

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
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
	if strings.HasPrefix(name, "SCRAM-") {
		return s.handleSCRAM(name, response)
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
			// The client sees errBadCredentials; the cause stays for the caller.
			return nil, fmt.Errorf("%w: %w", errBadCredentials, err)
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
	case "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS":
		return AuthSCRAMSHA256
	case "SCRAM-SHA-1":
		return AuthSCRAMSHA1
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

// errNoSCRAMSecret: the user exists, but what is stored (a bcrypt hash,
// say) cannot check a SCRAM proof. The client fails as with a wrong
// password and may log in with another mechanism.
var errNoSCRAMSecret = errors.New("no SCRAM secret for the user")

// scramSource is an authenticator that holds SCRAM secrets: the stored
// keys of a user, or keys derived from a clear password.
type scramSource interface {
	authenticator
	// scramKeys returns user's keys for the hash (SHA-1 or SHA-256), or
	// ErrUnknownUser.
	scramKeys(user string, h func() hash.Hash) (sasl.SCRAMKeys, error)
}

// handleSCRAM runs a SCRAM exchange (RFC 5802, 7677) against the keys of
// the first authenticator that knows the user; once the client's proof
// holds, that authenticator decides where the login goes. An unknown user
// goes through the whole exchange (fake keys) and fails like a wrong
// password.
func (s *session) handleSCRAM(name string, response []byte) error {
	method := mechanismMethod(name)
	newHash := sha256.New
	if method == AuthSCRAMSHA1 {
		newHash = sha1.New
	}
	var decider scramSource
	lookup := func(authcid, _ string) (sasl.SCRAMKeys, error) {
		for _, src := range s.h.scramSources {
			keys, err := src.scramKeys(authcid, newHash)
			if errors.Is(err, ErrUnknownUser) {
				continue
			}
			if err == nil {
				decider = src
			}
			return keys, err
		}
		return sasl.SCRAMKeys{}, ErrUnknownUser
	}
	var server *sasl.SCRAM
	switch name {
	case "SCRAM-SHA-256-PLUS":
		server = sasl.NewSCRAMSHA256Plus(lookup, s.channelBinding())
	case "SCRAM-SHA-256":
		server = sasl.NewSCRAMSHA256(lookup)
		if s.channelBinding() != nil {
			server = server.PLUSOffered() // a client's "y" flag is a downgrade
		}
	default:
		server = sasl.NewSCRAMSHA1(lookup)
	}
	_, err := s.saslExchange(server, response)
	creds := server.Credentials()
	req := loginRequest{method: method, creds: sasl.Credentials{Username: creds.Username, Identity: creds.Identity}, verified: true, decider: decider}
	switch {
	case err == nil:
		return s.login(req)
	case errors.Is(err, sasl.ErrBadProof), errors.Is(err, ErrUnknownUser), errors.Is(err, sasl.ErrUnknownUser), errors.Is(err, errNoSCRAMSecret),
		errors.Is(err, sasl.ErrBindingMismatch): // credentials relayed from another TLS connection
		// The same -ERR, delay and penalty as a wrong password.
		req.verified, req.decider = false, nil
		return s.loginFailed(req, "", &Refusal{Code: codeAuth, Text: errAuthFailed.text})
	case isConnError(err), errors.Is(err, errAuthCancelled), errors.Is(err, errBadBase64), errors.Is(err, errLineTooLong):
		s.countBadExchange(method, err)
		return err
	}
	s.debug("SCRAM exchange refused", zap.Error(err))
	s.countBadExchange(method, errBadCredentials)
	return errBadCredentials // without the cause, which may name the user
}

// channelBinding is the client connection's tls-exporter channel binding
// (RFC 9266), nil without TLS or where the exporter is not safe to use
// (TLS 1.2 without extended master secret).
func (s *session) channelBinding() []byte {
	st := s.tlsState()
	if st == nil {
		return nil
	}
	// crypto/tls refuses the exporter where it is unsafe.
	cb, err := st.ExportKeyingMaterial("EXPORTER-Channel-Binding", nil, 32)
	if err != nil {
		return nil
	}
	return cb
}
