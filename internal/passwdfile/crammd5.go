package passwdfile

import (
	"crypto/md5"
	"crypto/subtle"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"hash"
)

// CRAMMD5 is Dovecot's CRAM-MD5 (alias HMAC-MD5) scheme. Dovecot stores
// not the password but the two MD5 states HMAC-MD5 reaches after hashing
// the password's outer and inner pads (hmac-cram-md5.c: outer a, b, c, d,
// then inner a, b, c, d, each a little-endian 32-bit word, written as 64
// hex digits). From those a server can answer any CRAM-MD5 challenge
// (RFC 2195) without the password.
type CRAMMD5 struct {
	outer, inner [4]uint32
	ok           bool // false when the states could not be computed
}

// parseCRAMMD5 reads the 32 decoded bytes; decode has checked the length.
func parseCRAMMD5(_ string, raw []byte) (Verifier, error) {
	c := &CRAMMD5{ok: true}
	for i := range 4 {
		c.outer[i] = binary.LittleEndian.Uint32(raw[4*i:])
		c.inner[i] = binary.LittleEndian.Uint32(raw[16+4*i:])
	}
	return c, nil
}

// NewCRAMMD5 returns the CRAM-MD5 verifier of a clear-text password, the
// value Dovecot would store for it: HMAC-MD5 keyed with the password (an
// MD5 of it when longer than 64 bytes), stopped after the pads.
func NewCRAMMD5(password string) *CRAMMD5 {
	key := []byte(password)
	if len(key) > md5.BlockSize {
		sum := md5.Sum(key)
		key = sum[:]
	}
	var ipad, opad [md5.BlockSize]byte
	copy(ipad[:], key)
	copy(opad[:], key)
	for i := range ipad {
		ipad[i] ^= 0x36
		opad[i] ^= 0x5c
	}
	c := &CRAMMD5{}
	var okOuter, okInner bool
	c.outer, okOuter = md5State(opad[:])
	c.inner, okInner = md5State(ipad[:])
	c.ok = okOuter && okInner
	return c
}

// Verify implements Verifier by computing the stored states from password.
func (c *CRAMMD5) Verify(password string) bool {
	if password == "" || !c.ok {
		return false
	}
	other := NewCRAMMD5(password)
	return other.ok && subtle.ConstantTimeCompare(c.context(), other.context()) == 1
}

// VerifyResponse reports whether response, the hex digest a CRAM-MD5
// client sends after its user name (RFC 2195 section 2), answers challenge,
// the server's challenge string such as "<1896.697170952@example.net>". It
// finishes HMAC-MD5 from the stored states, so it works for entries stored
// as CRAM-MD5 as well as for clear-text ones (through NewCRAMMD5).
func (c *CRAMMD5) VerifyResponse(challenge, response string) bool {
	want, err := hex.DecodeString(response) // any case, though RFC 2195 sends lower case
	if err != nil || len(want) != md5.Size || !c.ok {
		return false
	}
	inner, ok := md5Resume(c.inner)
	if !ok {
		return false
	}
	inner.Write([]byte(challenge))
	outer, ok := md5Resume(c.outer)
	if !ok {
		return false
	}
	outer.Write(inner.Sum(nil))
	return subtle.ConstantTimeCompare(outer.Sum(nil), want) == 1
}

// context returns the states in Dovecot's stored byte order.
func (c *CRAMMD5) context() []byte {
	b := make([]byte, 0, 32)
	for _, w := range c.outer {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	for _, w := range c.inner {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	return b
}

// crypto/md5 exports no compression function, but its hashes marshal
// their state (package hash: implementations keep accepting state that
// earlier Go versions wrote): "md5\x01", the four state words big-endian,
// the 64-byte block buffer, and the message length big-endian. That is
// all HMAC-MD5 needs to start from Dovecot's stored states. Should the
// format ever change, both functions fail closed, and the tests against
// crypto/hmac and doveadm fail loudly.
const (
	md5StateMagic = "md5\x01"
	md5StateSize  = len(md5StateMagic) + 4*4 + md5.BlockSize + 8
)

// md5State returns MD5's state after hashing one 64-byte block.
func md5State(block []byte) (s [4]uint32, ok bool) {
	h := md5.New()
	h.Write(block)
	b, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil || len(b) != md5StateSize || string(b[:len(md5StateMagic)]) != md5StateMagic {
		return s, false
	}
	for i := range s {
		s[i] = binary.BigEndian.Uint32(b[len(md5StateMagic)+4*i:])
	}
	return s, true
}

// md5Resume returns an MD5 hash that continues from state s after one
// 64-byte block.
func md5Resume(s [4]uint32) (hash.Hash, bool) {
	b := make([]byte, 0, md5StateSize)
	b = append(b, md5StateMagic...)
	for _, w := range s {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	b = append(b, make([]byte, md5.BlockSize)...)
	b = binary.BigEndian.AppendUint64(b, md5.BlockSize)
	h := md5.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(b); err != nil {
		return nil, false
	}
	return h, true
}
