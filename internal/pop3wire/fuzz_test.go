package pop3wire

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseCommand checks that any client line parses without panic into a
// keyword of ASCII letters and a rest free of line breaks and NUL.
func FuzzParseCommand(f *testing.F) {
	for _, s := range []string{"USER alice", "PASS p@ss wörd:%", "AUTH PLAIN AGFsaWNlAHB3", "CAPA", "STLS", "\x00", "\xff\xfe", "QUIT ", "aUtH login"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		c, err := ParseCommand(line)
		if err != nil {
			return
		}
		if n := len(c.Name); n == 0 || n > 4 || strings.ToUpper(c.Name) != c.Name || !utf8.ValidString(c.Name) {
			t.Fatalf("bad keyword %q", c.Name)
		}
		if ContainsLineBreakOrNUL(c.Rest) {
			t.Fatalf("rest %q holds CR, LF or NUL", c.Rest)
		}
		if HasKeyword(line, "AUTH") != (c.Name == "AUTH") {
			t.Fatalf("HasKeyword(%q, AUTH) disagrees with the keyword %q", line, c.Name)
		}
	})
}

// FuzzReadLine checks that no returned line is over the limit or holds a
// line end, whatever the input, and that the lines are exactly the input's
// LF-terminated lines: the tail of a line over the limit never becomes a
// line of its own.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("USER a\r\nPASS b\r\n"), 16)
	f.Add([]byte(strings.Repeat("x", 100)+"\nNOOP\r\n"), 10)
	f.Add([]byte("\r\r\n\n\x00"), 1)
	f.Fuzz(func(t *testing.T, in []byte, limit int) {
		if limit < 1 || limit > 1<<16 {
			return
		}
		want := bytes.SplitAfter(in, []byte("\n"))
		if last := want[len(want)-1]; !bytes.HasSuffix(last, []byte("\n")) {
			want = want[:len(want)-1] // no line end: not a line
		}
		r := NewReader(bytes.NewReader(in), limit)
		for i := 0; i <= len(in); i++ {
			line, err := r.ReadLine()
			if i == len(want) {
				if err != io.EOF {
					t.Fatalf("after the last line: %q, %v", line, err)
				}
				return
			}
			w := bytes.TrimSuffix(bytes.TrimSuffix(want[i], []byte("\n")), []byte("\r"))
			if errors.Is(err, ErrLineTooLong) {
				if len(w) <= limit {
					t.Fatalf("line %d of %d bytes refused with limit %d", i, len(w), limit)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(line, w) {
				t.Fatalf("line %d: got %q, want %q", i, line, w)
			}
			if len(line) > limit || bytes.IndexByte(line, '\n') >= 0 {
				t.Fatalf("line %q over limit %d or holds LF", line, limit)
			}
		}
	})
}

// FuzzDecodeSASL checks that decoding never panics and that what decodes
// encodes back to the same text.
func FuzzDecodeSASL(f *testing.F) {
	for _, s := range []string{"=", "AGFsaWNlAHNlY3JldA==", "!!", "YWJj", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := DecodeSASL(s)
		if err != nil || s == "=" {
			return
		}
		if EncodeSASL(b) != s {
			t.Fatalf("%q decodes to %q which encodes to %q", s, b, EncodeSASL(b))
		}
	})
}

// FuzzParseResponse checks that any server line parses without panic into
// parts taken from the line: a code without ']', status kinds that exclude
// each other, and no byte that the line did not hold.
func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{
		"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>", "+OK", "+ ", "+", "+ VXNlcm5hbWU6",
		"-ERR [AUTH] Authentication failed.", "-ERR [SYS/TEMP] try later", "-ERR [IN-USE] locked",
		"-err lower case", "+ok [] empty code", "-ERR [unterminated", "+OK [A]]b", "+OKAY", "-ERRx", "",
		"+OK \x00\r [\xff]", "-ERR [LOGIN-DELAY] 60",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := ParseResponse(line)
		if err != nil {
			if !errors.Is(err, ErrBadResponse) {
				t.Fatalf("error %v is not ErrBadResponse", err)
			}
			return
		}
		if r.OK && r.Continuation {
			t.Fatalf("%q: both +OK and continuation", line)
		}
		if strings.Contains(r.Code, "]") {
			t.Fatalf("%q: code %q holds ']'", line, r.Code)
		}
		if !bytes.Contains(line, []byte(r.Text)) || !bytes.Contains(line, []byte(r.Code)) {
			t.Fatalf("%q: code %q or text %q not from the line", line, r.Code, r.Text)
		}
		if len(r.Code)+len(r.Text) > len(line) {
			t.Fatalf("%q: code %q and text %q longer than the line", line, r.Code, r.Text)
		}
		if r.Code != "" && !bytes.Contains(line, []byte("["+r.Code+"]")) {
			t.Fatalf("%q: code %q not in brackets", line, r.Code)
		}
	})
}
