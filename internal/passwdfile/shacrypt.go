package passwdfile

import (
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"strconv"
	"strings"
)

// SHA-crypt, Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512"
// (https://www.akkadia.org/drepper/SHA-crypt.txt): "$5$" and "$6$" values,
// Dovecot's SHA256-CRYPT and SHA512-CRYPT. It is written out here, after
// the specification, rather than imported: it is some 100 lines against the
// specification's own test vectors, where the Go modules that carry it
// either have no tagged release or bring a second copy of x/crypto's
// algorithms along.

const (
	shaCryptRoundsDefault = 5000
	shaCryptRoundsMin     = 1000
	shaCryptRoundsMax     = 999_999_999
	shaCryptSaltMax       = 16
)

// shaCryptParams are the parameters a "$5$" or "$6$" setting names.
type shaCryptParams struct {
	sha512 bool
	rounds int
	custom bool // "rounds=" was given, so the output repeats it
	salt   string
}

// shaCryptSetting reads "$5$[rounds=N$]salt[$...]" as the specification's
// reference code does: rounds are clamped to [1000, 999999999], the salt
// ends at '$' or after 16 characters.
func shaCryptSetting(setting string) shaCryptParams {
	p := shaCryptParams{rounds: shaCryptRoundsDefault}
	s, ok := strings.CutPrefix(setting, "$5$")
	if !ok {
		s = strings.TrimPrefix(setting, "$6$")
		p.sha512 = true
	}
	if rest, ok := strings.CutPrefix(s, "rounds="); ok {
		digits := len(rest) - len(strings.TrimLeft(rest, "0123456789"))
		if digits < len(rest) && rest[digits] == '$' {
			// strtoul's results: 0 for no digits, the maximum on
			// overflow; both end up clamped.
			var n uint64
			if digits > 0 {
				var err error
				if n, err = strconv.ParseUint(rest[:digits], 10, 64); err != nil {
					n = shaCryptRoundsMax
				}
			}
			p.rounds = int(min(max(n, shaCryptRoundsMin), shaCryptRoundsMax))
			p.custom = true
			s = rest[digits+1:]
		}
	}
	if i := strings.IndexByte(s, '$'); i >= 0 {
		s = s[:i]
	}
	p.salt = s[:min(len(s), shaCryptSaltMax)]
	return p
}

// prefix returns the setting part of the output: "$5$[rounds=N$]salt".
func (p shaCryptParams) prefix() string {
	id := "$5$"
	if p.sha512 {
		id = "$6$"
	}
	if p.custom {
		return id + "rounds=" + strconv.Itoa(p.rounds) + "$" + p.salt
	}
	return id + p.salt
}

// shaCrypt returns the full crypt string of password under p.
func shaCrypt(password string, p shaCryptParams) string {
	newHash, order := sha256.New, shaCrypt256Order
	if p.sha512 {
		newHash, order = sha512.New, shaCrypt512Order
	}
	pw, salt := []byte(password), []byte(p.salt)
	h := newHash()
	size := h.Size()

	// Digest B: password, salt, password.
	h.Write(pw)
	h.Write(salt)
	h.Write(pw)
	b := h.Sum(nil)

	// Digest A: password, salt, B once per len(password) bytes (the last
	// time cut short), then B or the password for each bit of the
	// password's length, lowest first.
	h.Reset()
	h.Write(pw)
	h.Write(salt)
	for n := len(pw); n > 0; n -= size {
		h.Write(b[:min(n, size)])
	}
	for n := len(pw); n > 0; n >>= 1 {
		if n&1 != 0 {
			h.Write(b)
		} else {
			h.Write(pw)
		}
	}
	a := h.Sum(nil)

	// P: the digest of the password repeated len(password) times,
	// stretched or cut to len(password) bytes; S likewise from the salt
	// repeated 16+A[0] times.
	h.Reset()
	for range len(pw) {
		h.Write(pw)
	}
	pSeq := repeatTo(h.Sum(nil), len(pw))
	h.Reset()
	for range 16 + int(a[0]) {
		h.Write(salt)
	}
	sSeq := repeatTo(h.Sum(nil), len(salt))

	c := cryptRounds(h, a, pSeq, sSeq, p.rounds)

	out := []byte(p.prefix() + "$")
	for i := 0; i+2 < len(order); i += 3 {
		out = appendCrypt64(out, c[order[i]], c[order[i+1]], c[order[i+2]], 4)
	}
	if p.sha512 {
		out = appendCrypt64(out, 0, 0, c[63], 2)
	} else {
		out = appendCrypt64(out, 0, c[31], c[30], 3)
	}
	return string(out)
}

// The byte order in which SHA-crypt encodes the final digest, three bytes
// to four characters; the last one or two bytes follow separately.
var (
	shaCrypt256Order = []byte{
		0, 10, 20, 21, 1, 11, 12, 22, 2, 3, 13, 23, 24, 4, 14,
		15, 25, 5, 6, 16, 26, 27, 7, 17, 18, 28, 8, 9, 19, 29,
	}
	shaCrypt512Order = []byte{
		0, 21, 42, 22, 43, 1, 44, 2, 23, 3, 24, 45, 25, 46, 4,
		47, 5, 26, 6, 27, 48, 28, 49, 7, 50, 8, 29, 9, 30, 51,
		31, 52, 10, 53, 11, 32, 12, 33, 54, 34, 55, 13, 56, 14, 35,
		15, 36, 57, 37, 58, 16, 59, 17, 38, 18, 39, 60, 40, 61, 19,
		62, 20, 41,
	}
)

// repeatTo returns n bytes of d repeated.
func repeatTo(d []byte, n int) []byte {
	out := make([]byte, n)
	for i := 0; i < n; i += len(d) {
		copy(out[i:], d)
	}
	return out
}

// shaCryptHash is a "$5$" or "$6$" value.
type shaCryptHash struct {
	params shaCryptParams
	full   string
}

// parseSHACrypt checks a SHA-crypt value. Dovecot verifies by comparing the
// whole recomputed string, so only a value crypt could have written can
// ever match: the canonical setting (rounds in range, written without
// leading zeros, a salt of at most 16 characters) and a hash of 43 or 86
// characters. Anything else is refused here.
func parseSHACrypt(name, v string) (Verifier, error) {
	p := shaCryptSetting(v)
	want := 43
	if p.sha512 {
		want = 86
	}
	sum, ok := strings.CutPrefix(v, p.prefix()+"$")
	if !ok || len(sum) != want || !inCryptAlphabet(sum) {
		return nil, malformed(name, "not a SHA-crypt hash")
	}
	return shaCryptHash{params: p, full: v}, nil
}

func (s shaCryptHash) Verify(password string) bool {
	return password != "" && subtle.ConstantTimeCompare([]byte(shaCrypt(password, s.params)), []byte(s.full)) == 1
}
