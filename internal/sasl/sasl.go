// Package sasl holds the server side of the SASL mechanisms the proxy
// terminates. Each yields the client's credentials for the upstream login.
// They are shaped like emersion/go-sasl servers: Next(response) returns the
// next challenge until done.
package sasl

import (
	"errors"
	"strings"
)

// Errors returned by the mechanisms. None carries client data.
var (
	ErrInvalidResponse = errors.New("sasl: invalid response")
	ErrUnexpected      = errors.New("sasl: unexpected client response")
)

// Credentials are what the client claimed. Identity is the authorization
// identity (empty: act as Username).
type Credentials struct {
	Identity string
	Username string
	Password string
}

// Server is one authentication exchange.
type Server interface {
	// Next takes the client's response (nil: the client sent no initial
	// response) and returns the next challenge, or done with the result
	// in Credentials.
	Next(response []byte) (challenge []byte, done bool, err error)
	// Credentials returns what the exchange yielded once done.
	Credentials() Credentials
}

// valid refuses values that would break or smuggle an upstream command.
func valid(values ...string) bool {
	for _, v := range values {
		if strings.ContainsAny(v, "\r\n\x00") {
			return false
		}
	}
	return true
}
