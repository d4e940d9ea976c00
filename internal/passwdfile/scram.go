package passwdfile

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash"
	"math"
	"strconv"
	"strings"
)

// SCRAM iteration limits, Dovecot's (password-scheme-scram.c): RFC 5802
// section 5.1 asks for at least 4096.
const (
	scramMinIterations = 4096
	scramMaxIterations = math.MaxInt32
)

// SCRAM holds what a SCRAM server mechanism (RFC 5802, RFC 7677) needs
// for one user: Dovecot's SCRAM-SHA-1 and SCRAM-SHA-256 schemes store
// "iterations,salt,StoredKey,ServerKey", the last three in base64. The
// fields of a parsed entry's SCRAM are shared: treat them as read-only.
type SCRAM struct {
	// Mechanism is "SCRAM-SHA-1" or "SCRAM-SHA-256".
	Mechanism string
	// Iterations is the PBKDF2 iteration count.
	Iterations int
	// Salt is the PBKDF2 salt, decoded (a server sends it base64-encoded).
	Salt []byte
	// StoredKey is H(ClientKey), with ClientKey = HMAC(SaltedPassword,
	// "Client Key").
	StoredKey []byte
	// ServerKey is HMAC(SaltedPassword, "Server Key").
	ServerKey []byte
}

// scramHash returns the hash function of a SCRAM mechanism name.
func scramHash(mechanism string) (func() hash.Hash, bool) {
	switch mechanism {
	case "SCRAM-SHA-1":
		return sha1.New, true
	case "SCRAM-SHA-256":
		return sha256.New, true
	}
	return nil, false
}

// Hash returns the mechanism's hash function, H in RFC 5802.
func (s *SCRAM) Hash() func() hash.Hash {
	h, _ := scramHash(s.Mechanism)
	return h
}

// parseSCRAM reads Dovecot's value, checking what its scram_scheme_parse
// checks.
func parseSCRAM(name string, raw []byte) (Verifier, error) {
	newHash, _ := scramHash(name)
	size := newHash().Size()
	fields := strings.Split(string(raw), ",")
	if len(fields) != 4 {
		return nil, malformed(name, "not iterations,salt,StoredKey,ServerKey")
	}
	n, err := strconv.Atoi(fields[0])
	if err != nil || n < scramMinIterations || n > scramMaxIterations {
		return nil, malformed(name, "iteration count not a number from 4096 to 2147483647")
	}
	s := &SCRAM{Mechanism: name, Iterations: n}
	var ok bool
	if s.Salt, ok = decodeBase64(fields[1]); !ok || len(s.Salt) == 0 {
		return nil, malformed(name, "salt not base64")
	}
	if s.StoredKey, ok = decodeBase64(fields[2]); !ok || len(s.StoredKey) != size {
		return nil, malformed(name, fmt.Sprintf("StoredKey not %d bytes of base64", size))
	}
	if s.ServerKey, ok = decodeBase64(fields[3]); !ok || len(s.ServerKey) != size {
		return nil, malformed(name, fmt.Sprintf("ServerKey not %d bytes of base64", size))
	}
	return s, nil
}

// NewSCRAM derives the SCRAM keys of a clear-text password, for serving a
// SCRAM mechanism to a user stored in PLAIN. Like Dovecot, it uses the
// password as it is, without SASLprep. iterations must be from 4096 to
// 2147483647 and salt must not be empty.
func NewSCRAM(mechanism, password string, salt []byte, iterations int) (*SCRAM, error) {
	newHash, ok := scramHash(mechanism)
	if !ok {
		return nil, fmt.Errorf("passwdfile: unknown SCRAM mechanism %q", mechanism)
	}
	if iterations < scramMinIterations || iterations > scramMaxIterations {
		return nil, errors.New("passwdfile: SCRAM iteration count not from 4096 to 2147483647")
	}
	if len(salt) == 0 {
		return nil, errors.New("passwdfile: empty SCRAM salt")
	}
	storedKey, serverKey, err := scramKeys(newHash, password, salt, iterations)
	if err != nil {
		return nil, fmt.Errorf("passwdfile: deriving SCRAM keys: %w", err)
	}
	return &SCRAM{
		Mechanism:  mechanism,
		Iterations: iterations,
		Salt:       append([]byte(nil), salt...),
		StoredKey:  storedKey,
		ServerKey:  serverKey,
	}, nil
}

// scramKeys derives StoredKey and ServerKey (RFC 5802 section 3).
func scramKeys(newHash func() hash.Hash, password string, salt []byte, iterations int) (storedKey, serverKey []byte, err error) {
	salted, err := pbkdf2.Key(newHash, password, salt, iterations, newHash().Size())
	if err != nil {
		return nil, nil, err
	}
	mac := hmac.New(newHash, salted)
	mac.Write([]byte("Client Key"))
	clientKey := mac.Sum(nil)
	h := newHash()
	h.Write(clientKey)
	storedKey = h.Sum(nil)
	mac = hmac.New(newHash, salted)
	mac.Write([]byte("Server Key"))
	return storedKey, mac.Sum(nil), nil
}

// Verify implements Verifier by deriving the keys from password and
// comparing StoredKey, as Dovecot's scram_verify does.
func (s *SCRAM) Verify(password string) bool {
	newHash, ok := scramHash(s.Mechanism)
	if password == "" || !ok {
		return false
	}
	storedKey, _, err := scramKeys(newHash, password, s.Salt, s.Iterations)
	return err == nil && subtle.ConstantTimeCompare(storedKey, s.StoredKey) == 1
}
