package sasl

// Login is the LOGIN mechanism (draft-murchison-sasl-login): the server asks
// "Username:" then "Password:". An initial response is the user name.
type Login struct {
	creds Credentials
	step  int
}

// NewLogin returns a LOGIN server.
func NewLogin() *Login { return &Login{} }

var (
	usernameChallenge = []byte("Username:")
	passwordChallenge = []byte("Password:")
)

// Next implements Server.
func (l *Login) Next(response []byte) ([]byte, bool, error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return usernameChallenge, false, nil
		}
		return l.Next(response)
	case 1:
		if len(response) == 0 || !valid(string(response)) {
			return nil, false, ErrInvalidResponse
		}
		l.creds.Username = string(response)
		l.step = 2
		return passwordChallenge, false, nil
	case 2:
		if len(response) == 0 || !valid(string(response)) {
			return nil, false, ErrInvalidResponse
		}
		l.creds.Password = string(response)
		l.step = 3
		return nil, true, nil
	}
	return nil, false, ErrUnexpected
}

// Credentials implements Server.
func (l *Login) Credentials() Credentials { return l.creds }
