package pop3

import (
	"crypto/sha256"
	"io"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// bigMessage has dot-stuffed lines, 8-bit bytes and a 998-octet line.
func bigMessage(size int) string {
	var b strings.Builder
	b.WriteString("Subject: big\r\n\r\n")
	for i := 0; b.Len() < size; i++ {
		switch i % 4 {
		case 0:
			b.WriteString("..dot-stuffed line\r\n")
		case 1:
			b.WriteString("8-bit: \xe9\xe8\xff\x80 wörd\r\n")
		case 2:
			b.WriteString(strings.Repeat("L", 998) + "\r\n")
		default:
			b.WriteString("plain text line\r\n")
		}
	}
	return b.String()
}

func TestRelayLargeMessage(t *testing.T) {
	t.Parallel()
	msg := bigMessage(4 << 20)
	for _, tc := range []struct {
		name       string
		tcp, tls   bool
		wantSplice bool
	}{
		{"tcp both legs", true, false, true},
		{"pipe client", false, false, false},
		{"tls client", true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
			h, logs := newTestHandler(t, addr, func(h *Handler) {
				if tc.tls {
					h.StartTLS = StartTLSOnly
				}
			})
			ts := startSession(t, h, logs, tc.tcp)
			if tc.tls {
				ts.startTLS()
			}
			ts.send("USER alice", "PASS secret-pw", "RETR 1")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			ts.expect("+OK")
			got := make([]byte, len(msg)+3)
			_ = ts.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.ReadFull(ts.r, got); err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(got) != sha256.Sum256([]byte(msg+".\r\n")) {
				t.Fatal("relayed message differs")
			}
			ts.send("QUIT")
			ts.expect("+OK bye")
			ts.closed()
			started := logs.FilterMessage("relay started").All()
			if len(started) != 1 || started[0].ContextMap()["splice"] != tc.wantSplice {
				t.Errorf("relay log %v, want splice=%v", started, tc.wantSplice)
			}
			sessions := logs.FilterMessage("session").All()
			if len(sessions) != 1 || sessions[0].ContextMap()["bytes_to_client"].(int64) < int64(len(msg)) {
				t.Errorf("session log %v does not count the message", sessions)
			}
		})
	}
}

func TestRelayIdleTimeout(t *testing.T) {
	const proxyTimeout = 800 * time.Millisecond
	for _, tcp := range []bool{true, false} {
		_, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.ProxyTimeout = caddy.Duration(proxyTimeout) })
		ts := startSession(t, h, logs, tcp)
		ts.send("USER alice", "PASS secret-pw")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		// Activity keeps the session open past proxy_timeout.
		for i := 0; i < 4; i++ {
			time.Sleep(proxyTimeout / 2)
			ts.send("NOOP")
			ts.expect("+OK")
		}
		start := time.Now()
		ts.closed()
		// Between 1 and 1.25 proxy_timeouts (the kernel's counts are
		// sampled every quarter), and some scheduling slack.
		if d := time.Since(start); d < proxyTimeout-50*time.Millisecond || d > proxyTimeout*5/4+300*time.Millisecond {
			t.Errorf("idle session closed after %v, want %v-%v", d, proxyTimeout, proxyTimeout*5/4)
		}
		// The client may see the close before the session line is written.
		if line := sessionLine(t, logs); line["result"] != "idle_timeout" {
			t.Errorf("session line %v, want result idle_timeout", line)
		}
	}
}

func TestRelayHalfClose(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw", "STAT", "QUIT")
	if err := closeWriteConn(ts.conn); err != nil {
		t.Fatal(err)
	}
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK 1 ")
	ts.expect("+OK bye")
	ts.closed()
}

func closeWriteConn(c any) error {
	return c.(interface{ CloseWrite() error }).CloseWrite()
}

// TestIdleRelayHoldsNoPipes checks that an idle relay keeps only its two
// sockets: splice's pipes are taken only while data moves.
func TestIdleRelayHoldsNoPipes(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("splice is Linux only")
	}
	// countFDs counts this process's sockets and pipes, after letting the
	// GC close the pipes Go keeps pooled between splices.
	countFDs := func() (sockets, pipes int) {
		runtime.GC()
		runtime.GC()
		time.Sleep(50 * time.Millisecond)
		entries, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			target, _ := os.Readlink("/proc/self/fd/" + e.Name())
			switch {
			case strings.HasPrefix(target, "socket:"):
				sockets++
			case strings.HasPrefix(target, "pipe:"):
				pipes++
			}
		}
		return sockets, pipes
	}
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	socketsBefore, pipesBefore := countFDs()
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw", "STAT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK 1 ")
	time.Sleep(100 * time.Millisecond) // both directions are idle now
	sockets, pipes := countFDs()
	// Sockets of earlier tests may still be closing, so only the pipes are
	// asserted; the socket count is for the message.
	if pipes != pipesBefore {
		t.Errorf("an idle relayed session holds %d pipe ends (and %d sockets), want none", pipes-pipesBefore, sockets-socketsBefore)
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
}
