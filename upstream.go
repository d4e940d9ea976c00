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

// upstreamConn is a logged-in upstream connection.
type upstreamConn struct {
	address string
	conn    net.Conn
	r       *pop3wire.Reader // may hold bytes the upstream sent after its +OK
}

func (u *upstreamConn) close() { _ = u.conn.Close() }

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

// loginUpstream dials the target, reads its greeting and logs in with the
// target's credentials. It returns the connection and the text of the
// upstream's final +OK. Everything happens before deadline.
func (h *Handler) loginUpstream(ctx context.Context, t loginTarget, deadline time.Time) (*upstreamConn, string, error) {
	if err := checkCredentials(t.creds); err != nil {
		return nil, "", err
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	conn, err := h.dialer.dial(ctx, t.address)
	if err != nil {
		return nil, "", fmt.Errorf("dialing upstream: %w", err)
	}
	_ = conn.SetDeadline(deadline)
	c := &upstreamClient{r: pop3wire.NewReader(conn, upstreamLineLimit), w: bufio.NewWriterSize(conn, 512)}
	text, err := c.login(t.creds)
	if err != nil {
		var rejected *upstreamRejection
		if errors.As(err, &rejected) {
			_ = c.cmd("QUIT") // polite; the result does not matter
		}
		_ = conn.Close()
		return nil, "", err
	}
	_ = conn.SetDeadline(time.Time{})
	return &upstreamConn{address: t.address, conn: conn, r: c.r}, text, nil
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

// upstreamClient is the client side of POP3 towards the upstream.
type upstreamClient struct {
	r *pop3wire.Reader
	w *bufio.Writer
}

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

// login reads the greeting, asks CAPA and logs in: AUTH PLAIN where the
// upstream offers it (it carries any byte and an authorization identity),
// else USER/PASS.
func (c *upstreamClient) login(creds sasl.Credentials) (string, error) {
	greeting, err := c.readResponse()
	if err != nil {
		return "", fmt.Errorf("reading upstream greeting: %w", err)
	}
	if !greeting.OK || greeting.Continuation {
		return "", fmt.Errorf("%w: upstream greeting is -ERR [%s] %s", errUpstreamProtocol, greeting.Code, greeting.Text)
	}
	mechs, err := c.capa()
	if err != nil {
		return "", err
	}
	var resp pop3wire.Response
	if mechs["PLAIN"] {
		ir := pop3wire.EncodeSASL([]byte(creds.Identity + "\x00" + creds.Username + "\x00" + creds.Password))
		if err := c.cmd("AUTH PLAIN " + ir); err != nil {
			return "", err
		}
		if resp, err = c.readResponse(); err != nil {
			return "", err
		}
		if resp.Continuation { // an upstream that ignores initial responses
			if err := c.cmd(ir); err != nil {
				return "", err
			}
			if resp, err = c.readResponse(); err != nil {
				return "", err
			}
		}
	} else {
		if creds.Identity != "" {
			return "", &upstreamRejection{code: codeAuth, text: "authorization identity not supported by upstream"}
		}
		if err := c.cmd("USER " + creds.Username); err != nil {
			return "", err
		}
		if resp, err = c.readResponse(); err != nil {
			return "", err
		}
		if resp.OK {
			if err := c.cmd("PASS " + creds.Password); err != nil {
				return "", err
			}
			if resp, err = c.readResponse(); err != nil {
				return "", err
			}
		}
	}
	switch {
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
