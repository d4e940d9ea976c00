package passwdfile

import (
	"crypto/md5"
	"crypto/subtle"
	"fmt"
	"hash"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// cryptAlphabet is crypt(3)'s base64 alphabet, in the order of the MD5- and
// SHA-crypt encodings (bcrypt uses the same characters in another order).
const cryptAlphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// parseCrypt parses a crypt(3) value by its "$id$" prefix, as libc's crypt()
// chooses the algorithm behind Dovecot's CRYPT, SHA256-CRYPT and
// SHA512-CRYPT schemes.
func parseCrypt(name string, raw []byte) (Verifier, error) {
	v := string(raw)
	switch {
	case strings.HasPrefix(v, "$1$"):
		return parseMD5Crypt(name, raw)
	case strings.HasPrefix(v, "$2"):
		return parseBcrypt(name, raw)
	case strings.HasPrefix(v, "$5$"), strings.HasPrefix(v, "$6$"):
		return parseSHACrypt(name, v)
	case strings.HasPrefix(v, "$"):
		// yescrypt ($y$), scrypt ($7$), SunMD5, NT hashes...: crypt()
		// on the Dovecot host may know them; this package does not.
		id, _, ok := strings.Cut(v[1:], "$")
		if ok && id != "" && len(id) <= 8 && strings.Trim(id, "abcdefghijklmnopqrstuvwxyz0123456789") == "" {
			return nil, fmt.Errorf("%w %q: crypt form %q", ErrUnsupportedScheme, name, "$"+id+"$")
		}
		return nil, malformed(name, "unrecognised crypt form")
	case len(v) == 13 && inCryptAlphabet(v):
		// Traditional DES crypt: 8-character passwords and a 12-bit
		// salt, refused rather than carried along.
		return nil, fmt.Errorf("%w %q: traditional DES crypt", ErrUnsupportedScheme, name)
	default:
		return nil, malformed(name, "not a crypt hash")
	}
}

// inCryptAlphabet reports whether s is made of crypt(3)'s base64 characters.
func inCryptAlphabet(s string) bool {
	return strings.Trim(s, cryptAlphabet) == ""
}

// appendCrypt64 appends the n low-order 6-bit groups of the 24-bit value
// b2:b1:b0, least significant first, as MD5- and SHA-crypt encode their
// digests.
// cryptRounds is the stretching loop MD5-crypt has and SHA-crypt took
// from it: each round hashes the last digest with the password (p) and the
// salt (s) in an order set by the round's number.
func cryptRounds(h hash.Hash, c, p, s []byte, rounds int) []byte {
	for i := range rounds {
		h.Reset()
		if i&1 != 0 {
			h.Write(p)
		} else {
			h.Write(c)
		}
		if i%3 != 0 {
			h.Write(s)
		}
		if i%7 != 0 {
			h.Write(p)
		}
		if i&1 != 0 {
			h.Write(c)
		} else {
			h.Write(p)
		}
		c = h.Sum(c[:0])
	}
	return c
}

func appendCrypt64(dst []byte, b2, b1, b0 byte, n int) []byte {
	w := uint(b2)<<16 | uint(b1)<<8 | uint(b0)
	for range n {
		dst = append(dst, cryptAlphabet[w&0x3f])
		w >>= 6
	}
	return dst
}

// bcryptHash is a bcrypt value ($2a$, $2b$ or $2y$): Dovecot's BLF-CRYPT.
type bcryptHash []byte

// parseBcrypt checks a bcrypt value as Dovecot's crypt_verify_blowfish
// would accept it.
func parseBcrypt(name string, raw []byte) (Verifier, error) {
	v := string(raw)
	if len(v) < 4 || v[0] != '$' || v[1] != '2' || v[3] != '$' {
		return nil, malformed(name, "not a bcrypt hash")
	}
	switch v[2] {
	case 'a', 'b', 'y':
	case 'x':
		// crypt_blowfish's emulation of the old sign-extension bug for
		// 8-bit passwords, which x/crypto/bcrypt does not reproduce.
		return nil, fmt.Errorf("%w %q: crypt form \"$2x$\"", ErrUnsupportedScheme, name)
	default:
		return nil, malformed(name, "not a bcrypt hash")
	}
	// "$2y$" + 2-digit cost + "$" + 22 characters of salt + 31 of hash.
	if len(v) != 60 || v[6] != '$' || !inCryptAlphabet(v[7:]) {
		return nil, malformed(name, "not a bcrypt hash")
	}
	if _, err := bcrypt.Cost(raw); err != nil {
		return nil, malformed(name, "bcrypt cost out of range")
	}
	return bcryptHash(raw), nil
}

// Verify implements Verifier. Like every bcrypt, it uses only the first 72
// bytes of the password.
func (b bcryptHash) Verify(password string) bool {
	return password != "" && bcrypt.CompareHashAndPassword(b, []byte(password)) == nil
}

// md5Crypt is a "$1$salt$hash" value, Poul-Henning Kamp's MD5-crypt.
type md5Crypt struct {
	salt, full string
}

// parseMD5Crypt checks an MD5-crypt value. Dovecot verifies by comparing
// the whole recomputed string, so a value that crypt could not have made
// (a salt over 8 characters, a short hash) would never match: refuse it.
func parseMD5Crypt(name string, raw []byte) (Verifier, error) {
	v := string(raw)
	rest, ok := strings.CutPrefix(v, "$1$")
	if !ok {
		return nil, malformed(name, "not an MD5-crypt hash")
	}
	salt, sum, ok := strings.Cut(rest, "$")
	if !ok || len(salt) > 8 || len(sum) != 22 || !inCryptAlphabet(sum) {
		return nil, malformed(name, "not an MD5-crypt hash")
	}
	return md5Crypt{salt: salt, full: v}, nil
}

func (m md5Crypt) Verify(password string) bool {
	return password != "" && subtle.ConstantTimeCompare([]byte(md5CryptHash(password, m.salt)), []byte(m.full)) == 1
}

// md5CryptHash returns "$1$salt$hash" for password, as FreeBSD's crypt-md5.c
// and Dovecot's password-scheme-md5crypt.c compute it. salt holds at most 8
// characters and no '$'.
func md5CryptHash(password, salt string) string {
	const magic = "$1$"
	p, s := []byte(password), []byte(salt)
	h := md5.New()
	h.Write(p)
	h.Write(s)
	h.Write(p)
	alt := h.Sum(nil)

	h.Reset()
	h.Write(p)
	h.Write([]byte(magic))
	h.Write(s)
	for n := len(p); n > 0; n -= md5.Size {
		h.Write(alt[:min(n, md5.Size)])
	}
	// The original wipes alt and then reads its first byte here, so a set
	// bit adds a zero byte.
	for i := len(p); i != 0; i >>= 1 {
		if i&1 != 0 {
			h.Write([]byte{0})
		} else {
			h.Write(p[:1])
		}
	}
	final := h.Sum(nil)

	// 1000 rounds, meant to slow down a 1990s attacker.
	final = cryptRounds(h, final, p, s, 1000)

	out := make([]byte, 0, len(magic)+len(salt)+1+22)
	out = append(out, magic...)
	out = append(out, salt...)
	out = append(out, '$')
	out = appendCrypt64(out, final[0], final[6], final[12], 4)
	out = appendCrypt64(out, final[1], final[7], final[13], 4)
	out = appendCrypt64(out, final[2], final[8], final[14], 4)
	out = appendCrypt64(out, final[3], final[9], final[15], 4)
	out = appendCrypt64(out, final[4], final[10], final[5], 4)
	out = appendCrypt64(out, 0, 0, final[11], 2)
	return string(out)
}
