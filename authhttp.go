package pop3

import (
	"cmp"
	"context"
	"crypto/sha1" // Auth-SSL-Fingerprint is SHA-1 because NGINX's is; nothing is secured by it
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/opensslfmt"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// The auth_http client speaks the protocol of NGINX's
// ngx_mail_auth_http_module (src/mail/ngx_mail_auth_http_module.c,
// https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html) so that an
// auth server written for NGINX works unchanged. Where this code differs
// from NGINX it says so in a comment starting "Unlike NGINX".

const (
	// defaultAuthHTTPTimeout is NGINX's auth_http_timeout default
	// (ngx_conf_merge_msec_value(conf->timeout, prev->timeout, 60000)).
	defaultAuthHTTPTimeout = 60 * time.Second
	// authHTTPMaxHeaderBytes bounds the response header. Unlike NGINX, which
	// reads the whole answer into a 1024-byte buffer and fails past it, this
	// allows 16 KiB.
	authHTTPMaxHeaderBytes = 16 << 10
	// authHTTPMaxBody is how much of a body is read so that the connection
	// can be reused; a longer or unsized body is not read and the connection
	// is closed instead. NGINX ignores the body ("The data in the response
	// body is ignored").
	authHTTPMaxBody = 4 << 10
)

// errAuthHTTPResponse is wrapped by every error about an answer the auth
// server should not have sent; check puts "auth_http: asking <url>" before it.
var errAuthHTTPResponse = errors.New("invalid response")

// AuthHTTP asks an HTTP server, as NGINX's auth_http does, whether a login
// is allowed and which upstream serves the mailbox.
type AuthHTTP struct {
	// URL of the auth server, http:// or https://. Requests are GET with no
	// body; redirects are not followed.
	URL string `json:"url,omitempty"`
	// More auth servers, asked in order after URL when one cannot answer
	// (connection error, or an HTTP 5xx without Auth-Status), all within one
	// timeout. A server that could not answer is asked last for 10s.
	// Unlike NGINX, which takes one URL.
	URLs []string `json:"urls,omitempty"`
	// Header fields sent with every request, as NGINX's auth_http_header,
	// e.g. a shared secret. Names go out spelled as given. Values may hold
	// {env.*} placeholders. Names the proxy sends itself are refused.
	Header map[string]string `json:"header,omitempty"`
	// How long one request may take, from connecting to the end of the
	// response header. Default: 60s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Send the client's TLS certificate, PEM and URL-escaped, in
	// Auth-SSL-Cert (NGINX's auth_http_pass_client_cert). Default: false.
	PassClientCert bool `json:"pass_client_cert,omitempty"`
	// TLS settings for an https:// URL, as an upstream's or reverse_proxy's:
	// trust pool (ca), client certificate, server name, insecure skip
	// verify. Default: the system's roots, no client certificate.
	TLS *reverseproxy.TLSConfig `json:"tls,omitempty"`
	// Take a host name in Auth-Server too: it is resolved at login, within
	// timeout, and its first address used. Default: false, as NGINX, which
	// takes only IP addresses.
	ResolveAuthServer bool `json:"resolve_auth_server,omitempty"`

	client  *http.Client
	servers []*authHTTPServer // URL, then URLs
	failFor time.Duration     // how long a server that failed is asked last
	logger  *zap.Logger       // failovers; nil: none logged
	// lookup resolves an Auth-Server host name; nil: net.DefaultResolver.
	lookup func(ctx context.Context, host string) ([]netip.Addr, error)
}

// authHTTPServer is one auth server URL and when it last failed.
type authHTTPServer struct {
	url     string
	safeURL string       // url without user info or query, for error text
	failed  atomic.Int64 // Unix nanoseconds until which it is asked last; 0: never failed
}

// defaultAuthHTTPFailFor is how long an auth server that could not answer
// is asked only after the others.
const defaultAuthHTTPFailFor = 10 * time.Second

// authHTTPRequest is what one auth_http request says about a login.
type authHTTPRequest struct {
	// Method is the Auth-Method: "plain" (USER/PASS, AUTH PLAIN, AUTH
	// LOGIN), "apop", "cram-md5", "external" as NGINX, or "oauthbearer" and
	// "xoauth2", which NGINX does not have. "login" is sent as "plain".
	Method string
	// User and Pass are the client's user name and password; for apop and
	// cram-md5 Pass is the client's hex digest, for oauthbearer and xoauth2
	// the token, for external it is empty. Both go out URL-escaped.
	User, Pass string
	// Salt is the challenge the digest was made with (the APOP greeting
	// timestamp, angle brackets included); sent only for apop and cram-md5.
	Salt string
	// Attempt is Auth-Login-Attempt: 1 for the first login of a session,
	// counting every login command, not WAIT repeats.
	Attempt int
	// ClientIP is the client's address without port.
	ClientIP string
	// ClientPort is the client's port, ServerIP and ServerPort the address
	// the client connected to; "" omits the field.
	ClientPort, ServerIP, ServerPort string
	// ClientHost is the client's host name from a PTR lookup; "" omits
	// Client-Host, as NGINX does for POP3 (it resolves names only for SMTP).
	ClientHost string
	// TLS is the client connection's state; nil when it is plaintext.
	TLS *tls.ConnectionState
	// VerifyClient says the TLS config asks for client certificates (NGINX:
	// ssl_verify_client is not off); only then are Auth-SSL-Verify and, when
	// a certificate came, its details sent.
	VerifyClient bool
}

// authHTTPResult is the auth server's answer.
type authHTTPResult struct {
	// OK: log in to Address. Address is ip:port from Auth-Server and
	// Auth-Port, IPv6 in brackets.
	OK      bool
	Address string
	// Host is a host name Auth-Server gave, with resolve_auth_server; check
	// resolves it into Address.
	Host string
	// User and Pass replace the client's user name and password for the
	// upstream login when not empty (Auth-User, Auth-Pass; NGINX sends them
	// escaped but takes them back verbatim). Pass is always set for apop,
	// cram-md5 and external.
	User, Pass string
	// Retry: Auth-Status was WAIT. NGINX asks again after Wait (at once
	// when 0) with the same Auth-Login-Attempt, without telling the client.
	Retry bool
	// ErrorText is the Auth-Status of a refusal. NGINX sends it to a POP3
	// client as "-ERR <text>".
	ErrorText string
	// ErrorCode is Auth-Error-Code; NGINX uses it for SMTP only.
	ErrorCode string
	// Wait is Auth-Wait (whole seconds), HasWait whether a valid one came. On a
	// refusal NGINX waits this long, sends the error and lets the client try
	// again; when Wait is 0 or absent it sends the error and closes the
	// connection.
	Wait    time.Duration
	HasWait bool
}

// Header names the client sends itself; auth_http_header may not repeat
// them. Compared case-insensitively.
var authHTTPReservedHeaders = []string{
	"Host", "Connection", "Content-Length", "Transfer-Encoding", "Trailer",
	"Auth-Method", "Auth-User", "Auth-Pass", "Auth-Salt", "Auth-Protocol",
	"Auth-Login-Attempt", "Client-IP", "Client-Host", "Auth-SSL",
	"Client-Port", "Server-IP", "Server-Port",
}

// setup expands {env.*} in the header values, which keeps secrets out of
// the config file, then provisions the client. ctx loads the TLS trust pool
// and client certificate.
func (c *AuthHTTP) setup(ctx caddy.Context) error {
	repl := caddy.NewReplacer()
	for name, v := range c.Header {
		c.Header[name] = repl.ReplaceAll(v, "")
	}
	if err := c.provision(ctx); err != nil {
		return fmt.Errorf("auth_http: %w", err)
	}
	return nil
}

// provision applies defaults, checks the configuration and builds the HTTP
// client. No error holds the URL's user info or a header value.
func (c *AuthHTTP) provision(ctx caddy.Context) error {
	if c.Timeout == 0 {
		c.Timeout = caddy.Duration(defaultAuthHTTPTimeout)
	}
	if c.Timeout < 0 {
		return errors.New("auth_http: timeout must not be negative")
	}
	urls := c.URLs
	if c.URL != "" || len(c.URLs) == 0 {
		urls = append([]string{c.URL}, c.URLs...)
	}
	c.servers = nil
	https := false
	for i, raw := range urls {
		field := "url"
		if c.URL == "" {
			field = fmt.Sprintf("urls %d", i)
		} else if i > 0 {
			field = fmt.Sprintf("urls %d", i-1)
		}
		srv, err := newAuthHTTPServer(raw)
		if err != nil {
			return fmt.Errorf("auth_http: %s: %w", field, err)
		}
		for _, other := range c.servers {
			if other.url == srv.url {
				return fmt.Errorf("auth_http: %s: given twice", field)
			}
		}
		https = https || strings.HasPrefix(srv.safeURL, "https:")
		c.servers = append(c.servers, srv)
	}
	if c.failFor == 0 {
		c.failFor = defaultAuthHTTPFailFor
	}
	for name, value := range c.Header {
		if !validHeaderName(name) {
			return fmt.Errorf("auth_http: header %q: invalid name", name)
		}
		if isReservedAuthHTTPHeader(name) {
			// Unlike NGINX, which would send the field twice.
			return fmt.Errorf("auth_http: header %q: sent by the proxy itself", name)
		}
		if hasControl(value) {
			return fmt.Errorf("auth_http: header %q: value holds a control character", name)
		}
	}

	timeout := time.Duration(c.Timeout)
	transport := &http.Transport{
		// Never through an HTTP proxy from the environment: the request holds
		// passwords, and NGINX connects directly too.
		Proxy:                  nil,
		DialContext:            (&net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:    timeout,
		MaxResponseHeaderBytes: authHTTPMaxHeaderBytes,
		// Go would add Accept-Encoding: gzip, which NGINX does not send.
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
	}
	// HTTP/1.1 only: HTTP/2 lower-cases field names on the wire, and auth
	// servers written for NGINX may compare them case-sensitively.
	transport.Protocols = new(http.Protocols)
	transport.Protocols.SetHTTP1(true)
	if c.TLS != nil {
		if !https {
			return errors.New("auth_http: tls: needs an https:// url")
		}
		cfg, err := c.TLS.MakeTLSClientConfig(ctx)
		if err != nil {
			return fmt.Errorf("auth_http: tls: %w", err)
		}
		transport.TLSClientConfig = cfg
	}
	c.client = &http.Client{
		Transport: transport,
		// As NGINX, which reads only the headers of whatever status comes.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return nil
}

// cleanup closes idle connections to the auth server.
func (c *AuthHTTP) cleanup() {
	if c.client != nil {
		c.client.CloseIdleConnections()
	}
}

// check asks the auth server about one login. A refusal is a result with
// OK false; an error means no decision could be had (server down, too slow,
// or an answer NGINX would also reject). Errors never hold the password,
// salt, token or a configured header value.
//
// With several servers, one that cannot answer (connection error, or a 5xx
// without Auth-Status, as a load balancer's error page) is followed by the
// next within the same timeout; the ones that failed in the last failFor are
// asked after the others. Every answer with Auth-Status counts, refusals
// included.
func (c *AuthHTTP) check(ctx context.Context, r authHTTPRequest) (authHTTPResult, error) {
	timeout := time.Duration(c.Timeout)
	reqCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var errs []error
	for _, srv := range c.order() {
		res, failover, err := c.ask(reqCtx, srv, r)
		if err == nil {
			if res.Host != "" {
				return c.resolve(ctx, srv, res)
			}
			return res, nil
		}
		errs = append(errs, err)
		if !failover || ctx.Err() != nil {
			break // not the server's fault, or the session gave up
		}
		srv.failed.Store(now().Add(c.failFor).UnixNano())
		if reqCtx.Err() != nil {
			break // the timeout is spent
		}
		if c.logger != nil && len(c.servers) > 1 {
			// err holds the URL without user info or query, and no field.
			c.logger.Warn("auth_http: server could not answer, asked last for a while",
				zap.String("auth_server", srv.safeURL), zap.Duration("for", c.failFor), zap.Error(err))
		}
	}
	return authHTTPResult{}, errors.Join(errs...)
}

// order returns the servers to ask: the ones that did not fail lately in
// their configured order, then the others, longest failed first.
func (c *AuthHTTP) order() []*authHTTPServer {
	if len(c.servers) == 1 {
		return c.servers
	}
	t := now().UnixNano()
	ordered := make([]*authHTTPServer, 0, len(c.servers))
	var failed []*authHTTPServer
	for _, srv := range c.servers {
		if srv.failed.Load() > t {
			failed = append(failed, srv)
		} else {
			ordered = append(ordered, srv)
		}
	}
	slices.SortStableFunc(failed, func(a, b *authHTTPServer) int { return cmp.Compare(a.failed.Load(), b.failed.Load()) })
	return append(ordered, failed...)
}

// ask puts one request to one server. failover says the error is the
// server's (it could not answer), so the next one may be asked.
func (c *AuthHTTP) ask(ctx context.Context, srv *authHTTPServer, r authHTTPRequest) (_ authHTTPResult, failover bool, _ error) {
	req, err := c.newRequest(ctx, srv.url, r)
	if err != nil {
		return authHTTPResult{}, false, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		// url.Error repeats the URL, which may hold user info or a query.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
			return authHTTPResult{}, true, fmt.Errorf("auth_http: %s did not answer within %s: %w", srv.safeURL, time.Duration(c.Timeout), err)
		}
		return authHTTPResult{}, true, fmt.Errorf("auth_http: asking %s: %w", srv.safeURL, scrubTransportError(err))
	}
	if resp.ContentLength >= 0 && resp.ContentLength <= authHTTPMaxBody {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, authHTTPMaxBody))
	}
	_ = resp.Body.Close()

	res, err := parseAuthHTTPResponse(resp, authHTTPMethodName(r.Method), c.ResolveAuthServer)
	if err != nil {
		failover = resp.StatusCode >= 500 && len(resp.Header.Values("Auth-Status")) == 0
		return authHTTPResult{}, failover, fmt.Errorf("auth_http: asking %s: %w", srv.safeURL, err)
	}
	return res, false, nil
}

// resolve looks up the host name in res.Host, bounded by the timeout, and
// puts its first address into res.Address. A failed lookup is no reason to
// ask another auth server: the answer was given.
func (c *AuthHTTP) resolve(ctx context.Context, srv *authHTTPServer, res authHTTPResult) (authHTTPResult, error) {
	timeout := time.Duration(c.Timeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	lookup := c.lookup
	if lookup == nil {
		lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	addrs, err := lookup(ctx, res.Host)
	if err == nil && len(addrs) == 0 {
		err = errors.New("no address")
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
			err = fmt.Errorf("no answer within %s: %w", timeout, err)
		}
		return authHTTPResult{}, fmt.Errorf("auth_http: %s named Auth-Server %q: resolving it: %w", srv.safeURL, res.Host, err)
	}
	_, port, _ := net.SplitHostPort(res.Address)
	res.Address = net.JoinHostPort(addrs[0].Unmap().String(), port)
	res.Host = ""
	return res, nil
}

// newAuthHTTPServer checks one auth server URL. No error holds the URL.
func newAuthHTTPServer(raw string) (*authHTTPServer, error) {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return nil, errors.New("not a valid URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		// Unlike NGINX, which takes http only (no TLS) and unix: sockets.
		return nil, errors.New("scheme must be http or https")
	}
	if u.Hostname() == "" {
		return nil, errors.New("host missing")
	}
	return &authHTTPServer{url: raw, safeURL: (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()}, nil
}

// newRequest builds the GET request with NGINX's fields.
//
// Unlike NGINX, which writes "GET <uri> HTTP/1.0" and closes the connection,
// Go sends HTTP/1.1 and keeps connections alive; servers written for NGINX
// (nginx http, PHP, Python, Go, Node) answer both. Go also writes the fields
// sorted by name after Host rather than in NGINX's order (Auth-Method,
// Auth-User, Auth-Pass, Auth-Salt, Auth-Protocol, Auth-Login-Attempt,
// Client-IP, Client-Host, Auth-SSL*, configured fields); HTTP gives field
// order no meaning. Host carries the port when the URL has a non-default
// one (RFC 9110 §7.2), where NGINX sends the host name alone.
func (c *AuthHTTP) newRequest(ctx context.Context, rawURL string, r authHTTPRequest) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, errors.New("auth_http: building request: invalid url") // err would repeat the URL
	}
	// Fields are set by direct map assignment to keep NGINX's spelling:
	// Header.Set would canonicalise Auth-SSL-Verify to Auth-Ssl-Verify.
	h := req.Header
	set := func(name, value string) { h[name] = append(h[name], stripControl(value)) }

	method := authHTTPMethodName(r.Method)
	set("Auth-Method", method)
	set("Auth-User", escapeMailAuth(r.User))
	set("Auth-Pass", escapeMailAuth(r.Pass))
	if (method == AuthAPOP || method == AuthCRAMMD5) && r.Salt != "" {
		set("Auth-Salt", r.Salt)
	}
	set("Auth-Protocol", "pop3")
	set("Auth-Login-Attempt", strconv.Itoa(max(r.Attempt, 1)))
	set("Client-IP", r.ClientIP)
	if r.ClientHost != "" {
		set("Client-Host", clientHostValue(r.ClientHost))
	}
	// Unlike NGINX, which sends neither the client's port nor the address
	// it was reached at (only Proxy-Protocol-Port and
	// Proxy-Protocol-Server-Addr/-Port, and only for a connection that came
	// with a PROXY protocol header). Auth servers use them to tell listeners
	// apart and to match firewall or NAT logs; the formats follow Client-IP
	// (no brackets around IPv6) and Proxy-Protocol-Port (decimal).
	if r.ClientPort != "" {
		set("Client-Port", r.ClientPort)
	}
	if r.ServerIP != "" && r.ServerPort != "" {
		set("Server-IP", r.ServerIP)
		set("Server-Port", r.ServerPort)
	}
	if st := r.TLS; st != nil {
		set("Auth-SSL", "on")
		if v := opensslfmt.ProtocolName(st.Version); v != "" {
			set("Auth-SSL-Protocol", v)
		}
		if v := opensslfmt.CipherName(st.CipherSuite); v != "" {
			set("Auth-SSL-Cipher", v)
		}
		var cert *x509.Certificate
		if len(st.PeerCertificates) > 0 {
			cert = st.PeerCertificates[0]
		}
		if r.VerifyClient || cert != nil {
			set("Auth-SSL-Verify", clientVerifyResult(st))
		}
		if cert != nil {
			if v := opensslfmt.DN(cert.RawSubject); v != "" {
				set("Auth-SSL-Subject", v)
			}
			if v := opensslfmt.DN(cert.RawIssuer); v != "" {
				set("Auth-SSL-Issuer", v)
			}
			set("Auth-SSL-Serial", opensslfmt.Serial(cert))
			sum := sha1.Sum(cert.Raw)
			set("Auth-SSL-Fingerprint", hex.EncodeToString(sum[:]))
			if c.PassClientCert {
				pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
				set("Auth-SSL-Cert", escapeMailAuth(string(pemCert)))
			}
		}
	}
	for name, value := range c.Header {
		if strings.EqualFold(name, "User-Agent") {
			name = "User-Agent" // the spelling net/http looks for
		}
		set(name, value)
	}
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = []string{""} // an empty User-Agent is not sent; NGINX sends none
	}
	return req, nil
}

// parseAuthHTTPResponse reads the decision from the response fields.
//
// As NGINX (ngx_mail_auth_http_ignore_status_line), the HTTP status code is
// not looked at: only the fields count, whatever the status. Where a field
// comes more than once the last one wins, as NGINX overwrites.
//
// With names, Auth-Server may be a host name, returned in Host (and in
// Address with the port) for the caller to resolve.
func parseAuthHTTPResponse(resp *http.Response, method string, names bool) (authHTTPResult, error) {
	h := resp.Header
	var res authHTTPResult
	for _, v := range h.Values("Auth-Wait") {
		// ngx_atoi: digits only; an invalid value is ignored.
		if n, ok := parseDecimal(v); ok && n <= math.MaxInt64/int64(time.Second) {
			res.Wait, res.HasWait = time.Duration(n)*time.Second, true
		}
	}
	statuses := h.Values("Auth-Status")
	if len(statuses) == 0 {
		// Unlike NGINX, which goes on to look for Auth-Server and Auth-Port
		// when Auth-Status is missing: an answer that does not say OK is not
		// taken as one.
		return authHTTPResult{}, fmt.Errorf("%w: no Auth-Status (HTTP status %d)", errAuthHTTPResponse, resp.StatusCode)
	}
	var refused bool
	for _, s := range statuses {
		switch s {
		case "OK":
		case "WAIT":
			res.Retry = true
		default:
			// Any other text is a refusal, even next to an OK; the last
			// one is what the client sees.
			refused, res.ErrorText = true, stripControl(s)
		}
	}
	if refused {
		res.Retry = false
		res.ErrorCode = stripControl(lastValue(h, "Auth-Error-Code"))
		return res, nil
	}
	if res.Retry {
		return res, nil
	}

	server, port := lastValue(h, "Auth-Server"), lastValue(h, "Auth-Port")
	if server == "" || port == "" {
		return authHTTPResult{}, fmt.Errorf("%w: Auth-Server or Auth-Port missing", errAuthHTTPResponse)
	}
	host := ""
	addr, ok := parseAuthServer(server)
	switch {
	case ok:
		host = addr.String()
	case names && isHostName(server):
		host, res.Host = server, server
	case names:
		return authHTTPResult{}, fmt.Errorf("%w: Auth-Server %q is neither an IP address nor a host name", errAuthHTTPResponse, stripControl(server))
	default:
		// As NGINX (ngx_parse_addr): an IP address, not a host name.
		return authHTTPResult{}, fmt.Errorf("%w: Auth-Server %q is not an IP address", errAuthHTTPResponse, server)
	}
	n, ok := parseDecimal(port)
	if !ok || n < 1 || n > 65535 {
		return authHTTPResult{}, fmt.Errorf("%w: Auth-Port %q is not a port", errAuthHTTPResponse, port)
	}
	res.User, res.Pass = lastValue(h, "Auth-User"), lastValue(h, "Auth-Pass")
	// Unlike NGINX, which copies these verbatim into the upstream login:
	// a control byte there would end the command and smuggle another.
	if hasControl(res.User) {
		return authHTTPResult{}, fmt.Errorf("%w: Auth-User holds a control character", errAuthHTTPResponse)
	}
	if hasControl(res.Pass) {
		return authHTTPResult{}, fmt.Errorf("%w: Auth-Pass holds a control character", errAuthHTTPResponse)
	}
	if res.Pass == "" && (method == AuthAPOP || method == AuthCRAMMD5 || method == AuthExternal) {
		// NGINX: "auth http server ... did not send password"; the proxy has
		// no password of its own to log in with.
		return authHTTPResult{}, fmt.Errorf("%w: no Auth-Pass for method %s", errAuthHTTPResponse, method)
	}
	res.OK = true
	res.Address = net.JoinHostPort(host, strconv.FormatInt(n, 10))
	res.Wait, res.HasWait = 0, false
	return res, nil
}

// scrubTransportError keeps errors about the connection (refused, reset,
// DNS, TLS, EOF, cancelled) and replaces any other: net/http quotes the
// offending response line in its parse errors ("malformed MIME header line:
// \"Auth-Pass: ...\""), and that line can hold a password.
func scrubTransportError(err error) error {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.As(err, new(*net.OpError)), errors.As(err, new(*net.DNSError)),
		errors.As(err, new(*tls.CertificateVerificationError)), errors.As(err, new(tls.RecordHeaderError)),
		errors.As(err, new(tls.AlertError)), errors.As(err, new(x509.UnknownAuthorityError)),
		errors.As(err, new(x509.HostnameError)), errors.As(err, new(x509.CertificateInvalidError)):
		return err
	case strings.Contains(err.Error(), "response headers exceeded"):
		return fmt.Errorf("%w: response header over %d bytes", errAuthHTTPResponse, authHTTPMaxHeaderBytes)
	}
	return fmt.Errorf("%w: malformed HTTP response", errAuthHTTPResponse)
}

// authHTTPMethodName maps a login method to NGINX's Auth-Method value
// (ngx_mail_auth_http_method: LOGIN is "plain").
func authHTTPMethodName(m string) string {
	m = strings.ToLower(m)
	if m == "login" {
		return AuthPlain
	}
	return m
}

// escapeMailAuth escapes as ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH), used by
// NGINX for Auth-User, Auth-Pass and Auth-SSL-Cert: bytes 0x00-0x1F, space
// and '%' become %XX (upper-case hex); everything else, UTF-8 included,
// stays. Unlike NGINX, DEL (0x7F) is escaped too: sent raw it is a control
// byte that Go refuses in a field and some servers take as the line's end.
func escapeMailAuth(s string) string {
	const hexDigits = "0123456789ABCDEF"
	n := 0
	for i := 0; i < len(s); i++ {
		if mailAuthEscaped(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if mailAuthEscaped(c) {
			b.WriteByte('%')
			b.WriteByte(hexDigits[c>>4])
			b.WriteByte(hexDigits[c&0xf])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func mailAuthEscaped(c byte) bool { return isControl(c) || c == ' ' || c == '%' }

// clientHostValue checks a resolved client name as NGINX does since the
// fix for CVE-2026-28753 (ngx_mail_smtp_validate_host: RFC 1034 §3.5
// letters, digits, '-' and '.'); a name with any other byte is sent as
// "[TEMPUNAVAIL]", as NGINX does. NGINX's own placeholders pass.
func clientHostValue(name string) string {
	if name == "[UNAVAILABLE]" || name == "[TEMPUNAVAIL]" {
		return name
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' {
			continue
		}
		return "[TEMPUNAVAIL]"
	}
	return name
}

// isHostName reports whether s is a DNS host name: dot-separated labels of
// letters, digits, '-' and '_' (RFC 1123 §2.1, with the underscore some
// internal names carry), each 1 to 63 bytes, 253 in all, a trailing dot
// allowed, not all digits and dots (that would be a malformed address).
func isHostName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	letter := false
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '-', c == '_':
				letter = true
			case c >= '0' && c <= '9':
			default:
				return false
			}
		}
	}
	return letter
}

// validHeaderName reports whether name is an RFC 9110 token.
func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func isReservedAuthHTTPHeader(name string) bool {
	for _, r := range authHTTPReservedHeaders {
		if strings.EqualFold(name, r) {
			return true
		}
	}
	lower := strings.ToLower(name)
	return strings.HasPrefix(lower, "auth-ssl-") || strings.HasPrefix(lower, "proxy-protocol-")
}

// lastValue returns the last value of a response field, "" if absent.
func lastValue(h http.Header, name string) string {
	vv := h.Values(name)
	if len(vv) == 0 {
		return ""
	}
	return vv[len(vv)-1]
}

// parseDecimal parses as ngx_atoi: one or more ASCII digits, no sign, no
// overflow.
func parseDecimal(s string) (int64, bool) {
	if s == "" {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		if n > (math.MaxInt64-int64(c-'0'))/10 {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// parseAuthServer takes an IPv4 or IPv6 address without zone. Unlike
// NGINX, an IPv6 address in brackets is taken as well.
func parseAuthServer(s string) (netip.Addr, bool) {
	if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' {
		s = s[1 : len(s)-1]
	}
	addr, err := netip.ParseAddr(s)
	if err != nil || addr.Zone() != "" {
		return netip.Addr{}, false
	}
	return addr.Unmap(), true
}

// clientVerifyResult is Auth-SSL-Verify as ngx_ssl_get_client_verify gives
// it: NONE without a certificate, SUCCESS for a verified one. crypto/tls
// fails the handshake when a certificate it was asked to verify does not
// verify, so a certificate without verified chains is one nobody checked
// (client_auth mode request or require, NGINX's optional_no_ca). OpenSSL
// would name its own reason there; this names a fixed one.
func clientVerifyResult(st *tls.ConnectionState) string {
	switch {
	case len(st.PeerCertificates) == 0:
		return "NONE"
	case len(st.VerifiedChains) > 0:
		return "SUCCESS"
	default:
		return "FAILED:certificate not verified"
	}
}

// authHTTPAuthenticator asks the auth server about each login (NGINX's
// auth_http) and logs in where it says, with the credentials it gives.
type authHTTPAuthenticator struct {
	a            *AuthHTTP
	verifyClient bool // a connection policy asks for client certificates
}

// maxAuthHTTPRetries bounds Auth-Status: WAIT answers for one login; NGINX
// has no bound.
const maxAuthHTTPRetries = 5

func (x authHTTPAuthenticator) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	if req.creds.Identity != "" && req.creds.Identity != req.creds.Username {
		// The auth server approves Auth-User alone (NGINX's protocol has no
		// field for an authorization identity); sent upstream with its
		// Auth-User and Auth-Pass, which may be master credentials, it would
		// open another user's mailbox.
		return loginTarget{}, errAuthzidRefused
	}
	clientIP, clientPort := splitAddr(req.remote)
	serverIP, serverPort := splitAddr(req.local)
	areq := authHTTPRequest{
		Method:       req.method,
		User:         req.creds.Username,
		Pass:         req.creds.Password,
		Salt:         req.salt,
		Attempt:      req.attempt,
		ClientIP:     clientIP,
		ClientPort:   clientPort,
		ServerIP:     serverIP,
		ServerPort:   serverPort,
		TLS:          req.tls,
		VerifyClient: x.verifyClient || (req.tls != nil && len(req.tls.PeerCertificates) > 0),
	}
	var res authHTTPResult
	for retry := 0; ; retry++ {
		var err error
		res, err = x.a.check(ctx, areq)
		if err != nil {
			return loginTarget{}, fmt.Errorf("%w: %w", errAuthServer, err)
		}
		if !res.Retry {
			break
		}
		if retry == maxAuthHTTPRetries {
			return loginTarget{}, fmt.Errorf("%w: still WAIT after %d retries", errAuthServer, retry)
		}
		t := time.NewTimer(min(res.Wait, maxFailureDelay))
		select {
		case <-t.C:
		case <-ctx.Done(): // the session was kicked or ran out of time
			t.Stop()
			return loginTarget{}, fmt.Errorf("%w: %w", errAuthServer, ctx.Err())
		}
	}
	if !res.OK {
		return loginTarget{}, refusalFromAuthServer(res)
	}
	creds := sasl.Credentials{Username: req.creds.Username, Password: req.creds.Password}
	if res.User != "" {
		creds.Username = res.User
	}
	switch {
	case res.Pass != "":
		creds.Password = res.Pass
	case req.method != AuthPlain:
		// A digest, token or certificate is no password for the upstream;
		// NGINX refuses the same way.
		return loginTarget{}, fmt.Errorf("%w: no Auth-Pass for method %s", errAuthServer, req.method)
	}
	if creds.Username == "" {
		return loginTarget{}, fmt.Errorf("%w: no Auth-User for a login without a user name", errAuthServer)
	}
	return loginTarget{address: res.Address, creds: creds}, nil
}

// splitAddr returns the host and port of a TCP address, both "" for an
// address without them (a pipe, a Unix socket, nil).
func splitAddr(a net.Addr) (host, port string) {
	if a == nil {
		return "", ""
	}
	host, port, err := net.SplitHostPort(a.String())
	if err != nil || host == "" {
		return "", ""
	}
	return host, port
}

// refusalFromAuthServer turns Auth-Status and Auth-Error-Code into the
// client's -ERR. The text is the auth server's, as NGINX shows it; an RFC
// 2449 code comes from Auth-Error-Code or a leading "[CODE]" in the text,
// else [AUTH].
func refusalFromAuthServer(res authHTTPResult) *Refusal {
	text := sanitizeReplyText(res.ErrorText)
	code := ""
	if strings.HasPrefix(text, "[") {
		if end := strings.IndexByte(text, ']'); end > 1 {
			code, text = text[1:end], strings.TrimSpace(text[end+1:])
		}
	}
	if c := strings.Trim(sanitizeReplyText(res.ErrorCode), "[] "); isResponseCode(c) {
		code = c
	}
	if !isResponseCode(code) {
		code = codeAuth
	}
	if text == "" {
		text = errAuthFailed.text
	}
	return &Refusal{Code: code, Text: text, Wait: res.Wait, HasWait: res.HasWait}
}
