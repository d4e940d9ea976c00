package sasl

import "bytes"

// Plain is the PLAIN mechanism (RFC 4616): authzid NUL authcid NUL passwd.
type Plain struct {
	creds Credentials
	asked bool
}

// NewPlain returns a PLAIN server.
func NewPlain() *Plain { return &Plain{} }

// Next implements Server.
func (p *Plain) Next(response []byte) ([]byte, bool, error) {
	if response == nil {
		if p.asked {
			return nil, false, ErrUnexpected
		}
		p.asked = true
		return []byte{}, false, nil
	}
	parts := bytes.Split(response, []byte{0})
	if len(parts) != 3 {
		return nil, false, ErrInvalidResponse
	}
	c := Credentials{Identity: string(parts[0]), Username: string(parts[1]), Password: string(parts[2])}
	if c.Username == "" || c.Password == "" || !valid(c.Identity, c.Username, c.Password) {
		return nil, false, ErrInvalidResponse
	}
	if c.Identity == c.Username {
		c.Identity = ""
	}
	p.creds = c
	return nil, true, nil
}

// Credentials implements Server.
func (p *Plain) Credentials() Credentials { return p.creds }
