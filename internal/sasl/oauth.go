package sasl

import (
	"bytes"
	"strings"
)

// OAuthBearer is the OAUTHBEARER mechanism (RFC 7628): a GS2 header with the
// user, then key=value pairs separated by 0x01, one of them
// "auth=Bearer <token>". Credentials holds the user and, in Password, the token.
type OAuthBearer struct {
	creds Credentials
	asked bool
}

// NewOAuthBearer returns an OAUTHBEARER server.
func NewOAuthBearer() *OAuthBearer { return &OAuthBearer{} }

// Next implements Server.
func (o *OAuthBearer) Next(response []byte) ([]byte, bool, error) {
	if response == nil {
		if o.asked {
			return nil, false, ErrUnexpected
		}
		o.asked = true
		return []byte{}, false, nil
	}
	// gs2-header: "n," or "y," then "a=<user>," (RFC 5801 §4).
	header, rest, ok := bytes.Cut(response, []byte{0x01})
	if !ok {
		return nil, false, ErrInvalidResponse
	}
	parts := strings.Split(string(header), ",")
	if len(parts) < 3 || (parts[0] != "n" && parts[0] != "y") {
		return nil, false, ErrInvalidResponse
	}
	var user string
	if strings.HasPrefix(parts[1], "a=") {
		user = strings.NewReplacer("=2C", ",", "=3D", "=").Replace(parts[1][2:])
	}
	token := bearerToken(rest)
	if user == "" || token == "" || !valid(user, token) {
		return nil, false, ErrInvalidResponse
	}
	o.creds = Credentials{Username: user, Password: token}
	return nil, true, nil
}

// Credentials implements Server.
func (o *OAuthBearer) Credentials() Credentials { return o.creds }

// XOAuth2 is the XOAUTH2 mechanism of large mail providers:
// "user=<user>\x01auth=Bearer <token>\x01\x01".
type XOAuth2 struct {
	creds Credentials
	asked bool
}

// NewXOAuth2 returns an XOAUTH2 server.
func NewXOAuth2() *XOAuth2 { return &XOAuth2{} }

// Next implements Server.
func (x *XOAuth2) Next(response []byte) ([]byte, bool, error) {
	if response == nil {
		if x.asked {
			return nil, false, ErrUnexpected
		}
		x.asked = true
		return []byte{}, false, nil
	}
	var user string
	for _, kv := range bytes.Split(response, []byte{0x01}) {
		if v, ok := bytes.CutPrefix(kv, []byte("user=")); ok {
			user = string(v)
		}
	}
	token := bearerToken(response)
	if user == "" || token == "" || !valid(user, token) {
		return nil, false, ErrInvalidResponse
	}
	x.creds = Credentials{Username: user, Password: token}
	return nil, true, nil
}

// Credentials implements Server.
func (x *XOAuth2) Credentials() Credentials { return x.creds }

// bearerToken finds "auth=Bearer <token>" among 0x01-separated pairs.
func bearerToken(kvs []byte) string {
	for _, kv := range bytes.Split(kvs, []byte{0x01}) {
		v, ok := bytes.CutPrefix(kv, []byte("auth="))
		if !ok {
			continue
		}
		scheme, token, ok := strings.Cut(string(v), " ")
		if ok && strings.EqualFold(scheme, "Bearer") {
			return strings.TrimSpace(token)
		}
	}
	return ""
}
