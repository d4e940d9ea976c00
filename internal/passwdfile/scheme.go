package passwdfile

import (
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"
	"strconv"
	"strings"
)

// Verifier checks passwords against one stored password.
type Verifier interface {
	// Verify reports whether password matches. Where it compares secrets
	// or digests it does so in constant time (only a length may show),
	// and the empty password never matches.
	Verify(password string) bool
}

// valueEncoding is how a scheme's binary value is written in the file.
type valueEncoding int

const (
	encNone valueEncoding = iota // the value is used as it is
	encBase64
	encHex
)

// scheme describes one of Dovecot's password schemes, as its
// builtin_schemes table in password-scheme.c does.
type scheme struct {
	enc    valueEncoding // default encoding
	rawLen int           // fixed decoded length; 0: any
	// parse checks a decoded, non-empty value and returns its verifier.
	// name is the scheme name in upper case, for error text.
	parse func(name string, raw []byte) (Verifier, error)
}

// schemes are the supported schemes by upper-case name (Dovecot compares
// names case-insensitively).
var schemes = map[string]scheme{
	"PLAIN":     {encNone, 0, parsePlain},
	"CLEAR":     {encNone, 0, parsePlain},
	"CLEARTEXT": {encNone, 0, parsePlain},

	"PLAIN-MD5": {encHex, md5.Size, digestOf(md5.New)},
	"LDAP-MD5":  {encBase64, md5.Size, digestOf(md5.New)},
	"MD5":       {encNone, 0, parseMD5},
	"SMD5":      {encBase64, 0, saltedDigestOf(md5.New)},
	"SHA":       {encBase64, sha1.Size, digestOf(sha1.New)},
	"SHA1":      {encBase64, sha1.Size, digestOf(sha1.New)},
	"SHA256":    {encBase64, sha256.Size, digestOf(sha256.New)},
	"SHA512":    {encBase64, sha512.Size, digestOf(sha512.New)},
	"SSHA":      {encBase64, 0, saltedDigestOf(sha1.New)},
	"SSHA256":   {encBase64, 0, saltedDigestOf(sha256.New)},
	"SSHA512":   {encBase64, 0, saltedDigestOf(sha512.New)},

	// Dovecot's SHA256-CRYPT, SHA512-CRYPT and CRYPT all call crypt(),
	// which picks the algorithm by the value's "$id$" prefix; MD5-CRYPT
	// and BLF-CRYPT insist on their own.
	"CRYPT":        {encNone, 0, parseCrypt},
	"SHA256-CRYPT": {encNone, 0, parseCrypt},
	"SHA512-CRYPT": {encNone, 0, parseCrypt},
	"MD5-CRYPT":    {encNone, 0, parseMD5Crypt},
	"BLF-CRYPT":    {encNone, 0, parseBcrypt},

	"ARGON2I":  {encNone, 0, parseArgon2},
	"ARGON2ID": {encNone, 0, parseArgon2},

	"CRAM-MD5": {encHex, 32, parseCRAMMD5},
	"HMAC-MD5": {encHex, 32, parseCRAMMD5},

	"SCRAM-SHA-1":   {encNone, 0, parseSCRAM},
	"SCRAM-SHA-256": {encNone, 0, parseSCRAM},
}

// unsupported are schemes Dovecot knows that this package does not
// implement; naming them apart from unknown ones tells the operator the
// file is fine for Dovecot.
var unsupported = map[string]bool{
	"DES-CRYPT":   true, // 8-character passwords, a 12-bit salt
	"PLAIN-TRUNC": true,
	"PLAIN-MD4":   true,
	"DIGEST-MD5":  true, // a digest of user, realm and password
	"OTP":         true,
	"PBKDF2":      true, // Dovecot's own format, not SCRAM's
}

// parsePassword splits a password field into scheme and value, as Dovecot's
// passwd_file_add and password_get_scheme do, and parses the value.
func parsePassword(field string) (name, stored string, v Verifier, err error) {
	if field == "" {
		return "", "", noPassword{}, nil
	}
	name, value := "CRYPT", field // Dovecot's passwd-file default scheme
	if n := len(field); n > 4 && field[0] != '{' && field[0] != '$' && field[n-1] == ']' && field[n-4] == '[' {
		// "password[NN]", libpam-pwdfile's format, which Dovecot reads:
		// 34 is MD5, 56 DIGEST-MD5, anything else crypt.
		value = field[:n-4]
		switch field[n-3 : n-1] {
		case "34":
			name = "PLAIN-MD5"
		case "56":
			name = "DIGEST-MD5"
		}
	} else if rest, ok := strings.CutPrefix(field, "$1$"); ok && strings.Contains(rest, "$") {
		// A bare "$1$salt$hash" is MD5-CRYPT to Dovecot, which ignores
		// anything from the next '$' on.
		name = "MD5-CRYPT"
		i := strings.IndexByte(rest, '$')
		if j := strings.IndexByte(rest[i+1:], '$'); j >= 0 {
			value = field[:len("$1$")+i+1+j]
		}
	} else if field[0] == '{' {
		if end := strings.IndexByte(field, '}'); end > 0 {
			name, value = field[1:end], field[end+1:]
		}
		// Without '}' the whole field is a CRYPT value, as in Dovecot.
	}

	base, encName, explicit := strings.Cut(name, ".")
	upper := strings.ToUpper(base)
	s, ok := schemes[upper]
	if !ok {
		if unsupported[upper] {
			return "", "", nil, fmt.Errorf("%w %s", ErrUnsupportedScheme, quoteName(name))
		}
		return "", "", nil, fmt.Errorf("%w %s", ErrUnknownScheme, quoteName(name))
	}
	enc := s.enc
	if explicit {
		switch strings.ToUpper(encName) {
		case "B64", "BASE64":
			enc = encBase64
		case "HEX":
			enc = encHex
		default:
			// Dovecot treats an unknown encoding as an unknown scheme.
			return "", "", nil, fmt.Errorf("%w %s", ErrUnknownScheme, quoteName(name))
		}
	}
	if value == "" {
		// Dovecot fails every login against an empty value.
		return upper, "", noPassword{}, nil
	}
	raw, err := decode(upper, value, s, enc, explicit)
	if err != nil {
		return "", "", nil, err
	}
	v, err = s.parse(upper, raw)
	if err != nil {
		return "", "", nil, err
	}
	return upper, value, v, nil
}

// decode turns a value into the scheme's raw bytes, as Dovecot's
// password_decode does: without an explicit encoding, a fixed-length scheme
// takes hex when the value is twice the raw length and base64 otherwise.
func decode(name, value string, s scheme, enc valueEncoding, explicit bool) ([]byte, error) {
	guessed := false
	if !explicit && enc != encNone && s.rawLen != 0 {
		enc, guessed = encBase64, true
		if len(value) == 2*s.rawLen {
			enc = encHex
		}
	}
	var raw []byte
	switch enc {
	case encNone:
		raw = []byte(value)
	case encHex:
		var err error
		if raw, err = hex.DecodeString(value); err == nil {
			break
		}
		if !guessed {
			return nil, malformed(name, "not hex")
		}
		// Some lengths fit both encodings; Dovecot then tries base64.
		fallthrough
	case encBase64:
		var ok bool
		if raw, ok = decodeBase64(value); !ok {
			return nil, malformed(name, "not base64")
		}
	}
	if s.rawLen != 0 && len(raw) != s.rawLen {
		return nil, malformed(name, fmt.Sprintf("%d bytes, want %d", len(raw), s.rawLen))
	}
	return raw, nil
}

// decodeBase64 decodes standard base64 with or without padding.
func decodeBase64(s string) ([]byte, bool) {
	if b, err := base64.StdEncoding.DecodeString(s); err == nil {
		return b, true
	}
	b, err := base64.RawStdEncoding.DecodeString(s)
	return b, err == nil
}

// malformed returns the error for a value that does not fit its scheme. The
// reason must describe the value's form, never its content.
func malformed(name, reason string) error {
	return fmt.Errorf("%w: %s: %s", ErrMalformedPassword, name, reason)
}

// quoteName quotes a scheme name for an error when it looks like one. A
// field holding something else between braces could be a password, which
// must stay out of errors.
func quoteName(name string) string {
	if name == "" || len(name) > 32 {
		return "(name not shown)"
	}
	for _, c := range name {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return "(name not shown)"
		}
	}
	return strconv.Quote(name)
}

// noPassword is the verifier of an entry without a password.
type noPassword struct{}

func (noPassword) Verify(string) bool { return false }

// plain is a clear-text password (PLAIN, CLEAR, CLEARTEXT).
type plain struct{ password string }

func parsePlain(_ string, raw []byte) (Verifier, error) { return plain{string(raw)}, nil }

func (p plain) Verify(password string) bool {
	return password != "" && subtle.ConstantTimeCompare([]byte(password), []byte(p.password)) == 1
}

// String keeps the password out of anything that formats a Verifier.
func (p plain) String() string { return "plain(REDACTED)" }

// digest is a hash of the password followed by an optional salt, stored as
// the hash followed by the salt (SHA, SSHA, SHA256, SSHA256, ..., PLAIN-MD5,
// LDAP-MD5, SMD5).
type digest struct {
	newHash func() hash.Hash
	sum     []byte
	salt    []byte // nil for the unsalted schemes
}

// digestOf returns the parser of an unsalted scheme; decode has checked the
// length.
func digestOf(newHash func() hash.Hash) func(string, []byte) (Verifier, error) {
	return func(_ string, raw []byte) (Verifier, error) {
		return digest{newHash: newHash, sum: raw}, nil
	}
}

// saltedDigestOf returns the parser of a salted scheme: the digest, then at
// least one byte of salt (Dovecot's ssha_verify refuses less).
func saltedDigestOf(newHash func() hash.Hash) func(string, []byte) (Verifier, error) {
	size := newHash().Size()
	return func(name string, raw []byte) (Verifier, error) {
		if len(raw) <= size {
			return nil, malformed(name, fmt.Sprintf("%d bytes, want more than %d", len(raw), size))
		}
		return digest{newHash: newHash, sum: raw[:size], salt: raw[size:]}, nil
	}
}

func (d digest) Verify(password string) bool {
	if password == "" {
		return false
	}
	h := d.newHash()
	h.Write([]byte(password))
	h.Write(d.salt)
	return subtle.ConstantTimeCompare(h.Sum(nil), d.sum) == 1
}

// parseMD5 parses Dovecot's MD5 scheme: MD5-CRYPT when the value starts with
// "$1$", PLAIN-MD5 otherwise.
func parseMD5(name string, raw []byte) (Verifier, error) {
	if strings.HasPrefix(string(raw), "$1$") {
		return parseMD5Crypt(name, raw)
	}
	// Not schemes["PLAIN-MD5"]: that would be an initialisation cycle.
	sum, err := decode(name, string(raw), scheme{encHex, md5.Size, nil}, encHex, false)
	if err != nil {
		return nil, err
	}
	return digest{newHash: md5.New, sum: sum}, nil
}
