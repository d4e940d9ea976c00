// Package passwdfile reads Dovecot's passwd-file format and checks passwords
// stored in it with Dovecot's password schemes, so that the proxy can use the
// passwd-file of an existing Dovecot installation unchanged.
//
// A line is
//
//	user:password:uid:gid:gecos:home:shell:extra_fields
//
// where any field may be blank and a line may stop after any field. Lines
// that are empty or start with '#' or ':' are skipped. The password is
// "{SCHEME}value", or a bare value in Dovecot's passwd-file default scheme,
// CRYPT. The extra fields are space-separated "key=value" pairs or bare keys
// (flags such as nologin or proxy).
//
// Parsing follows Dovecot 2.3's db-passwd-file.c and password-scheme.c. It
// is stricter in one way: a password that Dovecot would only fail to verify
// at login (an unknown or unsupported scheme, a malformed value) is a parse
// error here, so a bad file is refused when the proxy loads it rather than
// one login at a time.
package passwdfile

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"strings"
)

// MaxFileSize is the largest passwd-file Load and Parse accept: 64 MiB, far
// above a file of a million users, so that a wrong path (a log, a device)
// cannot exhaust memory.
const MaxFileSize = 64 << 20

// MaxLineLength is the longest line Load and Parse accept, in bytes without
// the line end. Password fields take under 200 bytes; the rest is room for
// extra fields.
const MaxLineLength = 64 << 10

// Errors wrapped by the errors Parse and Load return; test with errors.Is.
// The ones that describe a line are always wrapped in a *LineError, which
// adds the package prefix and the line number.
var (
	ErrFileTooLarge      = errors.New("passwdfile: file larger than 64 MiB")
	ErrLineTooLong       = errors.New("line too long")
	ErrNUL               = errors.New("NUL byte in line")
	ErrUnknownScheme     = errors.New("unknown password scheme")
	ErrUnsupportedScheme = errors.New("unsupported password scheme")
	ErrMalformedPassword = errors.New("malformed password")
)

// LineError reports a line that cannot be used. Its text names the file
// (when known), the line number and what is wrong, and never holds the
// password field: a password typed into the wrong field, or a plain-text
// one, must not reach a log through an error.
type LineError struct {
	Path string // the file, empty when the input came from Parse
	Line int    // 1-based
	Err  error  // wraps one of the package's Err values
}

// Error implements error.
func (e *LineError) Error() string {
	if e.Path != "" {
		return fmt.Sprintf("passwdfile: %s: line %d: %v", e.Path, e.Line, e.Err)
	}
	return fmt.Sprintf("passwdfile: line %d: %v", e.Line, e.Err)
}

// Unwrap returns the cause.
func (e *LineError) Unwrap() error { return e.Err }

// Entry is one user of a passwd-file. Treat it as read-only: Lookup hands
// out the same Entry to every caller.
type Entry struct {
	// User is the user name exactly as in the file.
	User string
	// Scheme is the password scheme in upper case without an encoding
	// suffix ("SHA512-CRYPT", "SSHA256", "PLAIN"): the name in braces, or
	// CRYPT for a bare value (MD5-CRYPT for a bare "$1$" value, as Dovecot
	// reports it). It is empty when the line has no password, which never
	// verifies.
	Scheme string
	// Extra holds the extra fields: "key=value" maps key to value and a
	// bare flag such as nologin maps to "". A key given twice keeps the
	// last value, as Dovecot does. Values are kept as written: Dovecot
	// expands %variables in them, this package does not. Nil when the line
	// has none. Acting on them (nopassword, nologin, proxy, host, ...) is
	// the caller's business.
	Extra map[string]string
	// Line is the 1-based line number of the entry in the file.
	Line int

	stored   string   // the password field after the scheme prefix
	verifier Verifier // never nil
}

// Stored returns the password field after its "{SCHEME}" prefix, as written
// in the file (for the PLAIN schemes, the clear-text password itself). It is
// a method rather than a field so that encoders that walk exported fields
// (encoding/json, zap's reflection) cannot reveal it, and String leaves it
// out; never log its result.
func (e *Entry) Stored() string { return e.stored }

// Verifier returns the entry's password checker. A type switch on it gives
// the scheme-specific parts: *CRAMMD5 and *SCRAM.
func (e *Entry) Verifier() Verifier { return e.verifier }

// Verify reports whether password is the user's password. The empty
// password never verifies (a user without one has the nopassword extra
// field, which the caller handles, as Dovecot's auth does).
func (e *Entry) Verify(password string) bool { return e.verifier.Verify(password) }

// ClearPassword returns the stored clear-text password of an entry in the
// PLAIN, CLEAR or CLEARTEXT scheme. Only challenge-response mechanisms that
// need the secret itself should call it: APOP, CRAM-MD5, or deriving SCRAM
// keys with NewSCRAM. It reports false for every other scheme and for an
// empty password.
func (e *Entry) ClearPassword() (string, bool) {
	p, ok := e.verifier.(plain)
	if !ok || p.password == "" {
		return "", false
	}
	return p.password, true
}

// CRAMMD5 returns what checks a CRAM-MD5 response for this user: the stored
// states of a CRAM-MD5 (or HMAC-MD5) entry, or states computed from the
// password of a PLAIN one. It reports false for every other scheme, whose
// users cannot log in with CRAM-MD5, as with Dovecot.
func (e *Entry) CRAMMD5() (*CRAMMD5, bool) {
	if c, ok := e.verifier.(*CRAMMD5); ok {
		return c, true
	}
	if p, ok := e.ClearPassword(); ok {
		return NewCRAMMD5(p), true
	}
	return nil, false
}

// SCRAM returns the stored keys of a SCRAM-SHA-1 or SCRAM-SHA-256 entry;
// check Mechanism against the one the client chose. For a PLAIN entry,
// derive keys with NewSCRAM from ClearPassword instead.
func (e *Entry) SCRAM() (*SCRAM, bool) {
	s, ok := e.verifier.(*SCRAM)
	return s, ok
}

// String describes the entry for logs and debugging, without its password.
func (e *Entry) String() string {
	return fmt.Sprintf("%s (%s, line %d)", e.User, e.Scheme, e.Line)
}

// Duplicate is a user that appears more than once in a file. Like Dovecot,
// the table keeps the first line and ignores the later ones; Dovecot logs
// them as errors, so callers should warn about them.
type Duplicate struct {
	User  string
	Line  int // the ignored line
	First int // the line that was kept
}

// Table is a parsed passwd-file. It does not change once parsed, so any
// number of goroutines may use it and its entries at once; to pick up a
// changed file, Load it again and swap the tables.
type Table struct {
	users      map[string]*Entry
	entries    []*Entry // in file order
	duplicates []Duplicate
}

// Lookup returns the entry of user. Names are compared exactly, as
// Dovecot's passwd-file does (a case-sensitive hash table lookup with
// username_format=%u); any normalisation Dovecot applies before the lookup,
// such as auth_username_format's default %Lu lowering the name, is the
// caller's to apply.
func (t *Table) Lookup(user string) (*Entry, bool) {
	e, ok := t.users[user]
	return e, ok
}

// Len returns the number of users.
func (t *Table) Len() int { return len(t.entries) }

// All yields the entries in file order.
func (t *Table) All() iter.Seq[*Entry] {
	return func(yield func(*Entry) bool) {
		for _, e := range t.entries {
			if !yield(e) {
				return
			}
		}
	}
}

// Duplicates returns the lines that repeated an earlier user, in file order.
func (t *Table) Duplicates() []Duplicate { return t.duplicates }

// Load reads and parses the passwd-file at path.
func Load(path string) (*Table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("passwdfile: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("passwdfile: %w", err)
	} else if fi.Mode().IsRegular() && fi.Size() > MaxFileSize {
		return nil, fmt.Errorf("%w: %s", ErrFileTooLarge, path)
	}
	t, err := parse(f, path, MaxFileSize, MaxLineLength)
	if errors.Is(err, ErrFileTooLarge) {
		return nil, fmt.Errorf("%w: %s", ErrFileTooLarge, path) // the file grew after Stat
	}
	return t, err
}

// Parse reads a passwd-file from r.
func Parse(r io.Reader) (*Table, error) {
	return parse(r, "", MaxFileSize, MaxLineLength)
}

// parse is Parse with the limits as parameters, so tests can reach them
// without megabytes of input.
func parse(r io.Reader, path string, maxFile int64, maxLine int) (*Table, error) {
	lr := &io.LimitedReader{R: r, N: maxFile + 1}
	sc := bufio.NewScanner(lr)
	// A token may be maxLine bytes plus "\r\n"; Scanner needs one byte more
	// than the longest token to tell it is complete.
	sc.Buffer(make([]byte, 0, min(maxLine+3, 64<<10)), maxLine+3)
	t := &Table{users: make(map[string]*Entry)}
	n := 0
	lineErr := func(err error) error {
		if lr.N <= 0 {
			// The line was cut by the size limit: that is the real error.
			return ErrFileTooLarge
		}
		return &LineError{Path: path, Line: n, Err: err}
	}
	for sc.Scan() {
		n++
		line := sc.Bytes() // ScanLines drops "\n" and one "\r", as Dovecot's istream does
		if len(line) > maxLine {
			return nil, lineErr(ErrLineTooLong)
		}
		if bytes.IndexByte(line, 0) >= 0 {
			// Dovecot's C strings would end the line there; refuse
			// rather than guess what the author meant.
			return nil, lineErr(ErrNUL)
		}
		if len(line) == 0 || line[0] == '#' || line[0] == ':' {
			continue // blank, comment, or no user name
		}
		fields := strings.Split(string(line), ":")
		if first, dup := t.users[fields[0]]; dup {
			// Like Dovecot, look no further than the name: a later
			// line of the same user is never used, so it cannot
			// make the file unusable either.
			t.duplicates = append(t.duplicates, Duplicate{User: fields[0], Line: n, First: first.Line})
			continue
		}
		e, err := parseEntry(fields)
		if err != nil {
			return nil, lineErr(err)
		}
		e.Line = n
		t.users[e.User] = e
		t.entries = append(t.entries, e)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			n++
			return nil, lineErr(ErrLineTooLong)
		}
		return nil, fmt.Errorf("passwdfile: reading: %w", err)
	}
	if lr.N <= 0 {
		return nil, ErrFileTooLarge
	}
	return t, nil
}

// parseEntry parses the fields of a line, split at every ':'.
func parseEntry(fields []string) (*Entry, error) {
	e := &Entry{User: fields[0]}
	var password string
	if len(fields) > 1 {
		password = fields[1]
	}
	var err error
	e.Scheme, e.stored, e.verifier, err = parsePassword(password)
	if err != nil {
		return nil, err
	}
	e.Extra = parseExtra(fields[min(len(fields), 2):])
	return e, nil
}

// parseExtra takes the fields after the password (uid, gid, gecos, home,
// shell, extra fields) and returns the extra fields. Like Dovecot, it joins
// everything after the shell with ':' again, so a value may hold colons
// (userdb_mail=maildir:~/Maildir), and splits that on spaces.
func parseExtra(rest []string) map[string]string {
	const extraAt = 5 // uid, gid, gecos, home, shell
	if len(rest) <= extraAt {
		return nil
	}
	rest = rest[extraAt:]
	var joined string
	if rest[0] == "" {
		// Dovecot's old format: an empty field, then a mail location.
		// Dovecot makes it userdb_mail when the file also serves as
		// userdb, and drops it otherwise; keeping it costs nothing.
		if len(rest) < 2 || rest[1] == "" {
			return nil
		}
		joined = "userdb_mail=" + strings.Join(rest[1:], ":")
	} else {
		joined = strings.Join(rest, ":")
	}
	var extra map[string]string
	for _, f := range strings.Split(joined, " ") { // spaces only, as Dovecot's p_strsplit_spaces(.., " ")
		if f == "" {
			continue
		}
		if extra == nil {
			extra = make(map[string]string)
		}
		key, value, _ := strings.Cut(f, "=")
		extra[key] = value
	}
	return extra
}
