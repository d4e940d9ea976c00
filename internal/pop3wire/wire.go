// Package pop3wire reads and writes the POP3 wire format (RFC 1939, 2449,
// 5034): bounded command lines, status responses and SASL base64.
package pop3wire

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"io"
	"strings"
	"sync"
)

// Errors returned by this package.
var (
	ErrLineTooLong = errors.New("pop3wire: line too long")
	ErrBadCommand  = errors.New("pop3wire: malformed command")
	ErrBadResponse = errors.New("pop3wire: malformed response")
	ErrBadBase64   = errors.New("pop3wire: invalid base64")
)

// readerBufferSize is the bufio size; lines longer than it are assembled in
// a separate buffer so that idle sessions keep only a small one.
const readerBufferSize = 4096

// Reader reads CRLF (or bare LF) terminated lines of at most max bytes.
type Reader struct {
	br   *bufio.Reader
	max  int
	long []byte
}

// NewReader returns a Reader whose lines may hold up to max bytes, not
// counting the line end.
func NewReader(r io.Reader, max int) *Reader {
	size := min(readerBufferSize, max+2)
	if size < readerBufferSize {
		return &Reader{br: bufio.NewReaderSize(r, size), max: max}
	}
	br := readers.Get().(*bufio.Reader)
	br.Reset(r)
	return &Reader{br: br, max: max}
}

// Buffers are pooled: every connection needs them for its first lines, and
// few need them after (a relay moves bytes without them).
var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, readerBufferSize) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writerBufferSize) }}
)

// writerBufferSize holds any reply or command the proxy writes itself.
const writerBufferSize = 1024

// Release gives the buffer back for reuse. r must not be used afterwards;
// bytes still buffered are dropped (see WriteBufferedTo).
func (r *Reader) Release() {
	if r == nil || r.br == nil {
		return
	}
	if r.br.Size() == readerBufferSize {
		r.br.Reset(nil)
		readers.Put(r.br)
	}
	r.br, r.long = nil, nil
}

// NewWriter returns a pooled buffered writer for commands and replies.
func NewWriter(w io.Writer) *bufio.Writer {
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(w)
	return bw
}

// ReleaseWriter gives w back for reuse; unflushed bytes are dropped and w
// must not be used afterwards.
func ReleaseWriter(w *bufio.Writer) {
	if w == nil || w.Size() != writerBufferSize {
		return
	}
	w.Reset(nil)
	writers.Put(w)
}

// ReadLine returns the next line without its line end. The slice is valid
// until the next call. A line over the limit is consumed up to its end and
// reported as ErrLineTooLong, so the caller may answer it and go on.
func (r *Reader) ReadLine() ([]byte, error) {
	line, err := r.br.ReadSlice('\n')
	if err == nil {
		return trimEOL(line, r.max)
	}
	if err != bufio.ErrBufferFull {
		return nil, err
	}
	r.long = append(r.long[:0], line...)
	for {
		line, err = r.br.ReadSlice('\n')
		if len(r.long) <= r.max+2 {
			r.long = append(r.long, line...)
		}
		switch err {
		case nil:
			l, err := trimEOL(r.long, r.max)
			if cap(r.long) > readerBufferSize*4 {
				r.long = nil // don't keep a large buffer for the rest of the session
			}
			return l, err
		case bufio.ErrBufferFull:
			continue
		default:
			return nil, err
		}
	}
}

func trimEOL(line []byte, max int) ([]byte, error) {
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	if len(line) > max {
		return nil, ErrLineTooLong
	}
	return line, nil
}

// Buffered returns how many bytes were read from the connection but not yet
// returned as lines.
func (r *Reader) Buffered() int { return r.br.Buffered() }

// WriteBufferedTo writes the bytes read ahead but not yet consumed to w, so
// that a relay loses nothing the peer pipelined.
func (r *Reader) WriteBufferedTo(w io.Writer) (int64, error) {
	n := r.br.Buffered()
	if n == 0 {
		return 0, nil
	}
	b, _ := r.br.Peek(n)
	m, err := w.Write(b)
	_, _ = r.br.Discard(m)
	return int64(m), err
}

// Command is one client command line.
type Command struct {
	// Name is the keyword in upper case, e.g. "USER".
	Name string
	// Rest is everything after the single space that follows the keyword,
	// verbatim: a password may hold spaces.
	Rest string
}

// Args splits Rest on spaces.
func (c Command) Args() []string { return strings.Fields(c.Rest) }

// ParseCommand parses a command line (without its line end). The keyword
// must be 1 to 4 ASCII letters (RFC 2449 §3 keeps keywords to 3 or 4; one
// letter more or less is still answered as an unknown command). NUL is
// refused anywhere: it has no place in POP3 and truncates C strings upstream.
func ParseCommand(line []byte) (Command, error) {
	if bytes.IndexByte(line, 0) >= 0 || bytes.IndexByte(line, '\r') >= 0 || bytes.IndexByte(line, '\n') >= 0 {
		return Command{}, ErrBadCommand
	}
	name, rest, _ := bytes.Cut(line, []byte{' '})
	if len(name) == 0 || len(name) > 4 {
		return Command{}, ErrBadCommand
	}
	var upper [4]byte
	for i, c := range name {
		switch {
		case 'a' <= c && c <= 'z':
			upper[i] = c - ('a' - 'A')
		case 'A' <= c && c <= 'Z':
			upper[i] = c
		default:
			return Command{}, ErrBadCommand
		}
	}
	return Command{Name: keyword(upper[:len(name)]), Rest: string(rest)}, nil
}

// HasKeyword reports whether line is the command keyword (upper case),
// spelled in any case, alone or followed by a space.
func HasKeyword(line []byte, keyword string) bool {
	n := len(keyword)
	if len(line) < n || (len(line) > n && line[n] != ' ') {
		return false
	}
	for i := range n {
		c := line[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != keyword[i] {
			return false
		}
	}
	return true
}

// keyword returns the upper-case keyword as a string, without allocating
// for the commands a session sees every time.
func keyword(upper []byte) string {
	switch string(upper) { // no allocation: the compiler compares in place
	case "USER":
		return "USER"
	case "PASS":
		return "PASS"
	case "CAPA":
		return "CAPA"
	case "AUTH":
		return "AUTH"
	case "QUIT":
		return "QUIT"
	case "STLS":
		return "STLS"
	case "NOOP":
		return "NOOP"
	case "APOP":
		return "APOP"
	}
	return string(upper)
}

// Response is a status line: "+OK", "-ERR" or a SASL continuation "+ ".
type Response struct {
	OK           bool
	Continuation bool   // "+ " followed by a base64 challenge in Text
	Code         string // RFC 2449 response code without brackets, e.g. "SYS/TEMP"
	Text         string
}

// ParseResponse parses a status line from a server.
func ParseResponse(line []byte) (Response, error) {
	s := string(line)
	switch {
	case s == "+" || strings.HasPrefix(s, "+ "):
		return Response{Continuation: true, Text: strings.TrimPrefix(strings.TrimPrefix(s, "+"), " ")}, nil
	case hasPrefixFold(s, "+OK"):
		return parseStatusText(Response{OK: true}, s[3:])
	case hasPrefixFold(s, "-ERR"):
		return parseStatusText(Response{}, s[4:])
	}
	return Response{}, ErrBadResponse
}

func parseStatusText(r Response, s string) (Response, error) {
	if s != "" && s[0] != ' ' {
		return Response{}, ErrBadResponse
	}
	s = strings.TrimPrefix(s, " ")
	if strings.HasPrefix(s, "[") {
		if end := strings.IndexByte(s, ']'); end > 0 {
			r.Code = s[1:end]
			s = strings.TrimPrefix(s[end+1:], " ")
		}
	}
	r.Text = s
	return r, nil
}

func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// DecodeSASL decodes a client's SASL response. "=" is an empty response
// (RFC 5034 §4); anything that is not strict standard base64 is an error.
func DecodeSASL(s string) ([]byte, error) {
	if s == "=" {
		return []byte{}, nil
	}
	// The decoder skips CR and LF; a response line must not hold them.
	if strings.ContainsAny(s, "\r\n") {
		return nil, ErrBadBase64
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, ErrBadBase64
	}
	return b, nil
}

// EncodeSASL encodes a SASL challenge or response; empty stays empty for a
// challenge line "+ ".
func EncodeSASL(b []byte) string {
	return base64.StdEncoding.EncodeToString(b)
}

// ContainsLineBreakOrNUL reports whether s holds CR, LF or NUL: such a value
// would end or split a command sent upstream.
func ContainsLineBreakOrNUL(s string) bool {
	return strings.ContainsAny(s, "\r\n\x00")
}

// HasLine reports whether a whole line is already buffered, so that reading
// it will not block.
func (r *Reader) HasLine() bool {
	n := r.br.Buffered()
	if n == 0 {
		return false
	}
	b, _ := r.br.Peek(n)
	return bytes.IndexByte(b, '\n') >= 0
}
