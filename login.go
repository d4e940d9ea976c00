package pop3

// The login pipeline: the authenticator decides where a client goes and
// with which credentials (loginRequest → loginTarget), the pool or the
// named address gives an upstream connection, the upstream's answer ends
// in loginDone (relay) or loginFailed. Every refusal type and response
// code lives here, and reply is the one place an error becomes -ERR.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

// loginRequest is what the client proved or claimed, and about whom.
type loginRequest struct {
	method  string           // plain, apop, cram-md5, external, oauthbearer, xoauth2
	creds   sasl.Credentials // Password holds the password, the APOP or CRAM-MD5 digest, or the token
	salt    string           // APOP timestamp or CRAM-MD5 challenge
	attempt int              // 1 for the session's first login attempt
	remote  net.Addr
	local   net.Addr
	tls     *tls.ConnectionState // nil on a plaintext connection
	// verified: the session checked the client's proof itself (SCRAM)
	// against decider's keys; decider, not the chain, decides the login.
	verified bool
	decider  authenticator
}

// loginTarget says which upstream to log in to and with which credentials.
type loginTarget struct {
	address string
	creds   sasl.Credentials
	// checked: the authenticator verified the client's credentials itself,
	// so master_login may log in for the user.
	checked bool
	// master: log in as this master user for creds.Username, with
	// creds.Password (the master's); from the authenticator, per user.
	master string
	// tls: reach address with TLS (STLS with startTLS) as the
	// authenticator says for this user, whatever the configured upstreams.
	tls      *tls.Config
	startTLS bool
}

// authenticator turns a client's login into a loginTarget. A refusal is an
// *Refusal; an error that is neither means no decision could be made.
type authenticator interface {
	authenticate(ctx context.Context, req loginRequest) (loginTarget, error)
}

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

// login decides where the client goes and logs in there: on the upstream
// dialled at accept when challenges are relayed, else through the
// authenticator and a new upstream connection.
func (s *session) login(req loginRequest) error {
	s.attempts++
	req.attempt, req.remote, req.local, req.tls = s.attempts, s.cx.RemoteAddr(), s.cx.LocalAddr(), s.tlsState()
	started := now()
	deadline := s.ioDeadline()
	if s.badUserName(req.creds.Username) || s.badUserName(req.creds.Identity) {
		// No mailbox has such a name, and it would go on into logs, events
		// and the arguments of exec subscribers; the log gets its start.
		req.creds = sasl.Credentials{Username: truncate(req.creds.Username, 64), Identity: truncate(req.creds.Identity, 64)}
		return s.loginFailed(req, "", errBadCredentials)
	}
	if limit := s.blockedBy(req.creds.Username); limit == limitStoreUnavailable {
		return s.loginUnavailable(req, limit)
	} else if limit != "" {
		return s.loginBlocked(req, limit)
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

	decide := s.h.authenticator
	if req.decider != nil {
		decide = req.decider
	}
	target, err := decide.authenticate(s.ctx, req)
	if err != nil {
		return s.loginFailed(req, "", err)
	}
	mailbox := mailboxUser(target.creds) // before a master login changes the names
	if target, err = s.h.asMaster(target); err != nil {
		return s.loginFailed(req, target.address, err)
	}
	if target.creds.Password == "" && req.method != AuthPlain {
		// A digest, token or certificate is no password for the upstream,
		// and no master user or per-user password stands in for it.
		return s.loginFailed(req, target.address, fmt.Errorf("%w: no upstream password for method %s (set master_login)", errAuthServer, req.method))
	}
	// The upstream's time starts now: an auth server that took longer than
	// timeout (WAIT retries included) must not make its dial fail at once
	// and count against it.
	deadline = s.ioDeadline()
	var up *upstreamClient
	switch {
	case target.address == "":
		up, err = s.h.pool.connect(s.ctx, s.poolRequest(mailbox), s.dialClient(), deadline)
	case target.tls != nil:
		up, err = s.h.pool.connectWithTLS(s.ctx, target.address, target.tls, target.startTLS, s.dialClient(), deadline)
	default:
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
	return s.loginDone(req, up, mailbox, text, started, err)
}

// asMaster turns a target into a master user's login where one applies:
// the authenticator named a master user, or it checked the credentials
// itself and master_login is set. Dovecot takes both forms: AUTH PLAIN
// with the user as authorization identity, or USER <user><sep><master>
// (auth_master_user_separator) and the master's password.
func (h *Handler) asMaster(target loginTarget) (loginTarget, error) {
	user, master, password, separator := target.creds.Username, target.master, target.creds.Password, ""
	if master == "" {
		if !target.checked || h.MasterLogin == nil {
			return target, nil
		}
		master, password = h.MasterLogin.User, h.MasterLogin.Password
	}
	if h.MasterLogin != nil {
		separator = h.MasterLogin.Separator
	}
	if separator != "" {
		if strings.Contains(user, separator) {
			// "victim*master" as a user would log in as someone else, or
			// as the master itself, depending on how the backend splits.
			return target, fmt.Errorf("%w: user name holds the master separator %q", errBadCredentials, separator)
		}
		target.creds = sasl.Credentials{Username: user + separator + master, Password: password}
	} else {
		target.creds = sasl.Credentials{Identity: user, Username: master, Password: password}
	}
	target.master = ""
	return target, nil
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
	s.loginSucceeded(req.creds.Username)
	if limit := s.takeUserSessions(actingAs); limit == limitStoreUnavailable {
		if s.early != nil {
			s.early = nil
		}
		up.quit()
		return s.loginUnavailable(req, limit)
	} else if limit != "" {
		// A digest made over this upstream's challenge works nowhere else.
		relayed := s.early != nil
		s.early = nil
		up.quit()
		s.h.limitReached(s, limit, zap.String("user", req.creds.Username))
		s.h.proc.metrics.login(req.method, "in_use", -1)
		if relayed {
			return errUserSessionsFatal
		}
		return errUserSessions
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
	s.h.proc.sessions.changed(s)
	s.loginTook = now().Sub(started)
	s.h.proc.metrics.login(req.method, "ok", s.loginTook.Seconds())
	s.h.emit("pop3_login", func() map[string]any {
		return map[string]any{"session": s.id, "remote": s.remote, "user": req.creds.Username, "upstream_user": actingAs, "method": req.method, "upstream": up.address}
	})
	s.h.proc.penalties.succeed(s.clientIP(), req.creds.Username)
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
	var refused *Refusal
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
			s.h.proc.metrics.login(req.method, resultForCode(reply.code), -1)
			return reply
		}
		s.log(zap.InfoLevel, "login failed", fields...)
		s.authFailed(req)
		s.failureDelay(0, false)
		return reply
	case errors.As(err, &refused):
		if !isCredentialCode(refused.Code) {
			s.log(zap.InfoLevel, "login refused", fields...)
			s.h.proc.metrics.login(req.method, resultForCode(refused.Code), -1)
			if refused.HasWait {
				s.failureDelay(refused.Wait, true) // the auth server's own wait, no penalty
			}
			return &replyError{code: refused.Code, text: refused.Text}
		}
		s.log(zap.InfoLevel, "login failed", fields...)
		s.authFailed(req)
		s.failureDelay(refused.Wait, refused.HasWait)
		return &replyError{code: refused.Code, text: refused.Text}
	case errors.As(err, &re):
		s.log(zap.InfoLevel, "login refused", fields...)
		s.h.proc.metrics.login(req.method, "invalid", -1)
		return err
	case errors.Is(err, errAuthServer):
		s.log(zap.WarnLevel, "auth server unavailable", fields...)
		s.h.proc.metrics.login(req.method, "unavailable", -1)
		return errAuthUnavailable
	}
	s.h.proc.metrics.login(req.method, "unavailable", -1)
	if errors.Is(err, errNoUpstream) {
		s.log(zap.WarnLevel, "no upstream available", fields...)
	} else {
		s.log(zap.WarnLevel, "upstream unavailable", fields...)
	}
	s.result = "upstream_unavailable"
	return errUnavailable
}

// loginUnavailable refuses a login that needs the shared limits store
// while it is down and on_store_failure is closed.
func (s *session) loginUnavailable(req loginRequest, limit string) error {
	s.log(zap.WarnLevel, "login refused: limits store unavailable", zap.String("user", req.creds.Username), zap.String("method", req.method))
	s.h.proc.metrics.limitRefused(limit)
	s.h.proc.metrics.login(req.method, "unavailable", -1)
	return errLimitsUnavailable
}

// loginBlocked answers a login that a block stops, without checking the
// credentials anywhere: as a wrong password, after the same delay, so that
// a guesser cannot tell a block from a miss.
func (s *session) loginBlocked(req loginRequest, limit string) error {
	s.log(zap.InfoLevel, "login blocked", zap.String("user", req.creds.Username), zap.String("method", req.method),
		zap.Int("attempt", req.attempt), zap.String("limit", limit))
	s.h.proc.metrics.limitRefused(limit)
	s.h.proc.metrics.login(req.method, "blocked", -1)
	s.failedUser = req.creds.Username
	s.h.emit("pop3_auth_failed", func() map[string]any {
		return map[string]any{"session": s.id, "remote": s.remote, "user": req.creds.Username, "method": req.method, "blocked": limit}
	})
	s.failureDelay(0, false)
	return errAuthFailed
}

// authFailed records refused credentials for metrics, for event
// subscribers (fail2ban-style blocking) and for the failures_* limits.
// Never a password.
func (s *session) authFailed(req loginRequest) {
	s.countFailure(req.creds.Username)
	s.failedUser = req.creds.Username // for the penalty in failureDelay
	s.h.proc.metrics.login(req.method, "failed", -1)
	s.h.emit("pop3_auth_failed", func() map[string]any {
		return map[string]any{"session": s.id, "remote": s.remote, "user": req.creds.Username, "method": req.method}
	})
}

// failureDelay waits before the -ERR of a refused login, no longer than
// the session may live.
func (s *session) failureDelay(wait time.Duration, hasWait bool) {
	d := wait
	if !hasWait {
		base := time.Duration(s.h.AuthFailureDelay)
		d = s.h.proc.penalties.fail(s.clientIP(), s.failedUser, base)
		if n := s.h.app.sharedFailures(s.ctx, s.clientIP()); n > 0 {
			d = max(d, penaltyDelay(n, base)) // failures at other instances count too
		}
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

// isRefusal reports whether a login failed on the credentials (the client
// may retry), not on an unavailable service.
func isRefusal(err error) bool {
	var re *replyError
	return errors.As(err, &re) && re.code != codeSysTemp && !re.fatal
}

// errAuthServer marks a login the auth server could not decide: down, slow
// or answering garbage. The client gets [SYS/TEMP] and may retry.
var errAuthServer = errors.New("auth server unavailable")

// upstreamRejection is the upstream's -ERR to the login: the credentials
// were refused, the upstream itself works.
type upstreamRejection struct {
	code string
	text string
}

// newUpstreamRejection keeps of an -ERR what may reach the client and the
// log: an RFC 2449 code only when well formed, the text sanitized.
func newUpstreamRejection(resp pop3wire.Response) *upstreamRejection {
	code := resp.Code
	if !isResponseCode(code) {
		code = ""
	}
	return &upstreamRejection{code: code, text: sanitizeReplyText(resp.Text)}
}

func (e *upstreamRejection) Error() string {
	return fmt.Sprintf("upstream refused login: [%s] %s", e.code, e.text)
}

// Refusal is an authenticator's "no", with what the client may see: an
// RFC 2449 response code (AUTH when it blames the credentials; IN-USE,
// LOGIN-DELAY or SYS/TEMP when it does not) and text, and how long to wait
// before the -ERR (HasWait: Wait replaces the failure delay).
type Refusal struct {
	Code    string
	Text    string
	Wait    time.Duration
	HasWait bool
}

func (e *Refusal) Error() string { return "login refused: [" + e.Code + "] " + e.Text }

func isRejection(err error) bool { return errors.As(err, new(*upstreamRejection)) }

// replyError is a -ERR reply: an optional RFC 2449 response code and text
// the client may see. fatal closes the session after the reply.
type replyError struct {
	code  string
	text  string
	fatal bool
}

func (e *replyError) Error() string {
	if e.code != "" {
		return "[" + e.code + "] " + e.text
	}
	return e.text
}

// RFC 2449 and 3206 response codes the proxy sets itself; others (IN-USE,
// LOGIN-DELAY, SYS/PERM) come from the upstream or the auth server as given.
const (
	codeAuth    = "AUTH"
	codeSysTemp = "SYS/TEMP"
	codeInUse   = "IN-USE"
)

// isResponseCode accepts RFC 2449 §8 response codes: atoms joined by "/".
func isResponseCode(c string) bool {
	if c == "" || len(c) > 40 {
		return false
	}
	for _, r := range c {
		if !(r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '/') {
			return false
		}
	}
	return true
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

// Every -ERR the proxy writes itself. Only those with a response code get
// the session id, except where said.
var (
	// Commands before login.
	errUnknownCommand = &replyError{text: "Unknown command"}
	errLineTooLong    = &replyError{text: "Line too long"}
	errSyntax         = &replyError{text: "Syntax error"}
	errNoUser         = &replyError{text: "No user name given, send USER first"}
	errUserDisabled   = &replyError{text: "USER/PASS is not enabled"}
	errAPOPDisabled   = &replyError{text: "APOP is not enabled"}
	errNoMechanism    = &replyError{text: "Unsupported authentication mechanism"}
	errTooManyErrors  = &replyError{text: "Too many errors, closing connection"} // with the session id

	// Logins.
	errPlaintextLogin = &replyError{code: codeAuth, text: "Plaintext authentication disallowed on non-secure connection, use STLS first"}
	errAuthFailed     = &replyError{code: codeAuth, text: "Authentication failed"}
	errAuthCancelled  = &replyError{code: codeAuth, text: "Authentication cancelled"}
	errBadBase64      = &replyError{code: codeAuth, text: "Invalid base64 data"}
	errBadCredentials = &replyError{code: codeAuth, text: "Invalid credentials syntax"}
	// errAuthzidRefused answers an AUTH PLAIN whose authorization identity
	// is not its user when an auth server decides: it could not approve it.
	errAuthzidRefused     = &replyError{code: codeAuth, text: "Authorization identity not allowed"}
	errAuthUnavailable    = &replyError{code: codeSysTemp, text: "Authentication service temporarily unavailable, try again later"}
	errCRAMMD5Unavailable = &replyError{code: codeSysTemp, text: "CRAM-MD5 is not available now, try again later"}

	// The session ends.
	errUnavailable = &replyError{code: codeSysTemp, text: "Service temporarily unavailable, try again later", fatal: true}
	errInternal    = &replyError{code: codeSysTemp, text: "Internal error", fatal: true}
	errInactive    = &replyError{text: "Disconnected for inactivity", fatal: true} // with the session id
	// errTooManySessions is written before any session exists: no id.
	errTooManySessions = &replyError{code: codeSysTemp, text: "Too many connections, try again later", fatal: true}

	// Edge limits (see Limits). Those refused at accept get no id either.
	errTooManyConnections    = &replyError{code: codeSysTemp, text: "Too many connections from your address, try again later", fatal: true}
	errTooManySessionsFromIP = &replyError{code: codeSysTemp, text: "Too many sessions from your address, try again later", fatal: true}
	errUserSessions          = &replyError{code: codeInUse, text: "Too many sessions for this user, try again later"}
	errUserSessionsFatal     = &replyError{code: codeInUse, text: errUserSessions.text, fatal: true}
	errLimitsUnavailable     = &replyError{code: codeSysTemp, text: "Service temporarily unavailable, try again later"}
	errTooSlow               = &replyError{text: "Input too slow, closing connection", fatal: true} // with the session id
)

// errLoginTimeout ends a session that has not logged in by login_timeout.
func errLoginTimeout(timeout time.Duration) *replyError {
	return &replyError{text: "Not logged in after " + timeout.String() + ", closing connection", fatal: true}
}

// errKicked ends a session that the admin API or a drain closes.
func errKicked(reason string) *replyError {
	return &replyError{code: codeSysTemp, text: reason, fatal: true}
}

// line is the -ERR line of e, without the session id and the line end.
func (e *replyError) line() string { return "-ERR " + e.Error() }

// reply is the one place that writes -ERR. A replyError goes out as it is;
// any other error is logged and answered as an internal error.
func (s *session) reply(err error) error {
	if err == nil {
		return nil
	}
	var re *replyError
	if !errors.As(err, &re) {
		s.log(zap.ErrorLevel, "handling command", zap.Error(err))
		re = errInternal
	}
	line := re.line()
	if re.code != "" {
		line += s.idSuffix() // lets an operator find the session in the log
	}
	if werr := s.writeLine(line); werr != nil {
		return werr
	}
	s.errors++
	switch {
	case re.fatal:
		s.state = stateDone
		if s.result == "" {
			s.result = "error"
		}
	case s.h.MaxErrors > 0 && s.errors >= s.h.MaxErrors:
		s.state, s.result = stateDone, "too_many_errors"
		if werr := s.writeLine(errTooManyErrors.line() + s.idSuffix()); werr != nil {
			return werr
		}
	}
	return nil // run flushes after the last command
}

// lastWords tries to send a final -ERR before login, bounded by a second:
// the client may have stopped reading.
func (s *session) lastWords(re *replyError) {
	if s.state != stateAuthorization || s.w == nil {
		return
	}
	_ = s.cx.SetWriteDeadline(now().Add(time.Second))
	_ = s.writeLine(re.line() + s.idSuffix())
	if err := s.w.Flush(); err != nil {
		s.notReading = true
	}
}

// isConnError reports whether err comes from the connection rather than
// from a command: those end the session without a reply.
func isConnError(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.As(err, &ne)
}

// sanitizeReplyText keeps text from another server safe for one reply or
// log line: no control bytes, at most 200 bytes.
func sanitizeReplyText(text string) string {
	return truncate(stripControl(text), 200)
}

// stripControl drops control bytes (0x00-0x1F, 0x7F) and keeps every other
// byte, so that no value, whether from the client, an upstream, DNS or
// configuration, can end a line or a header field and start another
// (CVE-2026-28753 was NGINX putting a PTR answer with CR LF into
// Client-Host). It is the one filter for text that crosses from one peer
// to another; user names are refused instead (badUserName).
func stripControl(s string) string {
	if !hasControl(s) {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if !isControl(s[i]) {
			b = append(b, s[i])
		}
	}
	return string(b)
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if isControl(s[i]) {
			return true
		}
	}
	return false
}

func isControl(c byte) bool { return c < 0x20 || c == 0x7f }
