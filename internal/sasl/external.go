package sasl

// External is the EXTERNAL mechanism (RFC 4422 appendix A): the TLS client
// certificate authenticates; the client may name an authorization identity.
// Credentials holds that identity in Username (empty: none given).
type External struct {
	creds Credentials
	asked bool
	done  bool
}

// NewExternal returns an EXTERNAL server.
func NewExternal() *External { return &External{} }

// Next implements Server.
func (e *External) Next(response []byte) ([]byte, bool, error) {
	switch {
	case e.done:
		return nil, false, ErrUnexpected
	case response == nil && !e.asked:
		e.asked = true
		return []byte{}, false, nil
	case response == nil:
		return nil, false, ErrUnexpected
	}
	if !valid(string(response)) {
		return nil, false, ErrInvalidResponse
	}
	e.done = true
	e.creds = Credentials{Username: string(response)}
	return nil, true, nil
}

// Credentials implements Server.
func (e *External) Credentials() Credentials { return e.creds }
