//go:build integration

package integration

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pacedReader reads from r at about rate bytes a second for its first slow
// bytes, then at full speed.
type pacedReader struct {
	r          io.Reader
	rate, slow int
	read       int
	start      time.Time
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.read >= p.slow {
		return p.r.Read(b)
	}
	if p.start.IsZero() {
		p.start = time.Now()
	}
	n, err := p.r.Read(b[:min(len(b), 4<<10)])
	p.read += n
	if ahead := time.Duration(p.read)*time.Second/time.Duration(p.rate) - time.Since(p.start); ahead > 0 {
		time.Sleep(ahead)
	}
	return n, err
}

// dialSmallWindow is dialPOP3 with a small receive buffer set before the
// handshake, so that the proxy's writes wait for the client's reads.
func dialSmallWindow(t *testing.T, addr string, tlsOn bool, p *caddyProc) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
		}); err != nil {
			return err
		}
		return serr
	}}
	tcp, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tcp.Close() })
	c := &client{t: t, name: addr, conn: tcp, tcp: tcp}
	c.deadline(30 * time.Second)
	if tlsOn {
		cfg, err := p.tlsConfig()
		if err != nil {
			t.Fatal(err)
		}
		tc := tls.Client(tcp, cfg)
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		c.conn = tc
	}
	c.r = bufio.NewReaderSize(c.conn, 64<<10)
	if c.greeting = c.line(); !strings.HasPrefix(c.greeting, "+OK") {
		t.Fatalf("greeting %q", c.greeting)
	}
	return c
}

// TestSlowClientRetr: with a short proxy_timeout, a client that reads a
// large RETR from Dovecot slowly is not idle: it gets every byte. One that
// stops reading is ended by proxy_timeout, and Dovecot's session with it.
func TestSlowClientRetr(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	plain, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	implicit, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	p := startCaddy(t, "slow-client", fmt.Sprintf(`{
	admin off
	log {
		level DEBUG
	}
	local_certs
	skip_install_trust
	tls_automate_names localhost
	layer4 {
		%[1]s {
			route {
				pop3 %[3]s {
					starttls off
					proxy_timeout 300ms
				}
			}
		}
		%[2]s {
			route {
				pop3 %[3]s {
					implicit_tls
					proxy_timeout 300ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
	}
}
`, plain, implicit, env.dc.POP3Addr), listener{addr: plain}, listener{addr: implicit, tls: true})

	for _, tc := range []struct {
		name, addr string
		tls        bool
	}{{"splice", plain, false}, {"implicit-tls", implicit, true}} {
		t.Run(tc.name+"/slow", func(t *testing.T) {
			// Hashing 32 MiB takes longer than proxy_timeout under -race:
			// a client doing it between commands would be idle.
			want := stuffed(env.bigMsgs[1])
			wantSum := sha256.Sum256(want)
			c := dialSmallWindow(t, tc.addr, tc.tls, p)
			c.login(big, bigPass)
			// 1 MiB at 256 KiB/s: 4 s, more than ten proxy_timeouts, in
			// which no relay step need end.
			c.r = bufio.NewReaderSize(&pacedReader{r: c.conn, rate: 256 << 10, slow: 1 << 20}, 64<<10)
			_, sum, size, _ := c.retrRaw(2)
			c.quit()
			if sum != wantSum || size != int64(len(want)) {
				t.Errorf("RETR 2: got %d bytes (sha256 %x), want %d bytes", size, sum[:8], len(want))
			}
		})
		t.Run(tc.name+"/stuck", func(t *testing.T) {
			ended := dovecotLines("pop3(" + big + ")")
			c := dialSmallWindow(t, tc.addr, tc.tls, p)
			c.login(big, bigPass)
			local := c.tcp.LocalAddr().String()
			c.write("RETR 2\r\n")
			if got := waitDovecotLines(t, "pop3("+big+")", ended); got <= ended {
				t.Errorf("Dovecot did not log the end of the upstream session")
			}
			var session map[string]any
			for deadline := time.Now().Add(5 * time.Second); session == nil && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				for _, e := range caddyEntries(p.log()) {
					if e["msg"] == "session" && e["remote"] == local {
						session = e
					}
				}
			}
			if session == nil || session["result"] != "idle_timeout" {
				t.Errorf("session line %v, want result idle_timeout", session)
			}
		})
	}
}
