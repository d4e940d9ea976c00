package passwdfile

import (
	"bytes"
	"crypto/hmac"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// These tests check this package against Dovecot itself: every stored
// value comes from `doveadm pw`, never from this package, and where this
// package computes a stored form (CRAM-MD5 states, SCRAM keys) doveadm
// checks it with `doveadm pw -t`.

// doveadmPath returns Dovecot's doveadm. A missing doveadm fails the test:
// scripts/install-deps.sh installs it, and CI runs that first. A developer
// without Dovecot may set POP3_TEST_NO_DOVECOT=1 to skip instead.
func doveadmPath(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("doveadm")
	if err != nil {
		if _, serr := os.Stat("/usr/bin/doveadm"); serr == nil {
			path, err = "/usr/bin/doveadm", nil
		}
	}
	if err != nil {
		if os.Getenv("POP3_TEST_NO_DOVECOT") == "1" {
			t.Skip("doveadm not installed and POP3_TEST_NO_DOVECOT=1")
		}
		t.Fatalf("doveadm not found (scripts/install-deps.sh installs dovecot-core; POP3_TEST_NO_DOVECOT=1 skips these tests): %v", err)
	}
	return path
}

// doveadm runs doveadm with args and returns its output without the line
// end.
func doveadm(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(doveadmPath(t), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("doveadm %s: %v\n%s", args[0], err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// doveadmPW returns `doveadm pw -s scheme -p password [extra...]`: a
// "{SCHEME}value" password field.
func doveadmPW(t *testing.T, scheme, password string, extra ...string) string {
	t.Helper()
	field := doveadm(t, append([]string{"pw", "-s", scheme, "-p", password}, extra...)...)
	if !strings.HasPrefix(field, "{") {
		t.Fatalf("doveadm pw -s %s printed %q", scheme, field)
	}
	return field
}

// doveadmVerifies reports whether `doveadm pw -t field -p password` accepts.
func doveadmVerifies(t *testing.T, field, password string) bool {
	t.Helper()
	cmd := exec.Command(doveadmPath(t), "pw", "-t", field, "-p", password)
	out, err := cmd.CombinedOutput()
	if err == nil && bytes.Contains(out, []byte("(verified)")) {
		return true
	}
	if _, exit := err.(*exec.ExitError); !exit && err != nil {
		t.Fatalf("doveadm pw -t: %v", err)
	}
	return false
}

// doveadmPasswords are tried with every scheme. None holds ':', which a
// PLAIN password cannot hold in a passwd-file.
var doveadmPasswords = []string{
	"secret",
	"pässwörd ünïcödé",
	"p@ss w0rd #$%&*()[]{}<>'\"`~^|\\;,.?/",
	// Longer than the 64-byte HMAC key and SHA-256 block, and bcrypt's
	// 72 bytes.
	strings.Repeat("0123456789", 10) + "!",
}

// wrongPasswords returns passwords that must not verify in place of pw.
func wrongPasswords(pw string) []string {
	first := []byte(pw)
	first[0] ^= 1
	wrong := []string{"", "x" + pw, string(first)}
	if len(pw) < 72 {
		// bcrypt ignores what follows byte 72, as Dovecot's does.
		wrong = append(wrong, pw+"x", pw[:len(pw)-1])
	}
	return wrong
}

// parseField parses a one-line passwd-file holding field and returns its
// entry.
func parseField(t *testing.T, field string) *Entry {
	t.Helper()
	tbl, err := Parse(strings.NewReader("alice:" + field + ":1000:1000::/home/alice::nologin\n"))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	e, ok := tbl.Lookup("alice")
	if !ok {
		t.Fatal("alice not found")
	}
	return e
}

// checkVerifies checks that e verifies pw and none of wrong, by default
// wrongPasswords(pw).
func checkVerifies(t *testing.T, e *Entry, pw string, wrong ...string) {
	t.Helper()
	if !e.Verify(pw) {
		t.Errorf("%s: the right password %q does not verify", e.Scheme, pw)
	}
	if wrong == nil {
		wrong = wrongPasswords(pw)
	}
	for _, w := range wrong {
		if e.Verify(w) {
			t.Errorf("%s: the wrong password %q verifies (right: %q)", e.Scheme, w, pw)
		}
	}
}

// TestDoveadmSchemes checks every supported scheme against values doveadm
// writes: the right password verifies, wrong and empty ones do not.
func TestDoveadmSchemes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		scheme string   // given to doveadm pw -s
		want   string   // Entry.Scheme
		extra  []string // more doveadm pw arguments
		bare   bool     // also try the value without "{SCHEME}", as the default CRYPT
		// few: an alias or a variant of a scheme tried in full on
		// another row; one password is enough (each doveadm run takes
		// some 40 ms).
		few bool
	}{
		{scheme: "PLAIN", want: "PLAIN"},
		{scheme: "CLEAR", want: "CLEAR", few: true},
		{scheme: "CLEARTEXT", want: "CLEARTEXT", few: true},
		{scheme: "PLAIN.B64", want: "PLAIN"},
		{scheme: "PLAIN.HEX", want: "PLAIN", few: true},
		{scheme: "PLAIN-MD5", want: "PLAIN-MD5"},
		{scheme: "LDAP-MD5", want: "LDAP-MD5"},
		{scheme: "LDAP-MD5.HEX", want: "LDAP-MD5", few: true},
		{scheme: "SMD5", want: "SMD5"},
		{scheme: "SHA", want: "SHA"},
		{scheme: "SHA1", want: "SHA1", few: true},
		{scheme: "SHA.HEX", want: "SHA", few: true},
		{scheme: "SHA256", want: "SHA256"},
		{scheme: "SHA256.HEX", want: "SHA256"},
		{scheme: "SHA512", want: "SHA512"},
		{scheme: "SHA512.B64", want: "SHA512", few: true},
		{scheme: "SSHA", want: "SSHA"},
		{scheme: "SSHA.HEX", want: "SSHA", few: true},
		{scheme: "SSHA256", want: "SSHA256"},
		{scheme: "SSHA512", want: "SSHA512"},
		{scheme: "SSHA512.HEX", want: "SSHA512", few: true},
		{scheme: "MD5", want: "MD5"},
		{scheme: "MD5-CRYPT", want: "MD5-CRYPT", bare: true},
		{scheme: "BLF-CRYPT", want: "BLF-CRYPT", bare: true},
		{scheme: "BLF-CRYPT", want: "BLF-CRYPT", extra: []string{"-r", "4"}, bare: true, few: true},
		{scheme: "CRYPT", want: "CRYPT", bare: true},
		{scheme: "SHA256-CRYPT", want: "SHA256-CRYPT", bare: true},
		{scheme: "SHA256-CRYPT", want: "SHA256-CRYPT", extra: []string{"-r", "1000"}, bare: true, few: true},
		{scheme: "SHA512-CRYPT", want: "SHA512-CRYPT", bare: true},
		{scheme: "SHA512-CRYPT", want: "SHA512-CRYPT", extra: []string{"-r", "6000"}, bare: true, few: true},
		{scheme: "ARGON2I", want: "ARGON2I"},
		{scheme: "ARGON2ID", want: "ARGON2ID"},
		{scheme: "CRAM-MD5", want: "CRAM-MD5"},
		{scheme: "CRAM-MD5.B64", want: "CRAM-MD5", few: true},
		{scheme: "HMAC-MD5", want: "HMAC-MD5", few: true},
		{scheme: "SCRAM-SHA-1", want: "SCRAM-SHA-1"},
		{scheme: "SCRAM-SHA-256", want: "SCRAM-SHA-256"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(append([]string{tt.scheme}, tt.extra...), " "), func(t *testing.T) {
			t.Parallel()
			passwords, wrong := doveadmPasswords, []string(nil)
			if tt.few {
				passwords = passwords[1:2]
			}
			if strings.HasPrefix(tt.scheme, "ARGON2") {
				// 32 or 64 MiB and several passes per try, seconds
				// each under the race detector: one UTF-8 password,
				// one wrong one and the empty one.
				passwords = passwords[1:2]
				wrong = []string{"", "x" + passwords[0]}
			}
			for _, pw := range passwords {
				field := doveadmPW(t, tt.scheme, pw, tt.extra...)
				e := parseField(t, field)
				if e.Scheme != tt.want {
					t.Fatalf("Scheme = %q, want %q", e.Scheme, tt.want)
				}
				checkVerifies(t, e, pw, wrong...)
				if tt.bare {
					value := field[strings.IndexByte(field, '}')+1:]
					e := parseField(t, value)
					if e.Scheme != "CRYPT" && e.Scheme != "MD5-CRYPT" {
						t.Fatalf("bare value: Scheme = %q, want CRYPT or MD5-CRYPT", e.Scheme)
					}
					checkVerifies(t, e, pw)
				}
			}
		})
	}
}

// TestDoveadmHexGuess checks Dovecot's guess between hex and base64 for
// fixed-length schemes named without an encoding suffix.
func TestDoveadmHexGuess(t *testing.T) {
	t.Parallel()
	for _, scheme := range []string{"SHA", "SHA256", "SHA512", "PLAIN-MD5", "LDAP-MD5", "CRAM-MD5"} {
		for _, enc := range []string{".HEX", ".B64"} {
			field := doveadmPW(t, scheme+enc, "secret")
			value := field[strings.IndexByte(field, '}')+1:]
			e := parseField(t, "{"+scheme+"}"+value)
			checkVerifies(t, e, "secret")
		}
	}
}

// TestDoveadmCRAMMD5 checks CRAM-MD5 both ways: a response computed with
// crypto/hmac from the password passes VerifyResponse on doveadm's stored
// states, and the states NewCRAMMD5 computes pass `doveadm pw -t`.
func TestDoveadmCRAMMD5(t *testing.T) {
	t.Parallel()
	const challenge = "<1896.697170952@postoffice.example.net>"
	for _, pw := range doveadmPasswords {
		e := parseField(t, doveadmPW(t, "CRAM-MD5", pw))
		c, ok := e.CRAMMD5()
		if !ok {
			t.Fatal("CRAMMD5() of a CRAM-MD5 entry reports false")
		}
		mac := hmac.New(md5.New, []byte(pw))
		mac.Write([]byte(challenge))
		response := hex.EncodeToString(mac.Sum(nil))
		if !c.VerifyResponse(challenge, response) {
			t.Errorf("%q: the right response does not verify", pw)
		}
		if !c.VerifyResponse(challenge, strings.ToUpper(response)) {
			t.Errorf("%q: the right response in upper case does not verify", pw)
		}
		if c.VerifyResponse(challenge+" ", response) {
			t.Errorf("%q: the response verifies for another challenge", pw)
		}
		if c.VerifyResponse(challenge, response[:30]) || c.VerifyResponse(challenge, "") {
			t.Errorf("%q: a short response verifies", pw)
		}

		computed := "{CRAM-MD5}" + hex.EncodeToString(NewCRAMMD5(pw).context())
		if !doveadmVerifies(t, computed, pw) {
			t.Errorf("%q: doveadm refuses NewCRAMMD5's states", pw)
		}
		if doveadmVerifies(t, computed, "x"+pw) {
			t.Errorf("%q: doveadm accepts a wrong password against NewCRAMMD5's states", pw)
		}
	}
}

// TestDoveadmSCRAM checks that the parsed SCRAM fields are those doveadm
// wrote, that NewSCRAM derives the same keys from the password and salt,
// and that doveadm verifies NewSCRAM's keys with another salt.
func TestDoveadmSCRAM(t *testing.T) {
	t.Parallel()
	for _, mech := range []string{"SCRAM-SHA-1", "SCRAM-SHA-256"} {
		for _, pw := range doveadmPasswords[:2] {
			field := doveadmPW(t, mech, pw)
			e := parseField(t, field)
			s, ok := e.SCRAM()
			if !ok {
				t.Fatalf("%s: SCRAM() reports false", mech)
			}
			parts := strings.Split(field[strings.IndexByte(field, '}')+1:], ",")
			if s.Mechanism != mech || s.Iterations != 4096 ||
				base64.StdEncoding.EncodeToString(s.Salt) != parts[1] ||
				base64.StdEncoding.EncodeToString(s.StoredKey) != parts[2] ||
				base64.StdEncoding.EncodeToString(s.ServerKey) != parts[3] {
				t.Fatalf("%s: parsed %+v from %s", mech, s, field)
			}
			derived, err := NewSCRAM(mech, pw, s.Salt, s.Iterations)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(derived.StoredKey, s.StoredKey) || !bytes.Equal(derived.ServerKey, s.ServerKey) {
				t.Fatalf("%s: NewSCRAM derived other keys than doveadm", mech)
			}

			own, err := NewSCRAM(mech, pw, []byte("a salt of our own"), 5000)
			if err != nil {
				t.Fatal(err)
			}
			computed := "{" + mech + "}5000," + base64.StdEncoding.EncodeToString(own.Salt) + "," +
				base64.StdEncoding.EncodeToString(own.StoredKey) + "," + base64.StdEncoding.EncodeToString(own.ServerKey)
			if !doveadmVerifies(t, computed, pw) {
				t.Errorf("%s %q: doveadm refuses NewSCRAM's keys", mech, pw)
			}
			if doveadmVerifies(t, computed, "x"+pw) {
				t.Errorf("%s %q: doveadm accepts a wrong password against NewSCRAM's keys", mech, pw)
			}
		}
	}
}

// TestDoveadmClearPassword checks that ClearPassword gives back exactly the
// password of PLAIN entries, however encoded, and nothing for the others.
func TestDoveadmClearPassword(t *testing.T) {
	t.Parallel()
	for _, scheme := range []string{"PLAIN", "CLEARTEXT", "PLAIN.B64", "PLAIN.HEX"} {
		for _, pw := range doveadmPasswords[1:3] {
			e := parseField(t, doveadmPW(t, scheme, pw))
			if got, ok := e.ClearPassword(); !ok || got != pw {
				t.Errorf("%s: ClearPassword() = %q, %v; want %q", scheme, got, ok, pw)
			}
		}
	}
	for _, scheme := range []string{"SHA256", "SSHA512", "CRAM-MD5", "SCRAM-SHA-256", "MD5-CRYPT"} {
		e := parseField(t, doveadmPW(t, scheme, "secret"))
		if got, ok := e.ClearPassword(); ok || got != "" {
			t.Errorf("%s: ClearPassword() = %q, %v; want nothing", scheme, got, ok)
		}
	}
}
