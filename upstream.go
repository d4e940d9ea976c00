package pop3

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// upstreamLineLimit bounds a line from the upstream during login.
const upstreamLineLimit = 8192

// upstreamDialer opens a connection to an upstream POP3 server.
type upstreamDialer interface {
	dial(ctx context.Context, address string, deadline time.Time) (net.Conn, error)
}

// tcpDialer dials plain TCP with a timeout.
type tcpDialer struct{ timeout time.Duration }

func (d *tcpDialer) dial(ctx context.Context, address string, deadline time.Time) (net.Conn, error) {
	// No TCP keep-alive, as NGINX's mail proxy: proxy_timeout ends idle
	// sessions, and the four setsockopt calls are a tenth of a login's.
	// The deadline is the Dialer's, not a context's: a context with a
	// deadline costs a timer and a cancellation hook in every dial.
	nd := net.Dialer{Timeout: d.timeout, Deadline: deadline, KeepAlive: -1}
	return nd.DialContext(ctx, "tcp", address)
}

// errAuthzidUnsupported answers an authorization identity for an upstream
// without AUTH PLAIN, where USER/PASS cannot carry it.
var errAuthzidUnsupported = &replyError{code: codeAuth, text: "Authorization identity not supported"}

// errUpstreamProtocol marks an upstream that does not speak POP3 as expected.
var errUpstreamProtocol = errors.New("upstream protocol error")

// normalizeUpstreamAddress adds the POP3 port when the address has none.
func normalizeUpstreamAddress(addr string) (string, error) {
	return normalizeUpstreamAddressPort(addr, "110")
}

// normalizeUpstreamAddressPort adds port when the address has none.
func normalizeUpstreamAddressPort(addr, port string) (string, error) {
	if addr == "" {
		return "", errors.New("address missing")
	}
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr, nil
	}
	if strings.Count(addr, ":") > 1 && !strings.HasPrefix(addr, "[") {
		return net.JoinHostPort(addr, port), nil // bare IPv6 literal
	}
	if _, _, err := net.SplitHostPort(addr + ":" + port); err != nil {
		return "", fmt.Errorf("invalid address %q: %w", addr, err)
	}
	return addr + ":" + port, nil
}

// upstreamClient is the client side of POP3 towards one upstream: dialled,
// greeted and asked for CAPA by connectUpstream, then logged in.
type upstreamClient struct {
	address   string
	conn      net.Conn
	r         *pop3wire.Reader // after login it may hold bytes the upstream sent after its +OK
	w         *bufio.Writer
	timestamp string          // APOP timestamp from the greeting, "" if none
	mechs     map[string]bool // SASL mechanisms from CAPA
	onClose   func()          // releases the pool's count of this connection
	closeOnce sync.Once

	xclientRefused string // the upstream's -ERR text to XCLIENT, for a warning
}

// upstreamOptions say how to talk to one upstream.
type upstreamOptions struct {
	tls           *tls.Config // nil: plaintext
	startTLS      bool        // with tls: STLS after the greeting instead of TLS from the start
	proxyProtocol string      // "", "v1" or "v2": send the client's address first
	xclient       bool        // send XCLIENT ADDR/PORT before login
	skipCAPA      bool        // health checks need only the greeting
	capas         *capaCache  // the upstreams' SASL mechanisms; nil with skipCAPA
}

// dialClient is the client a connection is made for: its address goes
// upstream by PROXY protocol or XCLIENT. The zero value is no client (a
// health check).
type dialClient struct {
	remote, local net.Addr
}

// connectUpstream dials address, sends the PROXY header, does TLS or STLS,
// reads the greeting, sends XCLIENT and asks CAPA, all before deadline.
func connectUpstream(ctx context.Context, dialer upstreamDialer, address string, o upstreamOptions, client dialClient, deadline time.Time) (*upstreamClient, error) {
	conn, err := dialer.dial(ctx, address, deadline)
	if err != nil {
		return nil, fmt.Errorf("dialing upstream: %w", err)
	}
	_ = conn.SetDeadline(deadline) // bounds the TLS handshake and the rest too
	// A deadline cannot be moved by a kicked session or a stopped health
	// check; closing ends a greeting or CAPA that is still being read.
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	c := &upstreamClient{address: address, conn: conn}
	if err := c.setup(ctx, o, client); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}

func (c *upstreamClient) setup(ctx context.Context, o upstreamOptions, client dialClient) error {
	if o.proxyProtocol != "" {
		version := byte(1)
		if o.proxyProtocol == "v2" {
			version = 2
		}
		// With no client, a LOCAL header ("PROXY UNKNOWN" in v1): the
		// connection is the proxy's own, and a listener that expects a
		// header waits for one before it greets.
		header := &proxyproto.Header{Version: version, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
		if client.remote != nil {
			header = proxyproto.HeaderProxyFromAddrs(version, client.remote, client.local)
		}
		if _, err := header.WriteTo(c.conn); err != nil {
			return fmt.Errorf("sending PROXY header: %w", err)
		}
	}
	if o.tls != nil && !o.startTLS {
		if err := c.startTLS(ctx, o.tls); err != nil {
			return err
		}
	}
	c.r = pop3wire.NewReader(c.conn, upstreamLineLimit)
	c.w = pop3wire.NewWriter(c.conn)
	greeting, err := c.readResponse()
	if err != nil {
		return fmt.Errorf("reading upstream greeting: %w", err)
	}
	if !greeting.OK || greeting.Continuation {
		return fmt.Errorf("%w: upstream greeting is -ERR [%s] %s", errUpstreamProtocol, sanitizeReplyText(greeting.Code), sanitizeReplyText(greeting.Text))
	}
	c.timestamp = apopTimestamp(greeting.Text)
	if o.tls != nil && o.startTLS {
		if err := c.cmd("STLS"); err != nil {
			return err
		}
		resp, err := c.readResponse()
		if err != nil {
			return err
		}
		if !resp.OK {
			return fmt.Errorf("%w: STLS refused: %s", errUpstreamProtocol, sanitizeReplyText(resp.Text))
		}
		if c.r.Buffered() > 0 {
			return fmt.Errorf("%w: data after STLS reply", errUpstreamProtocol)
		}
		if err := c.startTLS(ctx, o.tls); err != nil {
			return err
		}
		c.releaseBuffers()
		c.r = pop3wire.NewReader(c.conn, upstreamLineLimit)
		c.w = pop3wire.NewWriter(c.conn)
	}
	if o.xclient && client.remote != nil {
		if err := c.xclient(client.remote); err != nil {
			return err
		}
	}
	if o.skipCAPA {
		return nil
	}
	key := capaKey{address: c.address, tls: o.tls, startTLS: o.startTLS, proxyProtocol: o.proxyProtocol, xclient: o.xclient}
	if (o.proxyProtocol != "" || o.xclient) && client.remote != nil {
		// The upstream answers for the client it was told of: Dovecot
		// offers plaintext logins only to a trusted or secured one.
		key.client = addrOf(client.remote)
	}
	if mechs, ok := o.capas.get(key); ok {
		c.mechs = mechs
		return nil
	}
	if c.mechs, err = c.capa(); err == nil {
		o.capas.put(key, c.mechs)
	}
	return err
}

const (
	capaTTL        = time.Minute
	capaCacheLimit = 4096 // addresses from an auth server are not bounded by the config
)

// capaKey holds everything that may change what an upstream answers CAPA.
type capaKey struct {
	address       string
	tls           *tls.Config // the TLS identity: server name, client certificate, roots
	startTLS      bool
	proxyProtocol string
	xclient       bool
	client        netip.Addr // with PROXY or XCLIENT: the client the upstream was told of
}

func addrOf(a net.Addr) netip.Addr {
	if t, ok := a.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(t.IP)
		return ip.Unmap()
	}
	if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

type capaEntry struct {
	mechs map[string]bool
	at    time.Time
}

// capaCache remembers each upstream's SASL mechanisms for a minute, so that
// a login costs no CAPA round trip (NGINX asks none at all). A nil cache
// remembers nothing.
type capaCache struct {
	mu sync.Mutex
	m  map[capaKey]capaEntry
}

func (c *capaCache) get(k capaKey) (map[string]bool, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok || now().Sub(e.at) > capaTTL {
		return nil, false
	}
	return e.mechs, true
}

func (c *capaCache) put(k capaKey, mechs map[string]bool) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= capaCacheLimit {
		clear(c.m)
	}
	c.m[k] = capaEntry{mechs: mechs, at: now()}
}

// startTLS wraps the connection in TLS as a client, verifying the upstream's
// certificate against tls_server_name or the address's host.
func (c *upstreamClient) startTLS(ctx context.Context, cfg *tls.Config) error {
	if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
		cfg = cfg.Clone()
		cfg.ServerName, _, _ = net.SplitHostPort(c.address)
	}
	tc := tls.Client(c.conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake with upstream: %w", err)
	}
	c.conn = tc
	return nil
}

// xclient tells the upstream the client's address (Dovecot trusts it from
// login_trusted_networks). A refusal is logged by the caller's warning but
// does not fail the login: the upstream then sees the proxy's address.
func (c *upstreamClient) xclient(remote net.Addr) error {
	ap, err := netip.ParseAddrPort(remote.String())
	if err != nil {
		return nil
	}
	if err := c.cmd(fmt.Sprintf("XCLIENT ADDR=%s PORT=%d", ap.Addr().Unmap(), ap.Port())); err != nil {
		return err
	}
	resp, err := c.readResponse()
	if err != nil {
		return err
	}
	if !resp.OK {
		c.xclientRefused = resp.Text
	}
	return nil
}

// maxTimestampLength bounds an upstream's APOP timestamp; Dovecot's is
// about 50 bytes.
const maxTimestampLength = 200

// apopTimestamp finds an RFC 1939 §7 timestamp "<...@...>" in a greeting.
func apopTimestamp(text string) string {
	start := strings.IndexByte(text, '<')
	if start < 0 {
		return ""
	}
	end := strings.IndexByte(text[start:], '>')
	if end < 0 {
		return ""
	}
	ts := text[start : start+end+1]
	// It goes into the client's greeting: one short word of printable
	// ASCII, as an RFC 5322 msg-id is.
	if !strings.Contains(ts, "@") || len(ts) > maxTimestampLength || strings.ContainsFunc(ts, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
		return ""
	}
	return ts
}

func (c *upstreamClient) close() {
	_ = c.conn.Close()
	c.closeOnce.Do(func() {
		c.releaseBuffers()
		if c.onClose != nil {
			c.onClose()
		}
	})
}

// releaseBuffers returns the line buffers to their pools.
func (c *upstreamClient) releaseBuffers() {
	c.r.Release()
	pop3wire.ReleaseWriter(c.w)
	c.r, c.w = nil, nil
}

// quit ends a connection after a refused login; the answer does not matter.
func (c *upstreamClient) quit() {
	_ = c.cmd("QUIT")
	c.close()
}

func (c *upstreamClient) setDeadline(t time.Time) { _ = c.conn.SetDeadline(t) }

func (c *upstreamClient) cmd(line string) error {
	if _, err := c.w.WriteString(line + "\r\n"); err != nil {
		return err
	}
	return c.w.Flush()
}

func (c *upstreamClient) readResponse() (pop3wire.Response, error) {
	line, err := c.r.ReadLine()
	if err != nil {
		return pop3wire.Response{}, fmt.Errorf("reading upstream response: %w", err)
	}
	resp, err := pop3wire.ParseResponse(line)
	if err != nil {
		return resp, fmt.Errorf("%w: %w", errUpstreamProtocol, err)
	}
	return resp, nil
}

// checkCredentials refuses values that would end or split an upstream
// command line: a SASL-decoded name can hold any byte.
func checkCredentials(c sasl.Credentials) error {
	if c.Username == "" || pop3wire.ContainsLineBreakOrNUL(c.Username) ||
		pop3wire.ContainsLineBreakOrNUL(c.Password) || pop3wire.ContainsLineBreakOrNUL(c.Identity) {
		return errBadCredentials
	}
	return nil
}

// login logs in with a password: AUTH PLAIN where the upstream offers it
// (it carries any byte and an authorization identity), else USER/PASS.
// It returns the text of the upstream's +OK.
func (c *upstreamClient) login(creds sasl.Credentials) (string, error) {
	if err := checkCredentials(creds); err != nil {
		return "", err
	}
	if c.mechs["PLAIN"] {
		ir := pop3wire.EncodeSASL([]byte(creds.Identity + "\x00" + creds.Username + "\x00" + creds.Password))
		if err := c.cmd("AUTH PLAIN " + ir); err != nil {
			return "", err
		}
		resp, err := c.readResponse()
		if err == nil && resp.Continuation { // an upstream that ignores initial responses
			if err = c.cmd(ir); err == nil {
				resp, err = c.readResponse()
			}
		}
		return loginResult(resp, err)
	}
	if creds.Identity != "" {
		// Refused here, before anything is sent: no wrong password.
		return "", errAuthzidUnsupported
	}
	if err := c.cmd("USER " + creds.Username); err != nil {
		return "", err
	}
	resp, err := c.readResponse()
	if err == nil && resp.OK {
		if err = c.cmd("PASS " + creds.Password); err == nil {
			resp, err = c.readResponse()
		}
	}
	return loginResult(resp, err)
}

// apop logs in with the client's APOP digest, made over our timestamp.
func (c *upstreamClient) apop(user, digest string) (string, error) {
	if err := checkCredentials(sasl.Credentials{Username: user, Password: digest}); err != nil {
		return "", err
	}
	if err := c.cmd("APOP " + user + " " + digest); err != nil {
		return "", err
	}
	return loginResult(c.readResponse())
}

// startSASL sends AUTH <mechanism> and returns the upstream's decoded
// first challenge.
func (c *upstreamClient) startSASL(mechanism string) ([]byte, error) {
	if err := c.cmd("AUTH " + mechanism); err != nil {
		return nil, err
	}
	resp, err := c.readResponse()
	if err != nil {
		return nil, err
	}
	if !resp.Continuation {
		if !resp.OK {
			return nil, newUpstreamRejection(resp)
		}
		return nil, fmt.Errorf("%w: AUTH %s answered +OK without a challenge", errUpstreamProtocol, mechanism)
	}
	challenge, err := pop3wire.DecodeSASL(resp.Text)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errUpstreamProtocol, err)
	}
	return challenge, nil
}

// finishSASL sends the client's last response (or "*" to cancel) and reads
// the result.
func (c *upstreamClient) finishSASL(response []byte, cancel bool) (string, error) {
	line := "*"
	if !cancel {
		line = pop3wire.EncodeSASL(response)
	}
	if err := c.cmd(line); err != nil {
		return "", err
	}
	return loginResult(c.readResponse())
}

func loginResult(resp pop3wire.Response, err error) (string, error) {
	switch {
	case err != nil:
		return "", err
	case resp.Continuation:
		return "", fmt.Errorf("%w: unexpected continuation", errUpstreamProtocol)
	case !resp.OK:
		return "", newUpstreamRejection(resp)
	}
	// The +OK goes to the client as the proxy's own: only a well-formed
	// code and one short line of printable text.
	text := sanitizeReplyText(resp.Text)
	if isResponseCode(resp.Code) {
		text = "[" + resp.Code + "] " + text
	}
	if text == "" {
		text = "Logged in"
	}
	return text, nil
}

// capa asks the upstream's capabilities and returns its SASL mechanisms.
// An upstream without CAPA (-ERR) gets USER/PASS.
func (c *upstreamClient) capa() (map[string]bool, error) {
	if err := c.cmd("CAPA"); err != nil {
		return nil, err
	}
	resp, err := c.readResponse()
	if err != nil {
		return nil, err
	}
	mechs := map[string]bool{}
	if !resp.OK {
		return mechs, nil
	}
	for i := 0; ; i++ {
		if i > 1000 {
			return nil, fmt.Errorf("%w: CAPA list too long", errUpstreamProtocol)
		}
		line, err := c.r.ReadLine()
		if err != nil {
			return nil, fmt.Errorf("reading upstream CAPA: %w", err)
		}
		if string(line) == "." {
			return mechs, nil
		}
		fields := strings.Fields(string(line))
		if len(fields) > 0 && strings.EqualFold(fields[0], "SASL") {
			for _, m := range fields[1:] {
				mechs[strings.ToUpper(m)] = true
			}
		}
	}
}
