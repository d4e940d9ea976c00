// Package pop3 is a caddy-l4 handler that proxies POP3: it speaks the
// greeting, CAPA, STLS and login with the client, logs in to an upstream
// POP3 server with the client's credentials and then relays bytes both ways.
package pop3

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&Handler{})
	caddy.RegisterModule(&HTTPAuthenticator{})
}

// Defaults of the handler's options.
const (
	defaultGreeting       = "POP3 ready"
	defaultTimeout        = 60 * time.Second
	defaultLoginTimeout   = 3 * time.Minute // Dovecot's login processes allow the same
	defaultProxyTimeout   = 10 * time.Minute
	defaultMaxErrors      = 5
	defaultDialTimeout    = 10 * time.Second
	defaultMaxLineLength  = 32 * 1024 // a SASL line: base64 of a 16 KiB OAuth token and more
	defaultFailureDelay   = time.Second
	defaultTryDuration    = 5 * time.Second
	defaultHealthTimeout  = 5 * time.Second
	defaultStartTLSPolicy = StartTLSOnly
)

// defaultMaxCommandLength is RFC 2449 §4's bound: "The maximum length of a
// command is increased from 47 characters (4 character command, single
// space, 40 character argument, CRLF) to 255 octets, including the
// terminating CRLF." Servers must accept that much, so it is also the least.
const defaultMaxCommandLength = 255

// StartTLS policies: whether STLS is offered and whether login needs TLS.
const (
	StartTLSOff  = "off"  // no STLS; login in plaintext unless the route's tls handler ran first
	StartTLSOn   = "on"   // STLS offered; login allowed with or without it
	StartTLSOnly = "only" // STLS offered; login refused until the connection is TLS
)

// Authentication methods a client may be allowed to use (the `auth` option).
const (
	AuthPlain       = "plain"         // USER/PASS, AUTH PLAIN and AUTH LOGIN
	AuthAPOP        = "apop"          // APOP (RFC 1939)
	AuthCRAMMD5     = "cram-md5"      // AUTH CRAM-MD5 (RFC 2195)
	AuthExternal    = "external"      // AUTH EXTERNAL with a TLS client certificate (RFC 4422)
	AuthOAuthBearer = "oauthbearer"   // AUTH OAUTHBEARER (RFC 7628)
	AuthXOAuth2     = "xoauth2"       // AUTH XOAUTH2, the form large mail providers use
	AuthSCRAMSHA256 = "scram-sha-256" // AUTH SCRAM-SHA-256 (RFC 7677), and -PLUS over TLS
	AuthSCRAMSHA1   = "scram-sha-1"   // AUTH SCRAM-SHA-1 (RFC 5802)
)

var knownAuthMethods = []string{AuthPlain, AuthAPOP, AuthCRAMMD5, AuthExternal, AuthOAuthBearer, AuthXOAuth2, AuthSCRAMSHA256, AuthSCRAMSHA1}

// Handler is a POP3 proxy for the layer4 app: module `layer4.handlers.pop3`.
// It is terminal: it never calls the next handler in the route.
type Handler struct {
	// Upstream POP3 servers, chosen per session by lb_policy.
	Upstream []*Upstream `json:"upstream,omitempty"`
	// How to choose an upstream: round_robin, least_conn, random, first,
	// ip_hash or user_hash (the same mailbox always reaches the same
	// healthy upstream). Default: user_hash with several upstreams.
	LBPolicy string `json:"lb_policy,omitempty"`
	// How long to keep trying other upstreams when one fails before the
	// login. Default: 5s.
	LBTryDuration caddy.Duration `json:"lb_try_duration,omitempty"`
	// Period of the active health check, which connects (with TLS or STLS
	// as configured), expects +OK and sends QUIT. Off when unset.
	HealthInterval caddy.Duration `json:"health_interval,omitempty"`
	// Time limit of one active check. Default: 5s.
	HealthTimeout caddy.Duration `json:"health_timeout,omitempty"`
	// Consecutive passed checks that make an upstream healthy. Default: 1.
	HealthPasses int `json:"health_passes,omitempty"`
	// Consecutive failed checks that make it unhealthy. Default: 1.
	HealthFails int `json:"health_fails,omitempty"`
	// How long a failed connection (dial error, timeout, -ERR greeting)
	// counts against an upstream: the passive health check. Off when unset.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
	// Failures within fail_duration that make an upstream unhealthy.
	// Default: 1.
	MaxFails int `json:"max_fails,omitempty"`
	// Time limit for dialling an upstream. Default: 10s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`
	// Send the client's address to the upstream with a PROXY protocol
	// header: v1 or v2. Default: none.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`
	// Send XCLIENT ADDR/PORT before login (Dovecot's
	// login_trusted_networks). Default: false.
	XClient bool `json:"xclient,omitempty"`
	// Authentication methods the client may use: plain, apop, cram-md5,
	// external, oauthbearer, xoauth2. Default: plain.
	Auth []string `json:"auth,omitempty"`
	// An NGINX-compatible auth server that checks each login and names
	// the upstream for it. Without it the client's credentials go to the
	// first upstream as they are.
	AuthHTTP *AuthHTTP `json:"auth_http,omitempty"`
	// Authenticators that decide each login, tried in order after
	// auth_http: the first that knows the user decides. Modules of the
	// namespace layer4.handlers.pop3.authenticators, e.g. passwd_file or
	// http. Without any (and without auth_http), the client's credentials
	// go to the upstreams as they are.
	AuthenticatorsRaw []json.RawMessage `json:"authenticators,omitempty" caddy:"namespace=layer4.handlers.pop3.authenticators inline_key=authenticator"`
	// After an authenticator has checked a client's credentials itself
	// (passwd_file), log in upstream as this master user on the client's
	// behalf, so that any client mechanism reaches any backend that knows
	// a master user. Default: the client's own password is passed on.
	MasterLogin *MasterLogin `json:"master_login,omitempty"`
	// Remember the authenticators' answers for a while. Off when unset.
	AuthCache *AuthCache `json:"auth_cache,omitempty"`
	// Delay before the -ERR of a refused login; it doubles with each
	// recent failure from the same client address, up to 15s. An auth
	// server's Auth-Wait replaces it. Default: 1s.
	AuthFailureDelay caddy.Duration `json:"auth_failure_delay,omitempty"`
	// Extensions listed by CAPA besides those the proxy adds itself
	// (SASL, STLS, RESP-CODES, AUTH-RESP-CODE). USER is listed only while
	// plain login is allowed. Default: TOP USER UIDL.
	Capabilities []string `json:"capabilities,omitempty"`
	// STLS policy: off, on or only. Default: only (login needs TLS). It
	// has no effect with implicit_tls, whose sessions are TLS from the start.
	StartTLS string `json:"starttls,omitempty"`
	// Whether the handler runs the TLS handshake itself before the greeting
	// (POP3S, port 995), with connection_policy and bounded by timeout.
	// Unlike caddy-l4's tls handler in front, which builds a TLS config per
	// connection, one config serves every connection, so clients resume
	// their TLS sessions. Default: false.
	ImplicitTLS bool `json:"implicit_tls,omitempty"`
	// TLS connection policies for STLS and implicit_tls, with the same
	// options as caddy-l4's tls handler. Certificates come from Caddy's tls
	// app. Default: one policy with ALPN pop3.
	ConnectionPolicy caddytls.ConnectionPolicies `json:"connection_policy,omitempty"`
	// Text of the +OK greeting. Default: "POP3 ready".
	Greeting string `json:"greeting,omitempty"`
	// How long a client may stay silent, or leave a reply unread, before
	// it has logged in; also bounds the STLS handshake and the upstream
	// login. Default: 60s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// How long a client may take from connecting to logging in, however
	// busy it keeps the session (NOOP, CAPA, failed logins). Default: 3m.
	LoginTimeout caddy.Duration `json:"login_timeout,omitempty"`
	// How long a logged-in session may stay silent in both directions
	// before it is closed. Default: 10m.
	ProxyTimeout caddy.Duration `json:"proxy_timeout,omitempty"`
	// Whether the client sees the upstream's -ERR text after a failed
	// login. Off gives a generic "[AUTH] Authentication failed". Default: false.
	PassErrorMessage bool `json:"pass_error_message,omitempty"`
	// Protocol errors (unknown or refused commands, failed logins) before
	// the session is closed. Default: 5.
	MaxErrors int `json:"max_errors,omitempty"`
	// After a config reload, how long sessions of the replaced config may
	// go on before they are closed: with -ERR [SYS/TEMP] before login, a
	// TCP close after. Default: unlimited.
	DrainTimeout caddy.Duration `json:"drain_timeout,omitempty"`
	// Longest AUTH line or SASL response in bytes, without its line end;
	// every line is read to its end within this bound. Default: 32768.
	MaxLineLength int `json:"max_line_length,omitempty"`
	// Longest command line other than AUTH (whose initial response may be
	// an OAuth token) in bytes, counting its line end as CRLF (RFC 2449
	// §4); a longer one is answered -ERR Line too long. SASL responses are
	// bounded by max_line_length. Default: 255; at least 255, at most
	// max_line_length.
	MaxCommandLength int `json:"max_command_length,omitempty"`
	// Limits per client address, per user and per user+address: sessions,
	// new connections, failed logins (with blocks), slow input before
	// login and session lifetime. Off when unset.
	Limits *Limits `json:"limits,omitempty"`

	ctx       caddy.Context // Handle gets no context; l4tls and l4proxy keep it the same way
	logger    *zap.Logger
	tlsOn     bool        // the handler terminates TLS itself: STLS (starttls not off) or implicit_tls
	tlsConfig *tls.Config // built once so that session tickets work across connections

	warnAlreadyTLS *sync.Once   // implicit_tls behind caddy-l4's tls handler; a pointer, as tests copy Handlers
	drained        *atomic.Bool // drain_timeout has passed: sessions that start now end at once

	// relayChallenges: APOP or CRAM-MD5 without an auth server. Each
	// session then dials the upstream at accept and relays its timestamp
	// and challenge, so the proxy never needs the password.
	relayChallenges bool

	authenticator  authenticator   // the login pipeline's: pass-through or the chain
	authenticators []authenticator // loaded from AuthenticatorsRaw
	scramSources   []scramSource   // those of them that can check SCRAM logins
	pool           *pool
	events         *caddyevents.App // nil: no events app
	proc           *processState    // theProcess unless a test gives its own
}

// Upstream is one upstream POP3 server.
type Upstream struct {
	// Network address of the server, host:port (default port 110 or, with
	// tls, 995). Its host may hold {pop3.user}, {pop3.domain} and
	// {l4.tls.server_name}, resolved at login; each value must be a host
	// name, and the port never comes from a placeholder.
	Address string `json:"address"`
	// TLS to the upstream, from the first byte (POP3S) unless starttls.
	// Certificates are verified unless insecure_skip_verify is set.
	TLS *reverseproxy.TLSConfig `json:"tls,omitempty"`
	// With tls: upgrade with STLS after the greeting instead.
	StartTLS bool `json:"starttls,omitempty"`
	// Sessions at most on this upstream at once (with placeholders: on all
	// the addresses it resolves to together); 0 is no limit.
	MaxConnections int `json:"max_connections,omitempty"`
	// Relative share of sessions for the weighted policies. Default: 1.
	Weight int `json:"weight,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.pop3",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults and prepares TLS for STLS and implicit_tls.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.ctx, h.logger = ctx, ctx.Logger()
	if err := h.loadAuthenticators(ctx); err != nil {
		return err
	}
	h.warnPoolOptions() // before setup fills in the defaults
	if err := h.setup(); err != nil {
		return err
	}
	if h.tlsOn {
		if len(h.ConnectionPolicy) == 0 {
			// Caddy's default ALPN is h2,http/1.1, which fails the handshake
			// of a client that offers only pop3.
			h.ConnectionPolicy = caddytls.ConnectionPolicies{{ALPN: []string{"pop3"}}}
		}
		for _, p := range h.ConnectionPolicy {
			if p != nil && len(p.ALPN) == 0 {
				p.ALPN = []string{"pop3"}
			}
		}
		if err := h.ConnectionPolicy.Provision(ctx); err != nil {
			return fmt.Errorf("connection_policy: %w", err)
		}
		h.tlsConfig = h.ConnectionPolicy.TLSConfig(ctx)
	}
	if err := h.proc.metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if app, err := ctx.App("events"); err == nil {
		h.events, _ = app.(*caddyevents.App)
	}
	if h.HealthInterval > 0 {
		h.pool.startHealthChecker(ctx, time.Duration(h.HealthInterval), time.Duration(h.HealthTimeout),
			int64(max(h.HealthPasses, 1)), int64(max(h.HealthFails, 1)))
	}
	if !h.ImplicitTLS && h.StartTLS != StartTLSOnly && h.hasAuth(AuthPlain) {
		h.logger.Warn("plaintext login allowed: passwords may cross the network unencrypted unless the route terminates TLS first",
			zap.String("starttls", h.StartTLS))
	}

	return nil
}

// warnPoolOptions warns of upstream options that do nothing in this
// config, and of plaintext to the addresses an auth server names.
func (h *Handler) warnPoolOptions() {
	if h.MaxFails > 0 && h.FailDuration <= 0 {
		h.logger.Warn("max_fails does nothing without fail_duration")
	}
	if h.HealthInterval > 0 && !slices.ContainsFunc(h.Upstream, func(u *Upstream) bool { return u != nil && !hasPlaceholder(u.Address) }) {
		h.logger.Warn("health_interval: no upstream without placeholders to check")
	}
	if h.AuthHTTP == nil {
		for _, u := range h.Upstream {
			if u != nil && u.TLS == nil && clientNamesZone(u.Address) {
				h.logger.Warn("upstream: the client's user name or SNI ends the host name, so the client's DNS can point it at any address, internal ones included; put the placeholder under a domain of yours (e.g. {pop3.domain}.mail.example.net) or use tls",
					zap.String("upstream", u.Address))
			}
		}
		h.warnAPOPBeforeSTLS()
		return
	}
	var ignored []string
	if h.LBPolicy != "" {
		ignored = append(ignored, "lb_policy")
	}
	if h.LBTryDuration != 0 {
		ignored = append(ignored, "lb_try_duration")
	}
	tlsOnly := len(h.Upstream) > 0
	for _, u := range h.Upstream {
		if u == nil {
			continue
		}
		if u.Weight > 1 && !slices.Contains(ignored, "weight") {
			ignored = append(ignored, "weight")
		}
		if hasPlaceholder(u.Address) {
			h.logger.Warn("auth_http names each login's upstream by IP address, which never matches an upstream with placeholders: its tls and max_connections do not apply", zap.String("upstream", u.Address))
		}
		tlsOnly = tlsOnly && u.TLS != nil
	}
	if len(ignored) > 0 {
		h.logger.Warn("auth_http names each login's upstream: these options do not apply", zap.Strings("options", ignored))
	}
	if !tlsOnly {
		h.logger.Warn("auth_http: an upstream the auth server names that is no configured upstream with tls is reached in plaintext, passwords included")
	}
}

// clientNamesZone reports whether the last label of an upstream template's
// host comes from the client ({pop3.*}, {l4.tls.server_name}): then the
// client chooses the DNS zone, and with it the address.
func clientNamesZone(address string) bool {
	host, _, err := splitTemplate(address, "110")
	if err != nil {
		return false // Validate says why
	}
	depth, start := 0, 0
	for i := 0; i < len(host); i++ {
		switch host[i] {
		case '{':
			depth++
		case '}':
			depth--
		case '.':
			if depth == 0 {
				start = i + 1
			}
		}
	}
	last := host[start:]
	return strings.Contains(last, "{pop3.") || strings.Contains(last, "{l4.tls.server_name}")
}

// warnAPOPBeforeSTLS warns of relayed APOP to an upstream with starttls:
// POP3 greets before STLS, so the timestamp the client signs crosses the
// network in plaintext, where an attacker can put in one of its own
// connection's and log in with the client's digest if it sees the client's
// side too. CRAM-MD5's challenge comes after STLS. A refusal would break
// working configs whose network is trusted; tls (implicit) has no such gap.
func (h *Handler) warnAPOPBeforeSTLS() {
	if !slices.ContainsFunc(h.Auth, func(m string) bool { return strings.EqualFold(m, AuthAPOP) }) {
		return // called before setup makes the names lower case
	}
	for _, u := range h.Upstream {
		if u != nil && u.TLS != nil && u.StartTLS {
			h.logger.Warn("auth apop: the upstream's APOP timestamp arrives in its greeting before STLS, unprotected; use tls instead of starttls to protect it",
				zap.String("upstream", u.Address))
		}
	}
}

// setup applies defaults, validates and builds the login pipeline: all of
// Provision that needs no caddy.Context.
func (h *Handler) setup() error {
	if h.Greeting == "" {
		h.Greeting = defaultGreeting
	}
	if h.Timeout == 0 {
		h.Timeout = caddy.Duration(defaultTimeout)
	}
	if h.ProxyTimeout == 0 {
		h.ProxyTimeout = caddy.Duration(defaultProxyTimeout)
	}
	if h.LoginTimeout == 0 {
		h.LoginTimeout = caddy.Duration(defaultLoginTimeout)
	}
	if h.MaxErrors == 0 {
		h.MaxErrors = defaultMaxErrors
	}
	if h.MaxLineLength == 0 {
		h.MaxLineLength = defaultMaxLineLength
	}
	if h.MaxCommandLength == 0 {
		h.MaxCommandLength = defaultMaxCommandLength
	}
	if h.AuthFailureDelay == 0 {
		h.AuthFailureDelay = caddy.Duration(defaultFailureDelay)
	}
	if h.StartTLS == "" {
		h.StartTLS = defaultStartTLSPolicy
	}
	if len(h.Auth) == 0 {
		h.Auth = []string{AuthPlain}
	}
	if h.Capabilities == nil {
		h.Capabilities = []string{"TOP", "USER", "UIDL"}
	}
	for i, m := range h.Auth {
		h.Auth[i] = strings.ToLower(m)
	}
	for i, u := range h.Upstream {
		if u == nil {
			return fmt.Errorf("upstream %d: missing", i)
		}
		if hasPlaceholder(u.Address) {
			continue // resolved and checked at login
		}
		port := "110"
		if u.TLS != nil && !u.StartTLS {
			port = "995"
		}
		addr, err := normalizeUpstreamAddressPort(u.Address, port)
		if err != nil {
			return fmt.Errorf("upstream %d: %w", i, err)
		}
		u.Address = addr
	}
	if h.LBPolicy == "" {
		h.LBPolicy = PolicyUserHash
	}
	if h.LBTryDuration == 0 {
		h.LBTryDuration = caddy.Duration(defaultTryDuration)
	}
	if h.HealthTimeout == 0 {
		h.HealthTimeout = caddy.Duration(defaultHealthTimeout)
	}
	if h.DialTimeout == 0 {
		h.DialTimeout = caddy.Duration(defaultDialTimeout)
	}
	if err := h.Validate(); err != nil {
		return err
	}

	if h.proc == nil {
		h.proc = theProcess
	}
	if h.Limits != nil {
		h.Limits.zone = h.proc.zones.get(h.Limits.Zone)
		h.Limits.zone.events.Store(h)
	}
	h.tlsOn = h.StartTLS != StartTLSOff || h.ImplicitTLS
	h.warnAlreadyTLS = new(sync.Once)
	h.drained = new(atomic.Bool)
	if h.MasterLogin != nil {
		if err := h.MasterLogin.provision(); err != nil {
			return err
		}
	}
	verifyClient := false
	for _, p := range h.ConnectionPolicy {
		verifyClient = verifyClient || (p != nil && p.ClientAuthentication != nil)
	}
	var chain authChain
	if h.AuthHTTP != nil {
		h.AuthHTTP.logger = h.logger
		if err := h.AuthHTTP.setup(h.ctx); err != nil {
			return err
		}
		chain = append(chain, authHTTPAuthenticator{a: h.AuthHTTP, verifyClient: verifyClient})
	}
	h.scramSources = nil
	for _, a := range h.authenticators {
		if ha, ok := a.(*HTTPAuthenticator); ok {
			ha.verifyClient = verifyClient
		}
		if src, ok := a.(scramSource); ok {
			h.scramSources = append(h.scramSources, src)
		}
		chain = append(chain, a)
	}
	for _, m := range []string{AuthSCRAMSHA256, AuthSCRAMSHA1} {
		if h.hasAuth(m) && len(h.scramSources) == 0 {
			return fmt.Errorf("auth: method %q needs an authenticator that holds SCRAM secrets, such as passwd_file", m)
		}
	}
	if h.AuthCache != nil && len(chain) > 0 {
		cache, err := h.AuthCache.newCache(h.proc.metrics)
		if err != nil {
			return err
		}
		for i, a := range chain {
			chain[i] = cachedAuthenticator{a: a, index: i, cache: cache}
		}
	}
	if len(chain) > 0 {
		h.authenticator = chain
	} else {
		h.authenticator = passThrough{}
		h.relayChallenges = h.relayChallengesWanted()
	}
	if h.logger == nil {
		h.logger = zap.NewNop()
	}
	pool, err := newPool(h.ctx, h.proc, poolConfig{
		upstreams:     h.Upstream,
		policy:        h.LBPolicy,
		tryDuration:   time.Duration(h.LBTryDuration),
		failFor:       time.Duration(h.FailDuration),
		maxFails:      h.MaxFails,
		dialer:        &tcpDialer{timeout: time.Duration(h.DialTimeout)},
		dialTimeout:   time.Duration(h.DialTimeout),
		proxyProtocol: h.ProxyProtocol,
		xclient:       h.XClient,
		named:         len(chain) > 0,
	}, h.logger)
	if err != nil {
		return err
	}
	h.pool = pool
	return nil
}

// Validate checks the configuration; it holds no secrets in its errors.
func (h *Handler) Validate() error {
	if len(h.Upstream) == 0 && !h.hasAuthenticators() {
		return errors.New("upstream: at least one upstream is required (or an authenticator such as auth_http to name one per login)")
	}
	for i, u := range h.Upstream {
		if u == nil || u.Address == "" {
			return fmt.Errorf("upstream %d: address missing", i)
		}
	}
	switch h.StartTLS {
	case "", StartTLSOff, StartTLSOn, StartTLSOnly:
	default:
		return fmt.Errorf("starttls: unknown policy %q (want off, on or only)", h.StartTLS)
	}
	seen := map[string]bool{}
	for _, m := range h.Auth {
		m = strings.ToLower(m)
		if !isKnownAuthMethod(m) {
			return fmt.Errorf("auth: unknown method %q (want %s)", m, strings.Join(knownAuthMethods, ", "))
		}
		if seen[m] {
			return fmt.Errorf("auth: method %q listed twice", m)
		}
		seen[m] = true
		switch m {
		case AuthExternal, AuthOAuthBearer, AuthXOAuth2:
			// Nothing in the client's message is a password for the upstream.
			if !h.hasAuthenticators() {
				return fmt.Errorf("auth: method %q needs auth_http or another authenticator", m)
			}
		}
	}
	if h.AuthFailureDelay < 0 {
		return errors.New("auth_failure_delay: must not be negative")
	}
	if h.relayChallengesWanted() {
		// The upstream must be chosen before the greeting, without the user.
		if h.LBPolicy == PolicyUserHash && len(h.Upstream) > 1 {
			return errors.New("auth: apop and cram-md5 without auth_http relay the upstream's challenge, which needs the upstream chosen at accept: set lb_policy to one that does not depend on the user (round_robin, least_conn, random, first, ip_hash) or use auth_http")
		}
		for i, u := range h.Upstream {
			if strings.Contains(u.Address, "{pop3.") {
				return fmt.Errorf("upstream %d: {pop3.*} placeholders are known only at login, but apop and cram-md5 without auth_http need the upstream at accept", i)
			}
		}
	}
	if h.LBPolicy != "" && !slices.Contains(knownPolicies, h.LBPolicy) {
		return fmt.Errorf("lb_policy: unknown policy %q (want %s)", h.LBPolicy, strings.Join(knownPolicies, ", "))
	}
	switch h.ProxyProtocol {
	case "", "v1", "v2":
	default:
		return fmt.Errorf("proxy_protocol: unknown version %q (want v1 or v2)", h.ProxyProtocol)
	}
	for i, u := range h.Upstream {
		if u.MaxConnections < 0 {
			return fmt.Errorf("upstream %d: max_connections must not be negative", i)
		}
		if u.Weight < 0 {
			return fmt.Errorf("upstream %d: weight must not be negative", i)
		}
		if u.StartTLS && u.TLS == nil {
			return fmt.Errorf("upstream %d: starttls needs tls settings", i)
		}
	}
	for name, v := range map[string]caddy.Duration{"lb_try_duration": h.LBTryDuration, "health_interval": h.HealthInterval,
		"health_timeout": h.HealthTimeout, "fail_duration": h.FailDuration, "dial_timeout": h.DialTimeout} {
		if v < 0 {
			return fmt.Errorf("%s: must not be negative", name)
		}
	}
	if h.DrainTimeout < 0 {
		return errors.New("drain_timeout: must not be negative")
	}
	if h.HealthPasses < 0 || h.HealthFails < 0 || h.MaxFails < 0 {
		return errors.New("health_passes, health_fails and max_fails must not be negative")
	}
	if h.MaxFails > maxFailsLimit {
		return fmt.Errorf("max_fails: at most %d", maxFailsLimit)
	}
	for _, c := range h.Capabilities {
		if strings.TrimSpace(c) == "" || strings.ContainsAny(c, "\r\n\x00") {
			return fmt.Errorf("capabilities: invalid extension %q", c)
		}
		switch strings.ToUpper(strings.Fields(c)[0]) {
		case "STLS", "SASL", "RESP-CODES", "AUTH-RESP-CODE":
			return fmt.Errorf("capabilities: %q is added by the proxy itself and cannot be configured", c)
		}
	}
	if strings.ContainsAny(h.Greeting, "\r\n\x00") {
		return errors.New("greeting: must be a single line")
	}
	if len(h.Greeting) > 200 {
		return errors.New("greeting: longer than 200 characters")
	}
	if h.Timeout < 0 {
		return errors.New("timeout: must not be negative")
	}
	if h.ProxyTimeout < 0 {
		return errors.New("proxy_timeout: must not be negative")
	}
	if h.LoginTimeout < 0 {
		return errors.New("login_timeout: must not be negative")
	}
	if h.MaxErrors < 0 {
		return errors.New("max_errors: must not be negative")
	}
	if h.MaxLineLength < 0 || (h.MaxLineLength > 0 && h.MaxLineLength < 512) || h.MaxLineLength > 1<<20 {
		return errors.New("max_line_length: must be between 512 and 1048576 bytes")
	}
	maxLine := h.MaxLineLength
	if maxLine == 0 {
		maxLine = defaultMaxLineLength
	}
	if h.Limits != nil {
		if err := h.Limits.validate(); err != nil {
			return err
		}
	}
	if h.MaxCommandLength < 0 || (h.MaxCommandLength > 0 && h.MaxCommandLength < defaultMaxCommandLength) || h.MaxCommandLength > maxLine {
		return fmt.Errorf("max_command_length: must be between %d and max_line_length (%d) bytes", defaultMaxCommandLength, maxLine)
	}
	return nil
}

// drain closes the sessions this handler still serves after its config was
// replaced.
func (h *Handler) drain() {
	h.drained.Store(true)
	for _, s := range h.proc.sessions.matching(func(s *session) bool { return s.h == h }) {
		s.kick(drainReason)
	}
}

const drainReason = "Server configuration changed, please reconnect"

// emit sends a Caddy event, e.g. pop3_login, to the events app's
// subscribers. data, which never holds a secret, is built only when the
// event would reach a subscriber or the debug log, and built here, as it
// reads the session. Subscribers run off the session's goroutine, since
// the events app calls them in turn and a slow one (an exec of a script)
// would hold up the login; at most maxEmitting events are in flight, and
// beyond that events are dropped with a warning.
func (h *Handler) emit(name string, data func() map[string]any) {
	if h.events == nil || !h.events.ShouldEmit(name) {
		return
	}
	q := h.proc.events
	select {
	case q.emitting <- struct{}{}:
	default:
		q.warnDropped(h.logger, name)
		return
	}
	d := data()
	// Not cancelled by a reload: the events app drops events whose context
	// is done, and a session of a replaced config may live on for hours.
	ctx := h.ctx
	ctx.Context = context.WithoutCancel(ctx.Context)
	go func() {
		defer func() { <-q.emitting }()
		h.events.Emit(ctx, name, d)
	}()
}

// maxEmitting bounds the events handed to subscribers and not yet done,
// for all handlers of the process.
const maxEmitting = 256

// eventQueue bounds the events in flight to subscribers.
type eventQueue struct {
	emitting chan struct{} // a token per event in flight
	dropped  atomic.Int64  // since the last warning
	warning  onceAMinute
}

func newEventQueue() *eventQueue {
	return &eventQueue{emitting: make(chan struct{}, maxEmitting)}
}

// warnDropped counts a dropped event and warns at most once a minute, with
// the count since the last warning.
func (q *eventQueue) warnDropped(logger *zap.Logger, name string) {
	q.dropped.Add(1)
	if !q.warning.allow() {
		return
	}
	logger.Warn("event subscribers too slow: events dropped",
		zap.String("event", name), zap.Int64("dropped", q.dropped.Swap(0)), zap.Int("in_flight", maxEmitting))
}

// relayChallengesWanted: apop or cram-md5 without an auth server.
func (h *Handler) relayChallengesWanted() bool {
	return !h.hasAuthenticators() && (h.hasAuth(AuthAPOP) || h.hasAuth(AuthCRAMMD5))
}

// hasAuthenticators reports whether logins are decided by authenticators
// (auth_http or the authenticators list) rather than passed through.
func (h *Handler) hasAuthenticators() bool {
	return h.AuthHTTP != nil || len(h.AuthenticatorsRaw) > 0 || len(h.authenticators) > 0
}

func hasPlaceholder(s string) bool { return strings.Contains(s, "{") }

// Cleanup releases nothing that live sessions still use: sessions of an old
// config keep running after a reload.
func (h *Handler) Cleanup() error {
	if h.DrainTimeout > 0 {
		time.AfterFunc(time.Duration(h.DrainTimeout), h.drain)
	}
	if h.pool != nil {
		h.pool.release()
	}
	if h.AuthHTTP != nil {
		h.AuthHTTP.cleanup() // idle connections only; live sessions open new ones
	}
	return nil
}

// Handle serves one POP3 client connection. It returns nil for ordinary
// ends (QUIT, client EOF, timeouts) since caddy-l4 logs any error at ERROR.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	edge, refusal, limit := h.admit(cx)
	if refusal != nil {
		h.refuse(cx, refusal, limit)
		return nil
	}
	if !h.proc.slots.take() {
		edge.release()
		h.proc.slots.warnFull(h.logger)
		h.refuse(cx, errTooManySessions, "too_many_sessions")
		return nil
	}
	growStack()
	s := newSession(h, cx, edge)
	return s.run()
}

// refuse answers a client turned away before its session starts (see
// slotCounter and Limits) and lets caddy-l4 close the connection. Nothing
// is read; on an implicit_tls port, where a plaintext -ERR would be
// garbage, the connection is only closed.
func (h *Handler) refuse(cx *layer4.Connection, re *replyError, result string) {
	h.proc.metrics.sessionRefused(result)
	if result != "too_many_sessions" {
		h.proc.metrics.limitRefused(result)
		if ce := h.logger.Check(zap.InfoLevel, "limit reached"); ce != nil {
			ce.Write(zap.String("remote", cx.RemoteAddr().String()), zap.String("limit", result))
		}
	}
	if h.ImplicitTLS {
		return
	}
	_ = cx.SetWriteDeadline(now().Add(refuseWriteTimeout))
	_, _ = cx.Write([]byte(re.line() + "\r\n"))
}

// growStack makes the goroutine's stack big enough for a login in one
// step, while the stack is shallow and cheap to copy: grown in the dial
// deep inside the login instead, Go copies it twice, adjusting every frame.
//
//go:noinline
func growStack() {
	var frame [loginStack]byte
	keep(frame[:])
}

// loginStack is about the stack a login uses below Handle.
const loginStack = 10 << 10

//go:noinline
func keep([]byte) {}

func (h *Handler) hasAuth(method string) bool {
	for _, m := range h.Auth {
		if m == method {
			return true
		}
	}
	return false
}

func isKnownAuthMethod(m string) bool {
	for _, k := range knownAuthMethods {
		if m == k {
			return true
		}
	}
	return false
}

// Interface guards
var (
	_ layer4.NextHandler    = (*Handler)(nil)
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.Validator       = (*Handler)(nil)
	_ caddy.CleanerUpper    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
