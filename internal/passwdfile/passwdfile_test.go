package passwdfile

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Hashes of "secret" used by the table tests, written by doveadm pw.
const (
	secretSHA256    = "{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols="
	secretPlainMD5  = "5ebe2294ecd0e0f08eab7690d2a6ee69"
	secretBcrypt    = "$2y$05$/RvWugapbrw365KL1qN9auvXkmP2VPYGwgfkH5Bqjxi.3JEo1iLla"
	secretMD5Crypt  = "$1$0uv/3Wjk$Y2VQQ896c9Y9d.mCafliw0"
	secretSHA512Cry = "$6$wC9UaiJYej4RvK3B$25oILtVg3rVs4KPw3FfTyAof9JeaXUJXW08lcFl9GJXGh8/L5CpGX0DhviAaM2mgr.9/RZkOteTN8VePY56zR1"
)

type wantEntry struct {
	user, scheme, stored string
	extra                map[string]string
	line                 int
}

func TestParse(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		input string
		want  []wantEntry
		dups  []Duplicate
	}{
		{
			name:  "comments and blank lines are skipped",
			input: "# users\n\n#alice:{PLAIN}x\nalice:{PLAIN}pw\n\n",
			want:  []wantEntry{{user: "alice", scheme: "PLAIN", stored: "pw", line: 4}},
		},
		{
			name:  "a line without a user name is skipped",
			input: ":{PLAIN}nobody\nbob:{PLAIN}pw\n",
			want:  []wantEntry{{user: "bob", scheme: "PLAIN", stored: "pw", line: 2}},
		},
		{
			// Dovecot skips only lines that start with '#'.
			name:  "an indented # starts a user name",
			input: " #x:{PLAIN}pw\n",
			want:  []wantEntry{{user: " #x", scheme: "PLAIN", stored: "pw", line: 1}},
		},
		{
			name:  "a user alone has no password",
			input: "carol\n",
			want:  []wantEntry{{user: "carol", line: 1}},
		},
		{
			name:  "an empty password field has no password",
			input: "carol::1000:1000\n",
			want:  []wantEntry{{user: "carol", line: 1}},
		},
		{
			name:  "an empty value after a scheme has no password",
			input: "carol:{PLAIN}:::::\n",
			want:  []wantEntry{{user: "carol", scheme: "PLAIN", line: 1}},
		},
		{
			name:  "the last line may lack its line end",
			input: "dave:{PLAIN}pw",
			want:  []wantEntry{{user: "dave", scheme: "PLAIN", stored: "pw", line: 1}},
		},
		{
			name:  "CRLF line ends",
			input: "dave:{PLAIN}pw\r\nerin:{PLAIN}pw2\r\n",
			want: []wantEntry{
				{user: "dave", scheme: "PLAIN", stored: "pw", line: 1},
				{user: "erin", scheme: "PLAIN", stored: "pw2", line: 2},
			},
		},
		{
			name:  "lines may stop after any field",
			input: "a:{PLAIN}1:1000\nb:{PLAIN}2:1000:1000\nc:{PLAIN}3:1000:1000:C\nd:{PLAIN}4:1000:1000:D:/home/d\ne:{PLAIN}5:1000:1000:E:/home/e:/bin/sh\n",
			want: []wantEntry{
				{user: "a", scheme: "PLAIN", stored: "1", line: 1},
				{user: "b", scheme: "PLAIN", stored: "2", line: 2},
				{user: "c", scheme: "PLAIN", stored: "3", line: 3},
				{user: "d", scheme: "PLAIN", stored: "4", line: 4},
				{user: "e", scheme: "PLAIN", stored: "5", line: 5},
			},
		},
		{
			name:  "extra fields: pairs and flags",
			input: "frank:" + secretSHA256 + ":1000:1000:Frank:/home/frank:/bin/false:proxy host=mail.example.com port=110 nologin\n",
			want: []wantEntry{{user: "frank", scheme: "SHA256", stored: secretSHA256[len("{SHA256}"):], line: 1,
				extra: map[string]string{"proxy": "", "host": "mail.example.com", "port": "110", "nologin": ""}}},
		},
		{
			name:  "extra fields after blank fields",
			input: "frank:{PLAIN}pw:::::: nopassword  allow_nets=127.0.0.1/8,::1 \n",
			want: []wantEntry{{user: "frank", scheme: "PLAIN", stored: "pw", line: 1,
				extra: map[string]string{"nopassword": "", "allow_nets": "127.0.0.1/8,::1"}}},
		},
		{
			// Dovecot joins the fields after the shell with ':' again.
			name:  "extra field values may hold colons",
			input: "gina:{PLAIN}pw::::::userdb_mail=maildir:~/Maildir:LAYOUT=fs x=a=b\n",
			want: []wantEntry{{user: "gina", scheme: "PLAIN", stored: "pw", line: 1,
				extra: map[string]string{"userdb_mail": "maildir:~/Maildir:LAYOUT=fs", "x": "a=b"}}},
		},
		{
			name:  "a repeated key keeps the last value",
			input: "gina:{PLAIN}pw::::::host=a host=b\n",
			want: []wantEntry{{user: "gina", scheme: "PLAIN", stored: "pw", line: 1,
				extra: map[string]string{"host": "b"}}},
		},
		{
			name:  "the old format's mail field",
			input: "hank:{PLAIN}pw:1000:1000::/home/hank:::maildir:~/Mail\n",
			want: []wantEntry{{user: "hank", scheme: "PLAIN", stored: "pw", line: 1,
				extra: map[string]string{"userdb_mail": "maildir:~/Mail"}}},
		},
		{
			// Dovecot never reads further than the name of a
			// duplicate, so its bad scheme does not matter.
			name:  "a duplicate user keeps the first line",
			input: "ivan:{PLAIN}first\njudy:{PLAIN}pw\nivan:{PLAIN}second\nivan:{FOO.BAR}third\n",
			want: []wantEntry{
				{user: "ivan", scheme: "PLAIN", stored: "first", line: 1},
				{user: "judy", scheme: "PLAIN", stored: "pw", line: 2},
			},
			dups: []Duplicate{{User: "ivan", Line: 3, First: 1}, {User: "ivan", Line: 4, First: 1}},
		},
		{
			name:  "user names are exact",
			input: "Kim:{PLAIN}upper\nkim:{PLAIN}lower\n",
			want: []wantEntry{
				{user: "Kim", scheme: "PLAIN", stored: "upper", line: 1},
				{user: "kim", scheme: "PLAIN", stored: "lower", line: 2},
			},
		},
		{
			name:  "scheme names in any case, with an encoding",
			input: "leo:{plain}pw\nmia:{Sha256.b64}" + secretSHA256[len("{SHA256}"):] + "\nned:{plain-md5.HEX}" + secretPlainMD5 + "\n",
			want: []wantEntry{
				{user: "leo", scheme: "PLAIN", stored: "pw", line: 1},
				{user: "mia", scheme: "SHA256", stored: secretSHA256[len("{SHA256}"):], line: 2},
				{user: "ned", scheme: "PLAIN-MD5", stored: secretPlainMD5, line: 3},
			},
		},
		{
			name:  "a bare value is CRYPT",
			input: "olga:" + secretBcrypt + "\npete:" + secretSHA512Cry + "\n",
			want: []wantEntry{
				{user: "olga", scheme: "CRYPT", stored: secretBcrypt, line: 1},
				{user: "pete", scheme: "CRYPT", stored: secretSHA512Cry, line: 2},
			},
		},
		{
			name:  "a bare $1$ value is MD5-CRYPT, cut at its next $",
			input: "quin:" + secretMD5Crypt + "$ignored\n",
			want:  []wantEntry{{user: "quin", scheme: "MD5-CRYPT", stored: secretMD5Crypt, line: 1}},
		},
		{
			name:  "libpam-pwdfile's password[34] is PLAIN-MD5",
			input: "rita:" + secretPlainMD5 + "[34]:1000\n",
			want:  []wantEntry{{user: "rita", scheme: "PLAIN-MD5", stored: secretPlainMD5, line: 1}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tbl, err := Parse(strings.NewReader(tt.input))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if tbl.Len() != len(tt.want) {
				t.Errorf("Len() = %d, want %d", tbl.Len(), len(tt.want))
			}
			var got []wantEntry
			for e := range tbl.All() {
				got = append(got, wantEntry{e.User, e.Scheme, e.Stored(), e.Extra, e.Line})
				if l, ok := tbl.Lookup(e.User); !ok || l != e {
					t.Errorf("Lookup(%q) does not find the entry All yields", e.User)
				}
			}
			if !slices.EqualFunc(got, tt.want, func(a, b wantEntry) bool {
				return a.user == b.user && a.scheme == b.scheme && a.stored == b.stored && a.line == b.line && maps.Equal(a.extra, b.extra)
			}) {
				t.Errorf("entries:\n got %+v\nwant %+v", got, tt.want)
			}
			if !slices.Equal(tbl.Duplicates(), tt.dups) {
				t.Errorf("Duplicates() = %+v, want %+v", tbl.Duplicates(), tt.dups)
			}
		})
	}
}

// TestParseVerifies checks the table's entries verify through Lookup, for
// the forms only a passwd-file gives (bare values, libpam-pwdfile).
func TestParseVerifies(t *testing.T) {
	t.Parallel()
	tbl, err := Parse(strings.NewReader(strings.Join([]string{
		"a:" + secretSHA256,
		"b:" + secretBcrypt,
		"c:" + secretMD5Crypt + "$ignored",
		"d:" + secretPlainMD5 + "[34]",
		"e:" + secretSHA512Cry,
		"f:{PLAIN}secret",
		"g:",
		"h:{PLAIN}",
		"i:{SHA256}",
	}, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	for _, user := range []string{"a", "b", "c", "d", "e", "f"} {
		e, ok := tbl.Lookup(user)
		if !ok {
			t.Fatalf("Lookup(%q) failed", user)
		}
		if !e.Verify("secret") || e.Verify("Secret") || e.Verify("") {
			t.Errorf("%s (%s) does not verify exactly \"secret\"", user, e.Scheme)
		}
	}
	for _, user := range []string{"g", "h", "i"} {
		e, _ := tbl.Lookup(user)
		if e.Verify("") || e.Verify("secret") {
			t.Errorf("%s: an entry without a password verifies", user)
		}
		if _, ok := e.ClearPassword(); ok {
			t.Errorf("%s: an empty password is a clear password", user)
		}
	}
	if _, ok := tbl.Lookup("A"); ok {
		t.Error("Lookup is not exact")
	}
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	const secret = "hunter2-s3cret"
	tests := []struct {
		name  string
		input string
		is    error
		text  string // the error text, without "passwdfile: "
	}{
		{
			name:  "unknown scheme",
			input: "a:{PLAIN}x\n\n# c\nb:{FOO}" + secret + "\n",
			is:    ErrUnknownScheme,
			text:  `line 4: unknown password scheme "FOO"`,
		},
		{
			name:  "a password in braces is not shown",
			input: "a:{" + secret + " x}y\n",
			is:    ErrUnknownScheme,
			text:  `line 1: unknown password scheme (name not shown)`,
		},
		{
			name:  "unknown encoding",
			input: "a:{SHA256.B32}" + secret + "\n",
			is:    ErrUnknownScheme,
			text:  `line 1: unknown password scheme "SHA256.B32"`,
		},
		{
			name:  "a scheme Dovecot has but this package does not",
			input: "a:{DIGEST-MD5}" + secret + "\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "DIGEST-MD5"`,
		},
		{
			name:  "libpam-pwdfile's password[56] is DIGEST-MD5",
			input: "a:" + secret + "[56]\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "DIGEST-MD5"`,
		},
		{
			name:  "traditional DES crypt, bare",
			input: "a:" + "sa3tHJ3/KuYvI" + "\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "CRYPT": traditional DES crypt`,
		},
		{
			name:  "DES-CRYPT",
			input: "a:{DES-CRYPT}sa3tHJ3/KuYvI\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "DES-CRYPT"`,
		},
		{
			name:  "yescrypt",
			input: "a:{CRYPT}$y$j9T$" + secret + "$xyz\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "CRYPT": crypt form "$y$"`,
		},
		{
			name:  "bcrypt's $2x$",
			input: "a:{BLF-CRYPT}$2x" + secretBcrypt[3:] + "\n",
			is:    ErrUnsupportedScheme,
			text:  `line 1: unsupported password scheme "BLF-CRYPT": crypt form "$2x$"`,
		},
		{
			name:  "not a crypt value",
			input: "a:" + secret + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: CRYPT: not a crypt hash`,
		},
		{
			name:  "an unclosed brace is a CRYPT value",
			input: "a:{PLAIN" + secret + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: CRYPT: not a crypt hash`,
		},
		{
			name:  "digest of the wrong length",
			input: "a:{SHA256}c2VjcmV0\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: SHA256: 6 bytes, want 32`,
		},
		{
			name:  "not hex",
			input: "a:{SHA.HEX}" + secret + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: SHA: not hex`,
		},
		{
			name:  "not base64",
			input: "a:{SSHA}" + secret + "!\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: SSHA: not base64`,
		},
		{
			name:  "a salted digest without salt",
			input: "a:{SSHA}AAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: SSHA: 20 bytes, want more than 20`,
		},
		{
			name:  "MD5-CRYPT that is not",
			input: "a:{MD5-CRYPT}" + secret + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: MD5-CRYPT: not an MD5-crypt hash`,
		},
		{
			name:  "a short bcrypt",
			input: "a:{BLF-CRYPT}" + secretBcrypt[:59] + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: BLF-CRYPT: not a bcrypt hash`,
		},
		{
			name:  "bcrypt cost out of range",
			input: "a:{BLF-CRYPT}$2y$32" + secretBcrypt[6:] + "\n",
			is:    ErrMalformedPassword,
			text:  `line 1: malformed password: BLF-CRYPT: bcrypt cost out of range`,
		},
		{
			name:  "a NUL byte",
			input: "a:{PLAIN}" + secret + "\x00\n",
			is:    ErrNUL,
			text:  `line 1: NUL byte in line`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tbl, err := Parse(strings.NewReader(tt.input))
			if err == nil {
				t.Fatalf("Parse succeeded with %d entries", tbl.Len())
			}
			if !errors.Is(err, tt.is) {
				t.Errorf("error %q is not %q", err, tt.is)
			}
			var le *LineError
			if !errors.As(err, &le) || le.Path != "" {
				t.Errorf("error %q is not a *LineError without a path", err)
			}
			if want := "passwdfile: " + tt.text; err.Error() != want {
				t.Errorf("error text\n got %s\nwant %s", err, want)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "hunter") {
				t.Errorf("error %q holds the password", err)
			}
		})
	}
}

func TestParseLimits(t *testing.T) {
	t.Parallel()
	t.Run("line too long", func(t *testing.T) {
		t.Parallel()
		for _, n := range []int{11, 12, 13, 100} { // just over the limit, and past Scanner's buffer
			input := "a:{PLAIN}x\nb:{PLAIN}" + strings.Repeat("p", n-len("b:{PLAIN}")) + "\n"
			_, err := parse(strings.NewReader(input), "", 1<<20, 10)
			if !errors.Is(err, ErrLineTooLong) || !strings.Contains(err.Error(), "line 2:") {
				t.Errorf("a line of %d bytes: %v", n, err)
			}
			if err != nil && strings.Contains(err.Error(), "ppp") {
				t.Errorf("error %q holds the password", err)
			}
		}
		if _, err := parse(strings.NewReader("b:{PLAIN}x\r\n"), "", 1<<20, 10); err != nil {
			t.Errorf("a line at the limit with CRLF: %v", err)
		}
	})
	t.Run("file too large", func(t *testing.T) {
		t.Parallel()
		input := "a:{PLAIN}x\nb:{PLAIN}y\n"
		if _, err := parse(strings.NewReader(input), "", int64(len(input)), 100); err != nil {
			t.Errorf("a file at the limit: %v", err)
		}
		for _, max := range []int64{int64(len(input)) - 1, 14, 3} {
			if _, err := parse(strings.NewReader(input), "", max, 100); !errors.Is(err, ErrFileTooLarge) {
				t.Errorf("a file over a limit of %d: %v", max, err)
			}
		}
	})
}

func TestLoad(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "users")
	if err := os.WriteFile(path, []byte("alice:{PLAIN}pw\nbob:{NOPE}hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	var le *LineError
	if !errors.As(err, &le) || le.Path != path || le.Line != 2 {
		t.Fatalf("Load: %v, want a *LineError for line 2 of %s", err, path)
	}
	if want := fmt.Sprintf(`passwdfile: %s: line 2: unknown password scheme "NOPE"`, path); err.Error() != want {
		t.Errorf("error text\n got %s\nwant %s", err, want)
	}

	if err := os.WriteFile(path, []byte("alice:{PLAIN}pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tbl, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := tbl.Lookup("alice"); !ok || !e.Verify("pw") {
		t.Error("alice does not verify")
	}

	if _, err := Load(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v", err)
	}

	// A sparse file over the limit is refused before it is read.
	big := filepath.Join(dir, "big")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(MaxFileSize + 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := Load(big); !errors.Is(err, ErrFileTooLarge) || !strings.Contains(err.Error(), big) {
		t.Errorf("Load of a file over MaxFileSize: %v", err)
	}
}

// TestEntryString checks that formatting an entry, or its verifier, leaves
// out a clear-text password.
func TestEntryString(t *testing.T) {
	t.Parallel()
	tbl, err := Parse(strings.NewReader("alice:{PLAIN}hunter2:::::: host=a\n"))
	if err != nil {
		t.Fatal(err)
	}
	e, _ := tbl.Lookup("alice")
	for _, s := range []string{
		fmt.Sprint(e), fmt.Sprintf("%v %+v %s", e, e, e), fmt.Sprintf("%v %+v", e.Verifier(), e.Verifier()),
	} {
		if strings.Contains(s, "hunter2") {
			t.Errorf("formatted entry %q holds the password", s)
		}
	}
	if got := e.String(); got != "alice (PLAIN, line 1)" {
		t.Errorf("String() = %q", got)
	}
}
