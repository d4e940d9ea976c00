package sasl

import (
	"bytes"
	"encoding/hex"
)

// CRAMMD5 is the CRAM-MD5 mechanism (RFC 2195). The proxy cannot check the
// digest itself: Credentials holds the user name and, in Password, the
// lower-case hex digest, for an auth server or an upstream that knows the
// secret and the challenge.
type CRAMMD5 struct {
	challenge []byte
	creds     Credentials
	step      int
}

// NewCRAMMD5 returns a CRAM-MD5 server that sends challenge, an RFC 2195
// msg-id such as "<12345.1234567@host>".
func NewCRAMMD5(challenge string) *CRAMMD5 { return &CRAMMD5{challenge: []byte(challenge)} }

// Next implements Server. A client may not send an initial response.
func (c *CRAMMD5) Next(response []byte) ([]byte, bool, error) {
	switch c.step {
	case 0:
		if response != nil {
			return nil, false, ErrUnexpected
		}
		c.step = 1
		return c.challenge, false, nil
	case 1:
		c.step = 2
		i := bytes.LastIndexByte(response, ' ')
		if i <= 0 {
			return nil, false, ErrInvalidResponse
		}
		user, digest := string(response[:i]), string(response[i+1:])
		if _, err := hex.DecodeString(digest); err != nil || len(digest) != 32 || !valid(user) {
			return nil, false, ErrInvalidResponse
		}
		c.creds = Credentials{Username: user, Password: string(bytes.ToLower([]byte(digest)))}
		return nil, true, nil
	}
	return nil, false, ErrUnexpected
}

// Credentials implements Server.
func (c *CRAMMD5) Credentials() Credentials { return c.creds }
