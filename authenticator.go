package pop3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// Authenticators decide logins. They are Caddy modules in the namespace
// layer4.handlers.pop3.authenticators (JSON: the handler's authenticators
// list, each with its module name under "authenticator"), tried in order:
// the first that knows the user decides. Without any, the client's
// credentials go to the handler's upstreams as they are.
//
// A module of another package implements Authenticator; xcaddy build --with
// adds it with no change here.
type Authenticator interface {
	// Authenticate decides one login. It returns where and as whom to log
	// in upstream; ErrUnknownUser to leave the login to the next
	// authenticator; a *Refusal to refuse it (with what the client sees);
	// any other error when it cannot decide now (the client gets
	// -ERR [SYS/TEMP] and may retry). It must return when ctx ends.
	Authenticate(ctx context.Context, req AuthRequest) (AuthTarget, error)
}

// ErrUnknownUser is an authenticator's "not mine": the next one decides.
// When none knows the user, the login fails as with a wrong password.
var ErrUnknownUser = errors.New("unknown user")

// AuthRequest is a client's login as an authenticator sees it.
type AuthRequest struct {
	// Method is how the client logged in: plain (USER/PASS, AUTH PLAIN or
	// LOGIN), apop, cram-md5, external, oauthbearer or xoauth2.
	Method string
	// User is the login name; AuthzID the authorization identity an AUTH
	// PLAIN gave, if any.
	User, AuthzID string
	// Password is the password (plain), the APOP or CRAM-MD5 digest, or
	// the OAuth token. It must never be logged or stored.
	Password string
	// Salt is the APOP timestamp or the CRAM-MD5 challenge the digest was
	// made over.
	Salt string
	// Attempt counts the session's login attempts from 1.
	Attempt int
	// Remote is the client's address (the PROXY protocol's when a
	// proxy_protocol handler ran first); Local the address it reached.
	Remote, Local net.Addr
	// TLS is the client connection's TLS state; nil in plaintext.
	TLS *tls.ConnectionState
}

// AuthTarget is where and as whom a login goes upstream.
type AuthTarget struct {
	// Address is the upstream as host:port; empty: the handler's upstreams
	// (lb_policy), by the user.
	Address string
	// User and Password log in upstream; empty: the client's own (a
	// password only exists for the plain method).
	User, Password string
}

// authChain tries its authenticators in order until one knows the user.
type authChain []authenticator

func (c authChain) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	for _, a := range c {
		target, err := a.authenticate(ctx, req)
		if errors.Is(err, ErrUnknownUser) {
			continue
		}
		return target, err
	}
	// Told apart from a wrong password nowhere the client can see.
	return loginTarget{}, &Refusal{Code: codeAuth, Text: errAuthFailed.text}
}

// moduleAuthenticator runs an Authenticator of another package in the
// login pipeline.
type moduleAuthenticator struct{ a Authenticator }

func (m moduleAuthenticator) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	target, err := m.a.Authenticate(ctx, req.public())
	if err != nil {
		if errors.Is(err, ErrUnknownUser) || errors.As(err, new(*Refusal)) || errors.Is(err, ctx.Err()) && ctx.Err() != nil {
			return loginTarget{}, err
		}
		return loginTarget{}, fmt.Errorf("%w: %w", errAuthServer, err)
	}
	creds := sasl.Credentials{Username: req.creds.Username, Identity: req.creds.Identity}
	if target.User != "" {
		creds = sasl.Credentials{Username: target.User}
	}
	// Only a password is one for the upstream: a digest, token or
	// certificate login without target.Password fails in login, which
	// checks every authenticator's target so.
	if req.method == AuthPlain {
		creds.Password = req.creds.Password
	}
	if target.Password != "" {
		creds.Password = target.Password
	}
	return loginTarget{address: target.Address, creds: creds}, nil
}

// public is the request as an Authenticator of another package sees it.
func (req loginRequest) public() AuthRequest {
	return AuthRequest{
		Method:   req.method,
		User:     req.creds.Username,
		AuthzID:  req.creds.Identity,
		Password: req.creds.Password,
		Salt:     req.salt,
		Attempt:  req.attempt,
		Remote:   req.remote,
		Local:    req.local,
		TLS:      req.tls,
	}
}

// loadAuthenticators loads the authenticators list: our own modules join
// the login pipeline as they are, others through moduleAuthenticator.
func (h *Handler) loadAuthenticators(ctx caddy.Context) error {
	if h.AuthenticatorsRaw == nil {
		return nil
	}
	mods, err := ctx.LoadModule(h, "AuthenticatorsRaw")
	if err != nil {
		return fmt.Errorf("loading authenticators: %w", err)
	}
	for i, m := range mods.([]any) {
		switch a := m.(type) {
		case authenticator:
			h.authenticators = append(h.authenticators, a)
		case Authenticator:
			h.authenticators = append(h.authenticators, moduleAuthenticator{a})
		default:
			return fmt.Errorf("authenticators %d: module %T is no authenticator", i, m)
		}
	}
	return nil
}

// HTTPAuthenticator is the auth_http client as an authenticator module
// (layer4.handlers.pop3.authenticators.http): it asks an NGINX-compatible
// auth server about each login. The handler's auth_http option is its
// shorthand.
type HTTPAuthenticator struct {
	AuthHTTP

	verifyClient bool // the handler's connection policies ask for client certificates
}

// CaddyModule returns the Caddy module information.
func (*HTTPAuthenticator) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.pop3.authenticators.http",
		New: func() caddy.Module { return new(HTTPAuthenticator) },
	}
}

// Provision expands {env.*} in the header values and prepares the client.
func (a *HTTPAuthenticator) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	return a.AuthHTTP.setup(ctx)
}

// Cleanup closes idle connections to the auth server.
func (a *HTTPAuthenticator) Cleanup() error {
	a.cleanup()
	return nil
}

func (a *HTTPAuthenticator) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	return authHTTPAuthenticator{a: &a.AuthHTTP, verifyClient: a.verifyClient}.authenticate(ctx, req)
}

// Authenticate implements Authenticator.
func (a *HTTPAuthenticator) Authenticate(ctx context.Context, req AuthRequest) (AuthTarget, error) {
	target, err := a.authenticate(ctx, loginRequest{
		method:  req.Method,
		creds:   sasl.Credentials{Username: req.User, Identity: req.AuthzID, Password: req.Password},
		salt:    req.Salt,
		attempt: req.Attempt,
		remote:  req.Remote,
		local:   req.Local,
		tls:     req.TLS,
	})
	return AuthTarget{Address: target.address, User: target.creds.Username, Password: target.creds.Password}, err
}

// UnmarshalCaddyfile reads "http <url> { ... }", the auth_http block.
func (a *HTTPAuthenticator) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	return a.AuthHTTP.unmarshalCaddyfile(d, "pop3")
}

// Interface guards
var (
	_ Authenticator         = (*HTTPAuthenticator)(nil)
	_ authenticator         = (*HTTPAuthenticator)(nil)
	_ caddy.Provisioner     = (*HTTPAuthenticator)(nil)
	_ caddy.CleanerUpper    = (*HTTPAuthenticator)(nil)
	_ caddyfile.Unmarshaler = (*HTTPAuthenticator)(nil)
)

// digestsCheckable reports whether an authenticator can check an APOP or
// CRAM-MD5 digest: any but a passwd_file (an auth server gets the salt),
// and a passwd_file that has an entry with a usable secret. Where none
// can, the mechanism is not offered: a client would only fail with it.
func (h *Handler) digestsCheckable(method string) bool {
	if !h.hasAuthenticators() || h.AuthHTTP != nil {
		return true
	}
	for _, a := range h.authenticators {
		p, ok := a.(*PasswdFile)
		if !ok || p.checksDigests(method) {
			return true
		}
	}
	return false
}

// MasterLogin is a master user the proxy logs in upstream as, for users
// whose credentials an authenticator has checked.
type MasterLogin struct {
	// The master user's name and password upstream. The password may
	// hold placeholders such as {env.MASTER_PASSWORD} or
	// {file./etc/caddy/master.pw}, resolved at provision.
	User     string `json:"user"`
	Password string `json:"password"`
	// Log in with USER <user><separator><master> and PASS <password>
	// (Dovecot's auth_master_user_separator) instead of AUTH PLAIN with
	// the user as authorization identity. Default: AUTH PLAIN.
	Separator string `json:"separator,omitempty"`
}

// provision resolves the password's placeholders and checks the names.
func (m *MasterLogin) provision() error {
	m.Password = caddy.NewReplacer().ReplaceAll(m.Password, "")
	switch {
	case m.User == "" || m.Password == "":
		return errors.New("master_login: user and password are required")
	case hasControl(m.User) || hasControl(m.Password) || hasControl(m.Separator):
		return errors.New("master_login: user, password and separator must be single lines")
	case strings.ContainsAny(m.Separator, " "):
		return errors.New("master_login: separator must not hold a space")
	}
	return nil
}
