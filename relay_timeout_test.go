package pop3

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// startSlowSession is startSession over a TCP pair whose client end has a
// small receive buffer, so that the proxy's writes wait for the client's
// reads instead of filling a large window at once.
func startSlowSession(t *testing.T, h *Handler, logs *observer.ObservedLogs) *testSession {
	t.Helper()
	client, server := tcpPair(t)
	if err := client.(*net.TCPConn).SetReadBuffer(8 << 10); err != nil {
		t.Fatal(err)
	}
	ts := &testSession{t: t, conn: client, r: bufio.NewReaderSize(client, 4<<10), done: make(chan error, 1), logs: logs, handle: h}
	cx := layer4.WrapConnection(server, nil, zap.NewNop())
	go func() {
		err := h.Handle(cx, nil)
		_ = server.Close()
		ts.done <- err
	}()
	t.Cleanup(func() { _ = client.Close() })
	ts.greeting = ts.readLine()
	return ts
}

// sessionLine waits for the session's one INFO line and returns its fields.
func sessionLine(t *testing.T, logs *observer.ObservedLogs) map[string]any {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if lines := logs.FilterMessage("session").All(); len(lines) > 0 {
			if len(lines) != 1 {
				t.Fatalf("%d session lines", len(lines))
			}
			return lines[0].ContextMap()
		}
	}
	t.Fatal("no session line")
	return nil
}

// readSlowly reads n bytes from r at about rate bytes a second.
func readSlowly(c net.Conn, r io.Reader, n, rate int) ([]byte, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 2<<10)
	start := time.Now()
	for len(out) < n {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := r.Read(buf[:min(len(buf), n-len(out))])
		out = append(out, buf[:m]...)
		if err != nil {
			return out, err
		}
		if ahead := time.Duration(len(out))*time.Second/time.Duration(rate) - time.Since(start); ahead > 0 {
			time.Sleep(ahead)
		}
	}
	return out, nil
}

// TestRelaySlowClientIsNotIdle: a client that reads a large RETR slowly is
// active all along, even when one relay step (a splice, a TLS write, the
// socket's send queue draining) takes longer than proxy_timeout.
func TestRelaySlowClientIsNotIdle(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("only Linux reads the kernel's counts: elsewhere a send queue draining for longer than proxy_timeout is idle")
	}
	const (
		proxyTimeout = 300 * time.Millisecond
		rate         = 192 << 10 // bytes a second at most: 57 KiB per proxy_timeout
	)
	msg := bigMessage(256 << 10)
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"splice", false}, {"tls client", true}} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.ProxyTimeout = caddy.Duration(proxyTimeout)
				if tc.tls {
					h.StartTLS = StartTLSOnly
				}
			})
			ts := startSlowSession(t, h, logs)
			if tc.tls {
				ts.startTLS()
			}
			ts.send("USER alice", "PASS secret-pw", "RETR 1")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			ts.expect("+OK")
			got, err := readSlowly(ts.conn, ts.r, len(msg)+3, rate)
			if err != nil {
				t.Fatalf("after %d of %d bytes: %v; session %v", len(got), len(msg)+3, err, logs.FilterMessage("session").All())
			}
			if sha256.Sum256(got) != sha256.Sum256([]byte(msg+".\r\n")) {
				t.Fatal("relayed message differs")
			}
			ts.send("QUIT")
			ts.expect("+OK bye")
			if line := sessionLine(t, logs); line["result"] != "ok" {
				t.Errorf("session line %v", line)
			}
		})
	}
}

// TestRelayStuckClientEnds: a client that stops reading mid-RETR moves no
// byte, so proxy_timeout ends the session although a write to it is blocked.
func TestRelayStuckClientEnds(t *testing.T) {
	const proxyTimeout = 300 * time.Millisecond
	msg := bigMessage(8 << 20)
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"splice", false}, {"tls client", true}} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.ProxyTimeout = caddy.Duration(proxyTimeout)
				if tc.tls {
					h.StartTLS = StartTLSOnly
				}
			})
			ts := startSlowSession(t, h, logs)
			if tc.tls {
				ts.startTLS()
			}
			ts.send("USER alice", "PASS secret-pw", "RETR 1")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			ts.expect("+OK")
			start := time.Now()
			line := sessionLine(t, logs)
			if line["result"] != "idle_timeout" {
				t.Errorf("session line %v", line)
			}
			// The buffers fill within milliseconds; then nothing moves.
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("a stuck session ended after %v, want about %v", d, proxyTimeout)
			}
		})
	}
}

// TestRelayUpstreamCloseDeliversAll: the upstream's close ends the session,
// but only after every byte it sent reached the client, a slow one included.
func TestRelayUpstreamCloseDeliversAll(t *testing.T) {
	msg := bigMessage(256 << 10)
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"splice", false}, {"tls client", true}} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				if tc.tls {
					h.StartTLS = StartTLSOnly
				}
			})
			ts := startSlowSession(t, h, logs)
			if tc.tls {
				ts.startTLS()
			}
			// The upstream answers QUIT and closes while most of the
			// message still waits in the proxy's buffers.
			ts.send("USER alice", "PASS secret-pw", "RETR 1", "QUIT")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			ts.expect("+OK")
			want := msg + ".\r\n+OK bye\r\n"
			got, err := readSlowly(ts.conn, ts.r, len(want), 1<<20)
			if err != nil {
				t.Fatalf("after %d of %d bytes: %v", len(got), len(want), err)
			}
			if !bytes.Equal(got, []byte(want)) {
				t.Fatal("relayed bytes differ")
			}
			_ = ts.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := ts.r.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("after the upstream's close: %d bytes, %v; want EOF", n, err)
			}
			if line := sessionLine(t, logs); line["result"] != "ok" {
				t.Errorf("session line %v", line)
			}
		})
	}
}

// TestRelayClientResetIsClientError: a client that resets its connection
// while the proxy writes a RETR to it failed on the client's side, although
// the write happened in the upstream-to-client direction.
func TestRelayClientResetIsClientError(t *testing.T) {
	msg := bigMessage(8 << 20)
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"splice", false}, {"tls client", true}} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				if tc.tls {
					h.StartTLS = StartTLSOnly
				}
			})
			ts := startSlowSession(t, h, logs)
			raw := ts.conn.(*net.TCPConn)
			if tc.tls {
				ts.startTLS()
			}
			ts.send("USER alice", "PASS secret-pw", "RETR 1")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			ts.expect("+OK")
			// The client's direction ends first (EOF, or close_notify in
			// TLS), so only the upstream-to-client one sees the reset.
			if err := closeWriteConn(ts.conn); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
			_ = raw.SetLinger(0)
			_ = raw.Close()
			if line := sessionLine(t, logs); line["result"] != "client_error" {
				t.Errorf("session line %v, want result client_error", line)
			}
		})
	}
}

// TestRelayEndDoesNotWaitForAStuckTLSClient: a TLS client that reads
// nothing cannot take the close_notify alert; a session ended by
// proxy_timeout or a kick closes at once instead of waiting for that write.
func TestRelayEndDoesNotWaitForAStuckTLSClient(t *testing.T) {
	for _, kick := range []bool{false, true} {
		name := "proxy_timeout"
		if kick {
			name = "kick"
		}
		t.Run(name, func(t *testing.T) {
			_, addr := fakeUpstream(t, nil)
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				h.StartTLS = StartTLSOnly
				h.ProxyTimeout = caddy.Duration(300 * time.Millisecond)
				if kick {
					h.ProxyTimeout = caddy.Duration(time.Minute)
				}
			})
			ts := startSession(t, h, logs, false) // a pipe: a write waits for the reader
			ts.startTLS()
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			// From here the client reads nothing.
			start := time.Now()
			if kick {
				time.Sleep(50 * time.Millisecond)
				for _, s := range h.proc.sessions.matching(func(s *session) bool { return s.h == h }) {
					s.kick("test")
				}
				if d := time.Since(start); d > time.Second {
					t.Errorf("kick took %v", d)
				}
			}
			deadline := time.Now().Add(3 * time.Second)
			for len(logs.FilterMessage("session").All()) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			lines := logs.FilterMessage("session").All()
			if len(lines) != 1 {
				t.Fatalf("no session line after %v", time.Since(start))
			}
			want := "idle_timeout"
			if kick {
				want = "closed_by_admin"
			}
			if got := lines[0].ContextMap()["result"]; got != want {
				t.Errorf("result %v, want %s", got, want)
			}
		})
	}
}

// TestRelayUpstreamEndBoundsCloseNotify: when the upstream ends a TLS
// client's session, the close_notify after its last bytes waits at most
// about a second for a client that reads nothing more, not tls.Conn's 5 s.
func TestRelayUpstreamEndBoundsCloseNotify(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.StartTLS = StartTLSOnly
		h.ProxyTimeout = caddy.Duration(time.Minute)
	})
	ts := startSession(t, h, logs, false) // a pipe: a write waits for the reader
	ts.startTLS()
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK bye") // then the client reads nothing
	start := time.Now()
	select {
	case <-ts.done:
	case <-time.After(10 * time.Second):
		t.Fatal("session still running")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("session took %v to end after the upstream's close", d)
	}
	if lines := logs.FilterMessage("session").All(); len(lines) != 1 || lines[0].ContextMap()["result"] != "ok" {
		t.Errorf("session lines %v, want one with result ok", lines)
	}
}
