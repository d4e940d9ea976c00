package passwdfile

import (
	"crypto/hmac"
	"crypto/md5"
	"encoding/hex"
	"strings"
	"testing"
)

// TestCRAMMD5RFC2195 runs the example of RFC 2195 section 2.
func TestCRAMMD5RFC2195(t *testing.T) {
	t.Parallel()
	const (
		challenge = "<1896.697170952@postoffice.reston.mci.net>"
		response  = "b913a602c7eda7a495b4e6e7334d3890"
	)
	c := NewCRAMMD5("tanstaaftanstaaf")
	if !c.VerifyResponse(challenge, response) {
		t.Fatal("the RFC's response does not verify")
	}
	// The same through a stored entry, as Dovecot would write it.
	e := parseField(t, "{CRAM-MD5}"+hex.EncodeToString(c.context()))
	stored, ok := e.CRAMMD5()
	if !ok || !stored.VerifyResponse(challenge, response) {
		t.Fatal("the RFC's response does not verify against the stored states")
	}
	if !e.Verify("tanstaaftanstaaf") || e.Verify("tanstaaftanstaaF") || e.Verify("") {
		t.Fatal("Verify does not check exactly the password")
	}
}

// TestCRAMMD5MatchesHMAC checks VerifyResponse against crypto/hmac for keys
// around the 64-byte block size (a longer key is hashed first) and
// challenges of several lengths.
func TestCRAMMD5MatchesHMAC(t *testing.T) {
	t.Parallel()
	for _, n := range []int{1, 16, 63, 64, 65, 200} {
		pw := strings.Repeat("k", n)
		c := NewCRAMMD5(pw)
		for _, m := range []int{0, 1, 55, 56, 64, 119, 1000} {
			challenge := strings.Repeat("c", m)
			mac := hmac.New(md5.New, []byte(pw))
			mac.Write([]byte(challenge))
			response := hex.EncodeToString(mac.Sum(nil))
			if !c.VerifyResponse(challenge, response) {
				t.Errorf("key %d bytes, challenge %d bytes: the right response does not verify", n, m)
			}
			wrong := []byte(response)
			wrong[0] ^= 1
			if c.VerifyResponse(challenge, string(wrong)) {
				t.Errorf("key %d bytes, challenge %d bytes: a wrong response verifies", n, m)
			}
		}
	}
	// An entry of any other scheme has no CRAM-MD5, a PLAIN one has.
	if _, ok := parseField(t, secretSHA256).CRAMMD5(); ok {
		t.Error("a SHA256 entry offers CRAM-MD5")
	}
	if c, ok := parseField(t, "{PLAIN}tanstaaftanstaaf").CRAMMD5(); !ok ||
		!c.VerifyResponse("<1896.697170952@postoffice.reston.mci.net>", "b913a602c7eda7a495b4e6e7334d3890") {
		t.Error("a PLAIN entry does not answer CRAM-MD5")
	}
	var zero CRAMMD5
	if zero.Verify("x") || zero.VerifyResponse("x", strings.Repeat("0", 32)) {
		t.Error("the zero CRAMMD5 verifies")
	}
}
