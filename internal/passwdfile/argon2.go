package passwdfile

import (
	"crypto/subtle"
	"encoding/base64"
	"strconv"
	"strings"

	"golang.org/x/crypto/argon2"
)

// argon2Hash is an Argon2i or Argon2id value in the PHC string format that
// libsodium writes and Dovecot stores for ARGON2I and ARGON2ID:
// "$argon2id$v=19$m=65536,t=3,p=1$salt$hash", salt and hash in base64
// without padding.
type argon2Hash struct {
	id      bool // Argon2id rather than Argon2i
	time    uint32
	memory  uint32 // KiB
	threads uint8
	salt    []byte
	sum     []byte
}

// parseArgon2 checks a value as libsodium's crypto_pwhash_str_verify, which
// Dovecot calls, would. Like it, either scheme name takes either variant:
// the value names its own.
func parseArgon2(name string, raw []byte) (Verifier, error) {
	bad := func(reason string) (Verifier, error) { return nil, malformed(name, reason) }
	parts := strings.Split(string(raw), "$")
	if len(parts) != 6 || parts[0] != "" {
		return bad("not an Argon2 hash")
	}
	var h argon2Hash
	switch parts[1] {
	case "argon2i":
	case "argon2id":
		h.id = true
	default:
		return bad("not an Argon2i or Argon2id hash")
	}
	if parts[2] != "v=19" {
		// x/crypto/argon2, like current libsodium, implements version
		// 0x13 only.
		return bad("Argon2 version other than 19")
	}
	params := strings.Split(parts[3], ",")
	if len(params) != 3 {
		return bad("Argon2 parameters not m=,t=,p=")
	}
	var m, t, p uint64
	for i, dst := range []*uint64{&m, &t, &p} {
		v, ok := strings.CutPrefix(params[i], "mtp"[i:i+1]+"=")
		n, err := strconv.ParseUint(v, 10, 32)
		if !ok || err != nil {
			return bad("Argon2 parameters not m=,t=,p=")
		}
		*dst = n
	}
	// Argon2's own limits: at least one pass, 1 to 255 lanes here
	// (x/crypto's thread count is a uint8; libsodium writes p=1), and
	// 8 KiB of memory per lane.
	if t < 1 || p < 1 || p > 255 || m < 8*p {
		return bad("Argon2 parameters out of range")
	}
	h.time, h.memory, h.threads = uint32(t), uint32(m), uint8(p)
	var err error
	if h.salt, err = base64.RawStdEncoding.DecodeString(parts[4]); err != nil || len(h.salt) < 8 {
		return bad("Argon2 salt not 8 or more bytes of unpadded base64")
	}
	if h.sum, err = base64.RawStdEncoding.DecodeString(parts[5]); err != nil || len(h.sum) < 16 {
		return bad("Argon2 hash not 16 or more bytes of unpadded base64")
	}
	return h, nil
}

func (h argon2Hash) Verify(password string) bool {
	if password == "" {
		return false
	}
	derive := argon2.Key
	if h.id {
		derive = argon2.IDKey
	}
	sum := derive([]byte(password), h.salt, h.time, h.memory, h.threads, uint32(len(h.sum)))
	return subtle.ConstantTimeCompare(sum, h.sum) == 1
}
