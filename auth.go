package pop3

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

var (
	errNoUser          = &replyError{text: "No user name given, send USER first"}
	errUserDisabled    = &replyError{text: "USER/PASS is not enabled"}
	errAPOPDisabled    = &replyError{text: "APOP is not enabled"}
	errNoMechanism     = &replyError{text: "Unsupported authentication mechanism"}
	errAuthCancelled   = &replyError{code: codeAuth, text: "Authentication cancelled"}
	errBadBase64       = &replyError{code: codeAuth, text: "Invalid base64 data"}
	errBadCredentials  = &replyError{code: codeAuth, text: "Invalid credentials syntax"}
	errAuthUnavailable = &replyError{code: codeSysTemp, text: "Authentication service temporarily unavailable, try again later"}

	errCRAMMD5Unavailable = &replyError{code: codeSysTemp, text: "CRAM-MD5 is not available now, try again later"}
)

// loginRequest is what the client proved or claimed, and about whom.
type loginRequest struct {
	method  string           // plain, apop, cram-md5, external, oauthbearer, xoauth2
	creds   sasl.Credentials // Password holds the password, the APOP or CRAM-MD5 digest, or the token
	salt    string           // APOP timestamp or CRAM-MD5 challenge
	attempt int              // 1 for the session's first login attempt
	remote  net.Addr
	tls     *tls.ConnectionState // nil on a plaintext connection
}

// loginTarget says which upstream to log in to and with which credentials.
type loginTarget struct {
	address string
	creds   sasl.Credentials
}

// authenticator turns a client's login into a loginTarget. A refusal is an
// *authRefusal; an error that is neither means no decision could be made.
type authenticator interface {
	authenticate(ctx context.Context, req loginRequest) (loginTarget, error)
}

// authRefusal is an authenticator's "no", with what the client may see.
type authRefusal struct {
	code    string
	text    string
	wait    time.Duration
	hasWait bool
}

func (e *authRefusal) Error() string { return "login refused: [" + e.code + "] " + e.text }

// passThrough sends the client's own credentials to the upstream the pool
// chooses (NGINX's proxy_pass); an empty address means "ask the pool".
type passThrough struct{}

func (passThrough) authenticate(_ context.Context, req loginRequest) (loginTarget, error) {
	if req.method != AuthPlain {
		// An APOP or CRAM-MD5 digest is made over one upstream's challenge
		// and reaches only that upstream (s.early); any other would take it
		// as a password.
		return loginTarget{}, errChallengeUpstreamLost
	}
	return loginTarget{creds: req.creds}, nil
}

// errChallengeUpstreamLost: the upstream whose challenge the client signed
// is gone, so the digest cannot be checked anywhere.
var errChallengeUpstreamLost = errors.New("upstream that issued the APOP or CRAM-MD5 challenge is gone")

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
			countBadExchange(mechanismMethod(name), errBadBase64)
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
		countBadExchange(method, err)
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

// isRefusal reports whether a login failed on the credentials (the client
// may retry), not on an unavailable service.
func isRefusal(err error) bool {
	var re *replyError
	return errors.As(err, &re) && re.code != codeSysTemp && !re.fatal
}

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
		metrics.login(AuthCRAMMD5, "unavailable", -1)
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
		countBadExchange(AuthCRAMMD5, err)
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
func countBadExchange(method string, err error) {
	switch {
	case errors.Is(err, errAuthCancelled):
		metrics.login(method, "cancelled", -1)
	case errors.Is(err, errBadCredentials), errors.Is(err, errBadBase64), errors.Is(err, errLineTooLong):
		metrics.login(method, "invalid", -1)
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

// login decides where the client goes and logs in there: on the upstream
// dialled at accept when challenges are relayed, else through the
// authenticator and a new upstream connection.
func (s *session) login(req loginRequest) error {
	s.attempts++
	req.attempt, req.remote, req.tls = s.attempts, s.cx.RemoteAddr(), s.tlsState()
	started := now()
	deadline := s.ioDeadline()
	if s.badUserName(req.creds.Username) || s.badUserName(req.creds.Identity) {
		// No mailbox has such a name, and it would go on into logs, events
		// and the arguments of exec subscribers; the log gets its start.
		req.creds = sasl.Credentials{Username: truncate(req.creds.Username, 64), Identity: truncate(req.creds.Identity, 64)}
		return s.loginFailed(req, "", errBadCredentials)
	}

	if up := s.early; up != nil {
		up.setDeadline(deadline)
		var text string
		var err error
		if req.method == AuthAPOP {
			text, err = up.apop(req.creds.Username, req.creds.Password)
		} else {
			text, err = up.login(req.creds)
		}
		return s.loginDone(req, up, mailboxUser(req.creds), text, started, err)
	}

	target, err := s.h.authenticator.authenticate(s.ctx, req)
	if err != nil {
		return s.loginFailed(req, "", err)
	}
	// The upstream's time starts now: an auth server that took longer than
	// timeout (WAIT retries included) must not make its dial fail at once
	// and count against it.
	deadline = s.ioDeadline()
	var up *upstreamClient
	if target.address == "" {
		up, err = s.h.pool.connect(s.ctx, s.poolRequest(mailboxUser(target.creds)), s.dialClient(), deadline)
	} else {
		up, err = s.h.pool.connectNamed(s.ctx, target.address, s.dialClient(), deadline)
	}
	if err != nil {
		return s.loginFailed(req, target.address, err)
	}
	stop := s.closeOnKick(up.conn)
	text, err := up.login(target.creds)
	stop()
	if err != nil {
		if isRejection(err) {
			up.quit()
		} else {
			up.close()
		}
	}
	return s.loginDone(req, up, mailboxUser(target.creds), text, started, err)
}

// badUserName reports whether a user name or authzid is one no mailbox
// has: with a control byte, or longer than a USER command could carry
// (max_command_length), which only a SASL exchange can send.
func (s *session) badUserName(name string) bool {
	return hasControl(name) || len(name) > s.h.MaxCommandLength
}

// mailboxUser is whose mailbox a login opens: the authorization identity
// when there is one (only without auth_http), which user_hash and
// {pop3.user} must follow to reach that mailbox's upstream.
func mailboxUser(c sasl.Credentials) string {
	if c.Identity != "" {
		return c.Identity
	}
	return c.Username
}

// loginDone finishes a login attempt on up: relay on success, the right
// -ERR otherwise. actingAs is whose mailbox the upstream opens: the
// client's user, its authzid, or an auth server's Auth-User.
func (s *session) loginDone(req loginRequest, up *upstreamClient, actingAs, text string, started time.Time, err error) error {
	if err != nil {
		// A refusal that does not blame the credentials ([IN-USE], [SYS/TEMP])
		// comes from past the upstream's login stage: Dovecot closes the
		// connection after it, and no other upstream can take a digest made
		// over this one's challenge, so the session ends.
		var rejected *upstreamRejection
		lost := s.early != nil && errors.As(err, &rejected) && rejected.code != "" && !isCredentialCode(rejected.code)
		if s.early != nil && (lost || !isRejection(err) && !errors.As(err, new(*replyError))) {
			s.dropEarly()
		}
		reply := s.loginFailed(req, up.address, err)
		if re, ok := reply.(*replyError); ok && lost {
			re.fatal = true
		}
		return reply
	}
	up.setDeadline(time.Time{})
	s.upstream, s.early = up, nil
	s.loginUser, s.upstreamUser, s.method = req.creds.Username, actingAs, req.method
	s.state = stateRelay
	s.shared.mu.Lock()
	s.shared.user, s.shared.upstream, s.shared.relaying = req.creds.Username, up.address, true
	if actingAs != req.creds.Username {
		s.shared.upstreamUser = actingAs
	}
	s.shared.wireIn, s.shared.wireOut, s.shared.wireOK = sockopt.WireBytes(s.raw)
	s.shared.mu.Unlock()
	s.loginTook = now().Sub(started)
	metrics.login(req.method, "ok", s.loginTook.Seconds())
	s.h.emit("pop3_login", func() map[string]any {
		return map[string]any{"session": s.id, "remote": s.remote, "user": req.creds.Username, "upstream_user": actingAs, "method": req.method, "upstream": up.address}
	})
	penalties.succeed(s.clientIP(), req.creds.Username)
	// The INFO line for the login is the session line at the end.
	s.debug("login",
		zap.String("user", req.creds.Username),
		zap.String("upstream_user", actingAs),
		zap.String("method", req.method),
		zap.String("upstream", up.address),
		zap.Int("attempt", req.attempt),
		zap.Duration("duration", s.loginTook))
	return s.writeLine("+OK " + text)
}

func isRejection(err error) bool { return errors.As(err, new(*upstreamRejection)) }

// dropEarly closes the upstream dialled at accept after it failed.
func (s *session) dropEarly() {
	if s.early != nil {
		s.early.close()
		s.early = nil
	}
}

// loginFailed logs why a login failed and picks what the client sees: the
// upstream's text only with pass_error_message, its response code always;
// an auth server's text and code as NGINX shows them. Refused credentials
// wait auth_failure_delay (doubling per recent failure from the same
// address) or the auth server's Auth-Wait before the -ERR.
func (s *session) loginFailed(req loginRequest, upstream string, err error) error {
	if cerr := s.ended(); cerr != nil {
		return cerr // kicked or out of time: the session ends, nothing failed
	}
	fields := []zap.Field{
		zap.String("user", req.creds.Username),
		zap.String("method", req.method),
		zap.String("upstream", upstream),
		zap.Int("attempt", req.attempt),
		zap.Error(err),
	}
	if req.creds.Identity != "" {
		fields = append(fields, zap.String("authzid", req.creds.Identity))
	}
	var rejected *upstreamRejection
	var refused *authRefusal
	var re *replyError
	switch {
	case errors.As(err, &rejected):
		reply := &replyError{code: rejected.code, text: errAuthFailed.text}
		if reply.code == "" {
			reply.code = codeAuth
		}
		credentials := isCredentialCode(reply.code)
		if !credentials {
			reply.text = textForCode(reply.code)
		}
		if s.h.PassErrorMessage && rejected.text != "" {
			reply.text = sanitizeReplyText(rejected.text)
		}
		if !credentials {
			s.log(zap.InfoLevel, "login refused", fields...)
			metrics.login(req.method, resultForCode(reply.code), -1)
			return reply
		}
		s.log(zap.InfoLevel, "login failed", fields...)
		s.authFailed(req)
		s.failureDelay(0, false)
		return reply
	case errors.As(err, &refused):
		if !isCredentialCode(refused.code) {
			s.log(zap.InfoLevel, "login refused", fields...)
			metrics.login(req.method, resultForCode(refused.code), -1)
			if refused.hasWait {
				s.failureDelay(refused.wait, true) // the auth server's own wait, no penalty
			}
			return &replyError{code: refused.code, text: refused.text}
		}
		s.log(zap.InfoLevel, "login failed", fields...)
		s.authFailed(req)
		s.failureDelay(refused.wait, refused.hasWait)
		return &replyError{code: refused.code, text: refused.text}
	case errors.As(err, &re):
		s.log(zap.InfoLevel, "login refused", fields...)
		metrics.login(req.method, "invalid", -1)
		return err
	case errors.Is(err, errAuthServer):
		s.log(zap.WarnLevel, "auth server unavailable", fields...)
		metrics.login(req.method, "unavailable", -1)
		return errAuthUnavailable
	}
	metrics.login(req.method, "unavailable", -1)
	if errors.Is(err, errNoUpstream) {
		s.log(zap.WarnLevel, "no upstream available", fields...)
	} else {
		s.log(zap.WarnLevel, "upstream unavailable", fields...)
	}
	s.result = "upstream_unavailable"
	return errUnavailable
}

// isCredentialCode reports whether a refusal with this RFC 2449 response
// code blames the credentials. IN-USE, LOGIN-DELAY and SYS/* (RFC 2449 §8,
// RFC 3206) say the mailbox or the server is not available now: the client
// is not guessing passwords, so no penalty and no pop3_auth_failed. AUTH
// and codes unknown to the client (which it treats as none) do blame them.
func isCredentialCode(code string) bool {
	switch {
	case hasCode(code, "IN-USE"), hasCode(code, "LOGIN-DELAY"), hasCode(code, "SYS"):
		return false
	}
	return true
}

// hasCode reports whether code is base or below it in the RFC 2449 code
// hierarchy ("SYS/TEMP" is below "SYS").
func hasCode(code, base string) bool {
	return strings.EqualFold(code, base) || len(code) > len(base) && strings.EqualFold(code[:len(base)+1], base+"/")
}

// resultForCode is the logins_total result of a refusal that does not
// blame the credentials.
func resultForCode(code string) string {
	switch {
	case hasCode(code, "IN-USE"):
		return "in_use"
	case hasCode(code, "LOGIN-DELAY"):
		return "login_delay"
	}
	return "unavailable"
}

// textForCode is the generic text of an upstream refusal that does not
// blame the credentials; pass_error_message shows the upstream's own.
func textForCode(code string) string {
	switch {
	case hasCode(code, "IN-USE"):
		return "Mailbox in use by another session, try again later"
	case hasCode(code, "LOGIN-DELAY"):
		return "Logging in again so soon is not allowed, try again later"
	case hasCode(code, "SYS/PERM"):
		return "Mailbox not available"
	}
	return "Service temporarily unavailable, try again later"
}

// authFailed records refused credentials for metrics and for event
// subscribers (fail2ban-style blocking). Never a password.
func (s *session) authFailed(req loginRequest) {
	s.failedUser = req.creds.Username // for the penalty in failureDelay
	metrics.login(req.method, "failed", -1)
	s.h.emit("pop3_auth_failed", func() map[string]any {
		return map[string]any{"session": s.id, "remote": s.remote, "user": req.creds.Username, "method": req.method}
	})
}

// failureDelay waits before the -ERR of a refused login, no longer than
// the session may live.
func (s *session) failureDelay(wait time.Duration, hasWait bool) {
	d := wait
	if !hasWait {
		d = penalties.fail(s.clientIP(), s.failedUser, time.Duration(s.h.AuthFailureDelay))
	}
	d = min(d, maxFailureDelay, s.loginDeadline().Sub(now()))
	if d > 0 {
		s.setDeadline(s.ioDeadline()) // the login may have used up the last one
		_ = s.w.Flush()               // earlier replies are not held back
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-s.ctx.Done(): // kicked or drained
			t.Stop()
		}
	}
}

// maxFailureDelay bounds an auth server's Auth-Wait.
const maxFailureDelay = time.Minute

// sanitizeReplyText keeps text from another server safe for one reply line.
func sanitizeReplyText(text string) string {
	text = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, text)
	if len(text) > 200 {
		text = text[:200]
	}
	return text
}

// poolRequest describes this session to the load-balancing policy and fills
// the placeholders an upstream address may use.
func (s *session) poolRequest(user string) poolRequest {
	repl := s.cx.Replacer()
	if user != "" {
		// Both end up in a host name: anything else resolves to nothing.
		_, domain, _ := strings.Cut(user, "@")
		repl.Set("pop3.user", hostnameSafe(user))
		repl.Set("pop3.domain", hostnameSafe(domain))
	}
	return poolRequest{user: user, clientIP: s.clientIP(), repl: repl}
}

func (s *session) dialClient() dialClient {
	return dialClient{remote: s.cx.RemoteAddr(), local: s.cx.LocalAddr()}
}

func (s *session) clientIP() netip.Addr {
	if ap, err := netip.ParseAddrPort(s.cx.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}
