package pop3

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3wire"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// scriptConn is an upstream connection that reads a fixed script and
// records what the client wrote.
type scriptConn struct {
	r       *bytes.Reader
	written bytes.Buffer
}

func (c *scriptConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error) { return c.written.Write(p) }
func (c *scriptConn) Close() error                { return nil }
func (c *scriptConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (c *scriptConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 110}
}
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }
func (c *scriptConn) lines() []string {
	return strings.Split(strings.TrimSuffix(c.written.String(), "\r\n"), "\r\n")
}
func (c *scriptConn) String() string { return c.written.String() }

func newScriptConn(script []byte) *scriptConn { return &scriptConn{r: bytes.NewReader(script)} }

// setup runs the client's greeting, TLS-less setup over the script.
func (c *scriptConn) setup(o upstreamOptions) (*upstreamClient, error) {
	u := &upstreamClient{address: "fuzz", conn: c}
	return u, u.setup(context.Background(), o, dialClient{remote: c.LocalAddr(), local: c.RemoteAddr()})
}

// FuzzUpstreamResponses runs the upstream client (greeting, XCLIENT, CAPA,
// then each login method) against any server bytes: no panic, every line
// it sends is one of the commands it means to send, and what it hands back
// for the client's +OK is one line.
func FuzzUpstreamResponses(f *testing.F) {
	for _, s := range []string{
		"+OK Dovecot ready. <1.2@host>\r\n+OK\r\n+OK\r\nSASL PLAIN LOGIN CRAM-MD5\r\nUSER\r\n.\r\n+OK Logged in.\r\n",
		"+OK ready\r\n-ERR no xclient\r\n-ERR no capa\r\n+OK\r\n+OK [IN-USE] locked\r\n",
		"+OK ready\r\n+OK\r\n+OK\r\nSASL plain\r\n.\r\n+ \r\n-ERR [AUTH] Authentication failed.\r\n",
		"+OK ready\r\n+OK\r\n+OK\r\n.\r\n-ERR [SYS/TEMP] later\r\n",
		"+OK ready\r\n+OK\r\n+OK\r\nSASL PLAIN\r\n.\r\n+OK [" + strings.Repeat("A", 300) + "] hi\r\n",
		"-ERR [SYS/PERM] go away\r\n",
		"+OK\n+OK\n+OK\nSASL\n.\n+OK\n",
		"+ PDEyMzQ1QGhvc3Q+\r\n+ AAA=\r\n+OK done\r\n",
		"+OK <a@b>\r\n+OK\r\n+OK\r\n" + strings.Repeat("X\r\n", 1002) + ".\r\n",
		"+OK hi\r\n+OK\r\n+OK\r\nSASL PLAIN\r\n.\r\n+OK a\rb\x00c\r\n",
	} {
		f.Add([]byte(s))
	}
	creds := sasl.Credentials{Username: "alice", Password: "secret-pw"}
	plainIR := pop3wire.EncodeSASL([]byte("\x00alice\x00secret-pw"))
	f.Fuzz(func(t *testing.T, script []byte) {
		allowed := map[string]bool{
			"XCLIENT ADDR=127.0.0.1 PORT=40000": true, "CAPA": true, "QUIT": true,
			"AUTH PLAIN " + plainIR: true, plainIR: true, "USER alice": true, "PASS secret-pw": true,
			"APOP alice 0123456789abcdef0123456789abcdef": true, "AUTH CRAM-MD5": true, "*": true,
			pop3wire.EncodeSASL([]byte("alice 0123456789abcdef")): true,
		}
		check := func(what string, c *scriptConn, text string, err error) {
			t.Helper()
			for _, l := range c.lines() {
				if l != "" && !allowed[l] {
					t.Fatalf("%s: sent %q upstream (all: %q)", what, l, c.String())
				}
			}
			if err == nil && strings.ContainsAny(text, "\n") {
				t.Fatalf("%s: login text %q holds a line feed", what, text)
			}
		}

		c := newScriptConn(script)
		u, err := c.setup(upstreamOptions{xclient: true, skipCAPA: true})
		if err == nil {
			u.mechs, err = u.capa()
		}
		if err == nil {
			text, err := u.login(creds)
			check("login", c, text, err)
		}
		check("setup", c, "", err)

		c = newScriptConn(script)
		if u, err := c.setup(upstreamOptions{skipCAPA: true}); err == nil {
			text, err := u.apop("alice", "0123456789abcdef0123456789abcdef")
			check("apop", c, text, err)
		}

		for _, cancel := range []bool{false, true} {
			c = newScriptConn(script)
			if u, err := c.setup(upstreamOptions{skipCAPA: true}); err == nil {
				if _, err := u.startSASL("CRAM-MD5"); err == nil {
					text, err := u.finishSASL([]byte("alice 0123456789abcdef"), cancel)
					check("sasl", c, text, err)
				}
			}
		}
	})
}

// FuzzParseAuthHTTPResponse feeds any HTTP response to the auth_http
// decision: no panic, and an accepted login names an IP and port, with user
// and password free of control bytes; a refusal's text and code too.
func FuzzParseAuthHTTPResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: 1110\r\nAuth-User: bob\r\nAuth-Pass: pw\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 3\r\nAuth-Error-Code: 535 5.7.8\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 1\r\n\r\n",
		"HTTP/1.1 500 Oops\r\nAuth-Status: OK\r\nAuth-Status: no\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: mail.example\r\nAuth-Port: 99999\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 110\r\nAuth-Pass: a\x01b\r\n\r\n",
		"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: [fe80::1%eth0]\r\nAuth-Port: +110\r\nAuth-Wait: 99999999999999999999\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	methods := []string{AuthPlain, AuthAPOP, AuthCRAMMD5, AuthExternal, AuthOAuthBearer}
	f.Fuzz(func(t *testing.T, raw []byte) {
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), nil)
		if err != nil {
			return
		}
		_ = resp.Body.Close()
		for _, names := range []bool{false, true} {
			for _, m := range methods {
				checkAuthHTTPResult(t, resp, m, names)
			}
		}
	})
}

// checkAuthHTTPResult checks the properties of one parsed answer: no
// control byte in what reaches the client or the upstream; an accepted one
// names an IP address and port, or with names a host name to resolve.
func checkAuthHTTPResult(t *testing.T, resp *http.Response, m string, names bool) {
	res, err := parseAuthHTTPResponse(resp, m, names)
	if err != nil {
		return
	}
	if hasControl(res.ErrorText) || hasControl(res.ErrorCode) {
		t.Fatalf("%s: refusal text %q or code %q holds a control byte", m, res.ErrorText, res.ErrorCode)
	}
	if res.Wait < 0 {
		t.Fatalf("%s: negative Auth-Wait %v", m, res.Wait)
	}
	if !res.OK {
		return
	}
	if res.Host != "" {
		host, port, err := net.SplitHostPort(res.Address)
		if !names || !isHostName(res.Host) || err != nil || host != res.Host || port == "0" {
			t.Fatalf("%s: accepted host name %q with address %q (names %v)", m, res.Host, res.Address, names)
		}
	} else if ap, err := netip.ParseAddrPort(res.Address); err != nil || ap.Port() == 0 {
		t.Fatalf("%s: accepted with address %q: %v", m, res.Address, err)
	}
	if hasControl(res.User) || hasControl(res.Pass) {
		t.Fatalf("%s: Auth-User %q or Auth-Pass %q holds a control byte", m, res.User, res.Pass)
	}
	if res.Retry {
		t.Fatalf("%s: both OK and WAIT", m)
	}
}

// FuzzUnmarshalCaddyfile parses any Caddyfile text that tokenizes into a
// pop3 handler: no panic, and a handler that parsed also validates or
// fails with an error, never a panic.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"pop3 mail.internal:110",
		"pop3 a:110 {\n\tupstream b:110\n\tupstream c\n}",
		"pop3 {\n\tauth plain oauthbearer xoauth2\n\tauth_http http://127.0.0.1:9000/auth {\n\t\theader X-Auth-Key {env.KEY}\n\t\ttimeout 5s\n\t\tpass_client_cert on\n\t}\n\tauth_failure_delay 2s\n}",
		"pop3 {\n\tupstream 10.0.0.1:995 {\n\t\ttls\n\t\ttls_server_name pop.example.com\n\t\tmax_connections 100\n\t\tweight 3\n\t}\n\tupstream 10.0.0.2 {\n\t\tstarttls\n\t\ttls_insecure_skip_verify\n\t}\n\tlb_policy user_hash\n\thealth_interval 10s\n}",
		"pop3 a {\n\tstarttls only\n\ttimeout 1m\n\tproxy_timeout 10m\n\tdrain_timeout 5s\n\tgreeting \"hi there\"\n\timplicit_tls\n\tproxy_protocol v2\n\txclient\n\tmax_line_length 8192\n\tmax_errors 3\n\tpass_error_message on\n\tcapabilities \"EXPIRE 30\" UIDL\n\tconnection_policy {\n\t\tdefault_sni localhost\n\t}\n}",
		"pop3 {l4.tls.server_name}:110",
		"pop3 a {\n\tupstream\n}",
		"pop3 a {\n\tauth_http\n}",
		"pop3 a {\n\tunknown_option x\n}",
		"pop3 a {\n\ttimeout -1s\n\ttimeout 1s\n}",
		"pop3 a {\n\tupstream b {\n\t\tweight 99999999999999999999\n\t}\n}",
		"pop3 a {\n\tconnection_policy {\n\t\tmatch {\n\t\t\tsni a\n\t\t}\n\t}\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		// NewTestDispenser exits the process on a tokenizer error.
		if _, err := caddyfile.Tokenize([]byte(input), "Caddyfile"); err != nil {
			return
		}
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			return
		}
		_ = h.Validate()
	})
}
