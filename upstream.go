package pop3

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// upstreamLineLimit bounds a line from the upstream during login.
const upstreamLineLimit = 8192

// upstreamDialer opens a connection to an upstream POP3 server.
type upstreamDialer interface {
	dial(ctx context.Context, address string) (net.Conn, error)
}

// tcpDialer dials plain TCP with a timeout.
type tcpDialer struct{ timeout time.Duration }

func (d *tcpDialer) dial(ctx context.Context, address string) (net.Conn, error) {
	nd := net.Dialer{Timeout: d.timeout}
	return nd.DialContext(ctx, "tcp", address)
}

// upstreamRejection is the upstream's -ERR to the login: the credentials
// were refused, the upstream itself works.
type upstreamRejection struct {
	code string
	text string
}

func (e *upstreamRejection) Error() string {
	return fmt.Sprintf("upstream refused login: [%s] %s", e.code, e.text)
}

// errUpstreamProtocol marks an upstream that does not speak POP3 as expected.
var errUpstreamProtocol = errors.New("upstream protocol error")

// normalizeUpstreamAddress adds the POP3 port when the address has none.
func normalizeUpstreamAddress(addr string) (string, error) {
	if addr == "" {
		return "", errors.New("address missing")
	}
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr, nil
	}
	if strings.Count(addr, ":") > 1 && !strings.HasPrefix(addr, "[") {
		return net.JoinHostPort(addr, "110"), nil // bare IPv6 literal
	}
	if _, _, err := net.SplitHostPort(addr + ":110"); err != nil {
		return "", fmt.Errorf("invalid address %q: %w", addr, err)
	}
	return addr + ":110", nil
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
}

// connectUpstream dials address, reads the greeting and asks CAPA, all
// before deadline.
func (h *Handler) connectUpstream(ctx context.Context, address string, deadline time.Time) (*upstreamClient, error) {
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	conn, err := h.dialer.dial(ctx, address)
	if err != nil {
		return nil, fmt.Errorf("dialing upstream: %w", err)
	}
	_ = conn.SetDeadline(deadline)
	c := &upstreamClient{
		address: address,
		conn:    conn,
		r:       pop3wire.NewReader(conn, upstreamLineLimit),
		w:       bufio.NewWriterSize(conn, 512),
	}
	greeting, err := c.readResponse()
	if err == nil && (!greeting.OK || greeting.Continuation) {
		err = fmt.Errorf("%w: upstream greeting is -ERR [%s] %s", errUpstreamProtocol, greeting.Code, greeting.Text)
	}
	if err == nil {
		c.timestamp = apopTimestamp(greeting.Text)
		c.mechs, err = c.capa()
	}
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}

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
	if !strings.Contains(ts, "@") {
		return ""
	}
	return ts
}

func (c *upstreamClient) close() { _ = c.conn.Close() }

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
		return "", &upstreamRejection{code: codeAuth, text: "authorization identity not supported by upstream"}
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
			return nil, &upstreamRejection{code: resp.Code, text: resp.Text}
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
		return "", &upstreamRejection{code: resp.Code, text: resp.Text}
	}
	text := resp.Text
	if resp.Code != "" {
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
