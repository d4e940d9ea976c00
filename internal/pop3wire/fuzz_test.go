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
	})
}

// FuzzReadLine checks that no returned line is over the limit or holds a
// line end, whatever the input.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("USER a\r\nPASS b\r\n"), 16)
	f.Add([]byte(strings.Repeat("x", 100)+"\nNOOP\r\n"), 10)
	f.Add([]byte("\r\r\n\n\x00"), 1)
	f.Fuzz(func(t *testing.T, in []byte, limit int) {
		if limit < 1 || limit > 1<<16 {
			return
		}
		r := NewReader(bytes.NewReader(in), limit)
		for i := 0; i <= len(in); i++ {
			line, err := r.ReadLine()
			if errors.Is(err, ErrLineTooLong) {
				continue
			}
			if err != nil {
				if err != io.EOF {
					t.Fatal(err)
				}
				return
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
