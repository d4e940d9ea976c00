package pop3

import (
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// TestCommandLineLength: RFC 2449 §4 bounds a command line at 255 octets
// with its CRLF. A longer one gets -ERR Line too long, reaches no upstream,
// and the session goes on; AUTH lines keep max_line_length.
func TestCommandLineLength(t *testing.T) {
	t.Parallel()
	userLine := func(octets int) string { // a USER line of octets with its CRLF
		return "USER " + strings.Repeat("u", octets-len("USER \r\n"))
	}
	t.Run("255 octets accepted, 256 refused", func(t *testing.T) {
		u, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, nil)
		ts := startSession(t, h, logs, true)
		ts.send(userLine(255))
		ts.expect("+OK")
		ts.send(userLine(256))
		ts.expect("-ERR Line too long")
		ts.send("USER alice", "PASS secret-pw")
		ts.expect("+OK")
		ts.expect("+OK Logged in.")
		ts.send("QUIT")
		ts.expect("+OK bye")
		ts.closed()
		for _, l := range u.Lines() {
			if len(l) > 253 {
				t.Errorf("the upstream got a %d-byte line", len(l))
			}
		}
	})
	t.Run("every ordinary command", func(t *testing.T) {
		_, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxErrors = 100 })
		ts := startSession(t, h, logs, true)
		long := strings.Repeat("x", 10<<10)
		for _, verb := range []string{"USER", "PASS", "APOP", "CAPA", "NOOP", "QUIT", "STLS", "user", "XYZW"} {
			ts.send(verb + " " + long)
			ts.expect("-ERR Line too long")
		}
		ts.send("NOOP")
		ts.expect("+OK")
		ts.send("QUIT")
		ts.expect("+OK Logging out")
		ts.closed()
	})
	t.Run("max_command_length raises it", func(t *testing.T) {
		_, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxCommandLength = 1024 })
		ts := startSession(t, h, logs, true)
		ts.send(userLine(1024))
		ts.expect("+OK")
		ts.send(userLine(1025))
		ts.expect("-ERR Line too long")
		ts.send("QUIT")
		ts.expect("+OK Logging out")
		ts.closed()
	})
	t.Run("counts towards max_errors", func(t *testing.T) {
		_, addr := fakeUpstream(t, nil)
		h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxErrors = 2 })
		ts := startSession(t, h, logs, true)
		ts.send(userLine(300), userLine(300))
		ts.expect("-ERR Line too long")
		ts.expect("-ERR Line too long")
		ts.expect("-ERR Too many errors")
		ts.closed()
	})
	long := strings.Repeat("p", 1500) // a password (or token) far over 255 octets
	t.Run("AUTH with an initial response keeps max_line_length", func(t *testing.T) {
		_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["alice"] = long })
		h, logs := newTestHandler(t, addr, nil)
		ts := startSession(t, h, logs, true)
		ts.send("auth PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00alice\x00"+long)))
		ts.expect("+OK Logged in.")
		ts.send("QUIT")
		ts.expect("+OK bye")
		ts.closed()
	})
	t.Run("a SASL continuation line keeps max_line_length", func(t *testing.T) {
		_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Users["alice"] = long })
		h, logs := newTestHandler(t, addr, nil)
		ts := startSession(t, h, logs, true)
		ts.send("AUTH PLAIN")
		ts.expect("+ ")
		ts.send(base64.StdEncoding.EncodeToString([]byte("\x00alice\x00" + long)))
		ts.expect("+OK Logged in.")
		ts.send("QUIT")
		ts.expect("+OK bye")
		ts.closed()
	})
}

// TestLineOverMaxLineLength: a line over max_line_length is refused whole;
// nothing in its tail runs as a command, however the bytes arrive.
func TestLineOverMaxLineLength(t *testing.T) {
	for _, tc := range []struct {
		name  string
		line  string
		split int // send in pieces of this many bytes, slowly; 0: at once
	}{
		{"tail looks like a command", "USER " + strings.Repeat("a", 40<<10) + "\r\nQUIT", 0},
		{"tail with no line end of its own", "USER " + strings.Repeat("a", 40<<10) + "QUIT", 0},
		{"1 MB without a line end, then one", "USER " + strings.Repeat("b", 1<<20), 0},
		{"AUTH line over the limit", "AUTH PLAIN " + strings.Repeat("A", 40<<10) + "QUIT", 0},
		{"split across many segments", "USER " + strings.Repeat("c", 40<<10) + "QUIT", 2 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, addr := fakeUpstream(t, nil)
			h, logs := newTestHandler(t, addr, nil)
			ts := startSession(t, h, logs, true)
			data := tc.line + "\r\n"
			if tc.split == 0 {
				go func() { _, _ = ts.conn.Write([]byte(data)) }() // the proxy reads while it is written
			} else {
				for len(data) > 0 {
					n := min(tc.split, len(data))
					if _, err := ts.conn.Write([]byte(data[:n])); err != nil {
						t.Fatal(err)
					}
					data = data[n:]
					time.Sleep(2 * time.Millisecond)
				}
			}
			ts.expect("-ERR Line too long")
			if strings.Contains(tc.line, "\r\nQUIT") {
				// The QUIT after the long line's end is a command of its own.
				ts.expect("+OK Logging out")
				ts.closed()
				return
			}
			ts.send("NOOP")
			ts.expect("+OK")
			ts.send("QUIT")
			ts.expect("+OK Logging out")
			ts.closed()
			if len(u.Lines()) != 0 {
				t.Errorf("the upstream got %d lines", len(u.Lines()))
			}
		})
	}
}

// TestHostileCommandBytes: a bare CR or a NUL does not split a command
// line, and such a line reaches no upstream.
func TestHostileCommandBytes(t *testing.T) {
	t.Parallel()
	u, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.MaxErrors = 10 })
	ts := startSession(t, h, logs, true)
	ts.send("USER alice\rPASS secret-pw")
	ts.expect("-ERR")
	ts.send("USER al\x00ice")
	ts.expect("-ERR")
	ts.send("\x00\x00\x00")
	ts.expect("-ERR")
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	for _, l := range u.Lines() {
		if strings.ContainsAny(l, "\r\x00") {
			t.Errorf("the upstream got %q", l)
		}
	}
}

func TestValidateMaxCommandLength(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		command, line int
		ok            bool
	}{
		{0, 0, true},
		{255, 0, true},
		{254, 0, false},
		{-1, 0, false},
		{32768, 0, true}, // the default max_line_length
		{32769, 0, false},
		{4096, 4096, true},
		{4097, 4096, false},
	} {
		h := &Handler{Upstream: []*Upstream{{Address: "127.0.0.1:110"}}, MaxCommandLength: tc.command, MaxLineLength: tc.line}
		if err := h.setup(); (err == nil) != tc.ok || (err != nil && !strings.Contains(err.Error(), "max_command_length")) {
			t.Errorf("max_command_length %d, max_line_length %d: got %v", tc.command, tc.line, err)
		}
	}
}
