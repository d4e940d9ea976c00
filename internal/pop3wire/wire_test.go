package pop3wire

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func TestReadLine(t *testing.T) {
	in := "USER a\r\nNOOP\n" + strings.Repeat("x", 5000) + "\r\nPASS b c\r\n" + strings.Repeat("y", 100) + "\r\nQUIT"
	r := NewReader(strings.NewReader(in), 1000)
	want := []struct {
		line string
		err  error
	}{
		{"USER a", nil}, {"NOOP", nil}, {"", ErrLineTooLong}, {"PASS b c", nil}, {strings.Repeat("y", 100), nil}, {"", io.EOF},
	}
	for i, w := range want {
		got, err := r.ReadLine()
		if !errors.Is(err, w.err) || (err == nil && string(got) != w.line) {
			t.Fatalf("line %d: got %q, %v; want %q, %v", i, got, err, w.line, w.err)
		}
	}
}

func TestLongLineWithinLimit(t *testing.T) {
	long := strings.Repeat("z", 9000)
	r := NewReader(strings.NewReader(long+"\r\nNEXT\r\n"), 10000)
	if got, err := r.ReadLine(); err != nil || string(got) != long {
		t.Fatalf("got %d bytes, %v", len(got), err)
	}
	if got, err := r.ReadLine(); err != nil || string(got) != "NEXT" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestParseCommand(t *testing.T) {
	tests := []struct {
		in, name, rest string
		err            bool
	}{
		{"user alice", "USER", "alice", false},
		{"PASS p@ss wörd:%", "PASS", "p@ss wörd:%", false},
		{"AUTH PLAIN AGFsaWNlAHB3", "AUTH", "PLAIN AGFsaWNlAHB3", false},
		{"CAPA", "CAPA", "", false},
		{"", "", "", true},
		{"TOOLONG x", "", "", true},
		{"US\x00R a", "", "", true},
		{"USER a\x00b", "", "", true},
		{"\xff\xfe", "", "", true},
		{" USER", "", "", true},
	}
	for _, tc := range tests {
		c, err := ParseCommand([]byte(tc.in))
		if (err != nil) != tc.err || c.Name != tc.name || c.Rest != tc.rest {
			t.Errorf("ParseCommand(%q) = %+v, %v", tc.in, c, err)
		}
	}
}

func TestParseResponse(t *testing.T) {
	tests := []struct {
		in   string
		want Response
		err  bool
	}{
		{"+OK Logged in.", Response{OK: true, Text: "Logged in."}, false},
		{"+OK", Response{OK: true}, false},
		{"-ERR [AUTH] Authentication failed.", Response{Code: "AUTH", Text: "Authentication failed."}, false},
		{"-ERR [SYS/TEMP] busy", Response{Code: "SYS/TEMP", Text: "busy"}, false},
		{"+ ", Response{Continuation: true}, false},
		{"+ VXNlcm5hbWU6", Response{Continuation: true, Text: "VXNlcm5hbWU6"}, false},
		{"220 smtp", Response{}, true},
		{"+OKAY", Response{}, true},
	}
	for _, tc := range tests {
		got, err := ParseResponse([]byte(tc.in))
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseResponse(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

func TestDecodeSASL(t *testing.T) {
	if b, err := DecodeSASL("="); err != nil || b == nil || len(b) != 0 {
		t.Errorf(`"=" = %q, %v; want empty`, b, err)
	}
	for _, bad := range []string{"!!", "YWJj=", "YW Jj", "*"} {
		if _, err := DecodeSASL(bad); !errors.Is(err, ErrBadBase64) {
			t.Errorf("DecodeSASL(%q) = %v", bad, err)
		}
	}
	if b, _ := DecodeSASL(EncodeSASL([]byte("\x00bob\x00p@ss wörd:%"))); !bytes.Equal(b, []byte("\x00bob\x00p@ss wörd:%")) {
		t.Errorf("round trip: %q", b)
	}
}

func TestWriteBufferedTo(t *testing.T) {
	r := NewReader(strings.NewReader("PASS x\r\nSTAT\r\nLIST\r\n"), 100)
	if _, err := r.ReadLine(); err != nil {
		t.Fatal(err)
	}
	if !r.HasLine() {
		t.Error("HasLine false with STAT buffered")
	}
	var out bytes.Buffer
	n, err := r.WriteBufferedTo(&out)
	if err != nil || out.String() != "STAT\r\nLIST\r\n" || n != int64(out.Len()) {
		t.Fatalf("got %q, %d, %v", out.String(), n, err)
	}
	if r.HasLine() {
		t.Error("HasLine true on empty buffer")
	}
}

// A released reader's unread bytes never reach the next reader of the pool.
func TestReleasedReaderLeavesNothing(t *testing.T) {
	first := NewReader(strings.NewReader("USER alice\r\nPASS secret\r\n"), 32*1024)
	if line, err := first.ReadLine(); err != nil || string(line) != "USER alice" {
		t.Fatalf("%q %v", line, err)
	}
	first.Release()
	for i := 0; i < 10; i++ {
		next := NewReader(strings.NewReader("NOOP\r\n"), 32*1024)
		if line, err := next.ReadLine(); err != nil || string(line) != "NOOP" {
			t.Fatalf("%q %v", line, err)
		}
		if _, err := next.ReadLine(); err != io.EOF {
			t.Fatalf("after NOOP: %v, want EOF", err)
		}
		next.Release()
	}
	w := NewWriter(io.Discard)
	_, _ = w.WriteString("+OK unflushed")
	ReleaseWriter(w)
	var b strings.Builder
	w = NewWriter(&b)
	_, _ = w.WriteString("+OK\r\n")
	_ = w.Flush()
	if b.String() != "+OK\r\n" {
		t.Fatalf("pooled writer wrote %q", b.String())
	}
}

func TestParseCommandAllocations(t *testing.T) {
	line := []byte("user alice")
	allocs := testing.AllocsPerRun(100, func() {
		cmd, err := ParseCommand(line)
		if err != nil || cmd.Name != "USER" || cmd.Rest != "alice" {
			t.Fatalf("ParseCommand(%q) = %+v, %v", line, cmd, err)
		}
	})
	// One allocation for the argument, which must outlive the line buffer;
	// none for a known keyword.
	if allocs > 1 {
		t.Errorf("ParseCommand allocates %.0f times per call, want at most 1", allocs)
	}
}

func TestHasKeyword(t *testing.T) {
	for _, tc := range []struct {
		line string
		want bool
	}{
		{"AUTH", true}, {"auth PLAIN x", true}, {"AuTh ", true},
		{"AUTHX", false}, {"AUT", false}, {" AUTH", false}, {"AUTH\tPLAIN", false}, {"", false},
	} {
		if got := HasKeyword([]byte(tc.line), "AUTH"); got != tc.want {
			t.Errorf("HasKeyword(%q) = %v", tc.line, got)
		}
	}
}

// TestReadLineHostile: an over-long line is consumed to its end however its
// bytes arrive, with bounded memory, and its tail never becomes a line.
func TestReadLineHostile(t *testing.T) {
	const max = 1000
	for _, tc := range []struct {
		name string
		in   string
		want []string // "" marks ErrLineTooLong
	}{
		{"1 MB without LF, then the tail", strings.Repeat("a", 1<<20) + "QUIT\r\nNOOP\r\n", []string{"", "NOOP"}},
		{"limit plus one", strings.Repeat("b", max+1) + "\r\n" + strings.Repeat("b", max) + "\r\n", []string{"", strings.Repeat("b", max)}},
		{"limit with a bare LF", strings.Repeat("c", max) + "\nQUIT\n", []string{strings.Repeat("c", max), "QUIT"}},
		{"bare CR does not end a line", "USER a\rPASS b\r\n", []string{"USER a\rPASS b"}},
		{"NUL bytes stay in the line", "US\x00ER\r\n", []string{"US\x00ER"}},
		{"CR before the limit's end", strings.Repeat("d", max) + "\r\r\nQUIT\r\n", []string{"", "QUIT"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, one := range []bool{false, true} {
				var src io.Reader = strings.NewReader(tc.in)
				if one {
					src = iotest.OneByteReader(src) // a line in many small segments
				}
				r := NewReader(src, max)
				for i, want := range tc.want {
					got, err := r.ReadLine()
					switch {
					case want == "" && !errors.Is(err, ErrLineTooLong):
						t.Fatalf("line %d: got %q, %v; want ErrLineTooLong", i, got, err)
					case want != "" && (err != nil || string(got) != want):
						t.Fatalf("line %d: got %d bytes %q, %v", i, len(got), got[:min(len(got), 20)], err)
					}
					if cap(r.long) > 2*(max+2+readerBufferSize) {
						t.Fatalf("line %d: the long-line buffer grew to %d bytes", i, cap(r.long))
					}
				}
				if got, err := r.ReadLine(); err != io.EOF {
					t.Fatalf("after the lines: %q, %v; want EOF", got, err)
				}
			}
		})
	}
}
