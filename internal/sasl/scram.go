package sasl

import (
	"bytes"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"
)

// Bounds on the PBKDF2 iteration count of SCRAM keys. RFC 7677 §4 asks
// for at least 4096, as RFC 5802 does; the upper bound keeps a typo in a
// passwd-file from making every client spin for minutes on each login.
const (
	MinSCRAMIterations = 4096
	MaxSCRAMIterations = 1 << 20
)

const (
	// maxSCRAMMessage bounds each client message. The longest legitimate
	// one holds two user names of up to 254 octets, each up to three
	// times as long once "," and "=" are escaped.
	maxSCRAMMessage = 2048
	// serverNonceBytes is the random part of the server nonce, 24
	// characters once in base64: RFC 5802 §5.1 wants a nonce that differs
	// on every exchange and cannot be guessed.
	serverNonceBytes = 18
	// fakeSaltBytes and fakeIterations give fake keys their shape unless
	// the lookup says otherwise (see SCRAMLookup).
	fakeSaltBytes  = 16
	fakeIterations = MinSCRAMIterations
)

// Errors of the SCRAM mechanisms. Those about the client's messages wrap
// ErrInvalidResponse; none carries client data.
var (
	// ErrUnknownUser is what a SCRAMLookup returns, possibly wrapped, for a
	// user it does not know. Next then returns an error wrapping it at the
	// end of the exchange, where a wrong password gives ErrBadProof.
	ErrUnknownUser = errors.New("sasl: unknown user")
	// ErrBadProof is a client proof that does not match the stored key:
	// a wrong password.
	ErrBadProof = errors.New("sasl: scram: wrong client proof")
	// ErrBadSCRAMKeys wraps what is wrong with the keys a lookup returned.
	ErrBadSCRAMKeys = errors.New("sasl: unusable scram keys")
	// ErrChannelBinding is a client that asks for channel binding ("p=" in
	// its GS2 header, RFC 5802 §6) in a mechanism without -PLUS, or for a
	// type other than tls-exporter, the only one a -PLUS server here binds.
	ErrChannelBinding = fmt.Errorf("%w: scram: channel binding (p=) requested, but only -PLUS with tls-exporter binds", ErrInvalidResponse)
	// ErrDowngrade is a client that chose a -PLUS mechanism without binding
	// ("n" or "y"), or that says it thinks the server cannot bind ("y")
	// where a -PLUS variant is offered: the server must then fail, as a man
	// in the middle may have removed -PLUS from the list the client saw
	// (RFC 5802 §6).
	ErrDowngrade = fmt.Errorf("%w: scram: no channel binding where the server offers it", ErrInvalidResponse)
	// ErrSCRAMExtension is a mandatory extension ("m=", RFC 5802 §5.1),
	// which this version of SCRAM must refuse.
	ErrSCRAMExtension = fmt.Errorf("%w: scram: mandatory extension (m=) not supported", ErrInvalidResponse)
	// ErrBindingMismatch is -PLUS binding data that is not this
	// connection's: the client's TLS ends elsewhere (a man in the middle
	// relaying its login).
	ErrBindingMismatch = fmt.Errorf("%w: scram: channel binding data does not match this connection", ErrInvalidResponse)
)

// SCRAMKeys are what a server keeps for one SCRAM user (RFC 5802 §3): the
// salt and iteration count the client needs to derive its SaltedPassword,
// StoredKey to check the client's proof and ServerKey to prove itself.
type SCRAMKeys struct {
	Iterations int
	Salt       []byte
	StoredKey  []byte
	ServerKey  []byte
}

// DeriveSCRAMKeys derives the keys for password (RFC 5802 §3):
// SaltedPassword = PBKDF2-HMAC-H(password, salt, iterations),
// StoredKey = H(HMAC(SaltedPassword, "Client Key")) and
// ServerKey = HMAC(SaltedPassword, "Server Key"). h is sha1.New or
// sha256.New. The password is used as given: RFC 5802 §2.2 asks for
// SASLprep, which changes only some non-ASCII passwords, and clients that
// skip it too (many do) then still match.
//
// It returns an error for an iteration count outside MinSCRAMIterations
// and MaxSCRAMIterations, an empty salt, or what crypto/pbkdf2 refuses
// (in FIPS 140-only mode: SHA-1 and salts under 16 bytes).
func DeriveSCRAMKeys(h func() hash.Hash, password string, salt []byte, iterations int) (SCRAMKeys, error) {
	if iterations < MinSCRAMIterations || iterations > MaxSCRAMIterations {
		return SCRAMKeys{}, fmt.Errorf("%w: %d iterations, outside %d to %d", ErrBadSCRAMKeys, iterations, MinSCRAMIterations, MaxSCRAMIterations)
	}
	if len(salt) == 0 {
		return SCRAMKeys{}, fmt.Errorf("%w: empty salt", ErrBadSCRAMKeys)
	}
	salted, err := pbkdf2.Key(h, password, salt, iterations, h().Size())
	if err != nil {
		return SCRAMKeys{}, fmt.Errorf("deriving scram keys: %w", err)
	}
	clientKey := hmacSum(h, salted, "Client Key")
	stored := h()
	stored.Write(clientKey)
	return SCRAMKeys{
		Iterations: iterations,
		Salt:       bytes.Clone(salt),
		StoredKey:  stored.Sum(nil),
		ServerKey:  hmacSum(h, salted, "Server Key"),
	}, nil
}

// SCRAMLookup returns the keys of the user authcid, who asks to act as
// authzid (empty: as authcid). An error (ErrUnknownUser for a user it does
// not know) does not end the exchange at once: it goes on with fake keys
// and fails at its end with an error wrapping the lookup's, so a client
// cannot tell whether a user exists (RFC 5802 §9). The fake keys use the
// iteration count and salt length of the SCRAMKeys returned with the
// error if it has them (only their shape, the salt's bytes are not used),
// else 4096 and 16 bytes: a store whose users all share other values can
// so make unknown users look like known ones.
type SCRAMLookup func(authcid, authzid string) (SCRAMKeys, error)

// SCRAM is the server side of a SCRAM mechanism: SCRAM-SHA-1 (RFC 5802),
// SCRAM-SHA-256 (RFC 7677), or SCRAM-SHA-256-PLUS, bound to the TLS
// connection with tls-exporter (RFC 5802 §6, RFC 9266). It checks the
// client's proof itself against keys from a SCRAMLookup, so Credentials
// holds no password.
//
// The exchange takes one step more than RFC 5802 §5 shows. POP3's +OK
// carries no "additional data with success" (RFC 5034 §4), so, as SASL
// (RFC 4422) has such protocols do, the server-final-message "v=..." goes
// out as a challenge (done false) that the client answers with an empty
// response, and only then is Next done. Clients expect it: gsasl sends that empty
// response (see the tests). The session's SASL loop (auth.go,
// saslExchange) needs nothing special, and its +OK (or -ERR, if the
// upstream login fails after all) follows the empty response.
type SCRAM struct {
	name     string // the mechanism
	hashName string // keys the fake keys: the same with -PLUS and without, as a real user's are
	newHash  func() hash.Hash
	lookup   SCRAMLookup
	// plus: this is the -PLUS variant, which binds to cbData.
	// plusOffered: a -PLUS variant is offered too, so "y" is a downgrade.
	plus        bool
	cbData      []byte
	plusOffered bool
	// serverNonce replaces the random server nonce when set: tests use it
	// to replay the RFC examples.
	serverNonce string

	step            scramStep
	asked           bool // an empty challenge was sent for the client-first-message
	gs2Header       string
	clientFirstBare string
	serverFirst     string
	nonce           string // client nonce and server nonce
	authcid         string
	authzid         string
	keys            SCRAMKeys
	lookupErr       error
	serverFinal     []byte
	creds           Credentials
}

type scramStep int

const (
	scramClientFirst scramStep = iota // waiting for client-first-message
	scramClientFinal                  // server-first-message sent
	scramEmpty                        // server-final-message sent, waiting for the empty response
	scramDone
	scramFailed
)

// NewSCRAMSHA256 returns a SCRAM-SHA-256 server (RFC 7677) that asks
// lookup, once, for the keys of the user the client names. lookup must
// not be nil.
func NewSCRAMSHA256(lookup SCRAMLookup) *SCRAM {
	return &SCRAM{name: "SCRAM-SHA-256", hashName: "SHA-256", newHash: sha256.New, lookup: lookup}
}

// NewSCRAMSHA1 returns a SCRAM-SHA-1 server (RFC 5802) that asks lookup,
// once, for the keys of the user the client names. lookup must not be nil.
func NewSCRAMSHA1(lookup SCRAMLookup) *SCRAM {
	return &SCRAM{name: "SCRAM-SHA-1", hashName: "SHA-1", newHash: sha1.New, lookup: lookup}
}

// NewSCRAMSHA256Plus returns a SCRAM-SHA-256-PLUS server bound to one TLS
// connection by its tls-exporter channel binding (RFC 9266), cbData: what
// crypto/tls's ConnectionState.ExportKeyingMaterial("EXPORTER-Channel-Binding",
// nil, 32) returns for it. RFC 9266 defines tls-exporter for TLS 1.3 (TLS
// 1.2 only with extended master secret), so offer -PLUS on TLS 1.3
// connections only. The client must send "p=tls-exporter" and prove it
// sees the same value. An empty cbData makes every exchange fail. lookup
// must not be nil.
func NewSCRAMSHA256Plus(lookup SCRAMLookup, cbData []byte) *SCRAM {
	s := NewSCRAMSHA256(lookup)
	s.name, s.plus, s.cbData, s.plusOffered = "SCRAM-SHA-256-PLUS", true, bytes.Clone(cbData), true
	return s
}

// PLUSOffered tells a server without -PLUS that the -PLUS variant is
// offered to the same client, so that a client flag "y" ("I can bind, but
// I think you cannot") is a downgrade and fails (RFC 5802 §6). It returns s.
func (s *SCRAM) PLUSOffered() *SCRAM {
	s.plusOffered = true
	return s
}

// Next implements Server. After any error the exchange is over and every
// further call fails.
func (s *SCRAM) Next(response []byte) ([]byte, bool, error) {
	challenge, done, err := s.next(response)
	if err != nil {
		s.step = scramFailed
	}
	return challenge, done, err
}

func (s *SCRAM) next(response []byte) ([]byte, bool, error) {
	if len(response) > maxSCRAMMessage {
		return nil, false, fmt.Errorf("%w: scram: message too long", ErrInvalidResponse)
	}
	switch s.step {
	case scramClientFirst:
		if response == nil {
			// No initial response: ask for the client-first-message with an
			// empty challenge (RFC 5034 §4), once.
			if s.asked {
				return nil, false, ErrUnexpected
			}
			s.asked = true
			return []byte{}, false, nil
		}
		if err := s.readClientFirst(string(response)); err != nil {
			return nil, false, err
		}
		s.step = scramClientFinal
		return []byte(s.serverFirst), false, nil
	case scramClientFinal:
		if response == nil {
			return nil, false, ErrUnexpected
		}
		if err := s.readClientFinal(string(response)); err != nil {
			return nil, false, err
		}
		s.step = scramEmpty
		return s.serverFinal, false, nil
	case scramEmpty:
		if len(response) != 0 {
			return nil, false, fmt.Errorf("%w: scram: non-empty response to the server-final-message", ErrInvalidResponse)
		}
		s.step = scramDone
		s.creds = Credentials{Username: s.authcid, Identity: s.authzid}
		if s.authzid == s.authcid {
			s.creds.Identity = "" // as Plain does: acting as oneself is no authzid
		}
		return nil, true, nil
	}
	return nil, false, ErrUnexpected
}

// Credentials implements Server: once done, the authenticated user
// (authcid) in Username and the authorization identity in Identity.
func (s *SCRAM) Credentials() Credentials { return s.creds }

// readClientFirst parses a client-first-message (RFC 5802 §7):
//
//	gs2-header ["m=" ext ","] "n=" saslname "," "r=" c-nonce ["," extensions]
//
// with gs2-header = ("n" / "y" / "p=" cb-name) "," ["a=" saslname] ",",
// then looks the user up and prepares the server-first-message.
func (s *SCRAM) readClientFirst(msg string) error {
	flag, rest, ok := strings.Cut(msg, ",")
	if !ok {
		return invalidSCRAM("no gs2 header")
	}
	switch {
	case flag == "n" && s.plus:
		return ErrDowngrade
	case flag == "y" && s.plusOffered:
		return ErrDowngrade
	case flag == "n", flag == "y":
		// "y" without -PLUS on offer: the client could bind but rightly
		// thinks we cannot (RFC 5802 §6).
	case strings.HasPrefix(flag, "p="):
		if !s.plus || flag != "p=tls-exporter" || len(s.cbData) == 0 {
			return ErrChannelBinding
		}
	default:
		return invalidSCRAM("bad channel binding flag")
	}
	authzField, bare, ok := strings.Cut(rest, ",")
	if !ok {
		return invalidSCRAM("no gs2 header")
	}
	if authzField != "" {
		v, ok := strings.CutPrefix(authzField, "a=")
		if !ok {
			return invalidSCRAM("bad authzid")
		}
		authzid, err := decodeSASLName(v)
		if err != nil {
			return err
		}
		s.authzid = authzid
	}
	s.gs2Header = msg[:len(msg)-len(bare)]
	s.clientFirstBare = bare

	attrs := strings.Split(bare, ",")
	if strings.HasPrefix(attrs[0], "m=") {
		return ErrSCRAMExtension
	}
	user, ok := strings.CutPrefix(attrs[0], "n=")
	if !ok {
		return invalidSCRAM("no user name")
	}
	authcid, err := decodeSASLName(user)
	if err != nil {
		return err
	}
	s.authcid = authcid
	if len(attrs) < 2 {
		return invalidSCRAM("no nonce")
	}
	clientNonce, ok := strings.CutPrefix(attrs[1], "r=")
	if !ok || !printable(clientNonce) {
		return invalidSCRAM("bad nonce")
	}
	if err := checkExtensions(attrs[2:]); err != nil {
		return err
	}

	keys, err := s.lookup(s.authcid, s.authzid)
	if err != nil {
		s.lookupErr = err
		keys = s.fakeKeys(keys)
	} else if err := s.checkKeys(keys); err != nil {
		return err
	}
	s.keys = keys

	serverNonce := s.serverNonce
	if serverNonce == "" {
		b := make([]byte, serverNonceBytes)
		_, _ = rand.Read(b) // never fails (crypto/rand, Go 1.24)
		serverNonce = base64.StdEncoding.EncodeToString(b)
	}
	s.nonce = clientNonce + serverNonce
	s.serverFirst = "r=" + s.nonce + ",s=" + base64.StdEncoding.EncodeToString(keys.Salt) + ",i=" + strconv.Itoa(keys.Iterations)
	return nil
}

// readClientFinal parses a client-final-message (RFC 5802 §7):
//
//	"c=" base64(gs2-header) "," "r=" nonce ["," extensions] "," "p=" base64(proof)
//
// checks the proof (RFC 5802 §3) and prepares the server-final-message.
func (s *SCRAM) readClientFinal(msg string) error {
	i := strings.LastIndexByte(msg, ',')
	if i < 0 {
		return invalidSCRAM("no proof")
	}
	withoutProof := msg[:i]
	proof64, ok := strings.CutPrefix(msg[i+1:], "p=")
	if !ok {
		return invalidSCRAM("no proof")
	}
	attrs := strings.Split(withoutProof, ",")
	if len(attrs) < 2 {
		return invalidSCRAM("no channel binding or nonce")
	}
	if strings.HasPrefix(attrs[0], "m=") {
		return ErrSCRAMExtension
	}
	cb64, ok := strings.CutPrefix(attrs[0], "c=")
	if !ok {
		return invalidSCRAM("no channel binding")
	}
	// c= is the GS2 header exactly as the client sent it, then with -PLUS
	// the channel binding data (RFC 5802 §7, cbind-input): a client that
	// changed its mind about "y" or the authzid, or that sees another TLS
	// connection (a man in the middle), fails here.
	cb, err := base64.StdEncoding.Strict().DecodeString(cb64)
	if err != nil {
		return invalidSCRAM("bad channel binding base64")
	}
	data, ok := bytes.CutPrefix(cb, []byte(s.gs2Header))
	if !ok {
		return invalidSCRAM("channel binding does not match the gs2 header")
	}
	if s.plus && !hmac.Equal(data, s.cbData) {
		return ErrBindingMismatch
	}
	if !s.plus && len(data) != 0 {
		return invalidSCRAM("channel binding data without -PLUS")
	}
	nonce, ok := strings.CutPrefix(attrs[1], "r=")
	if !ok || nonce != s.nonce {
		return invalidSCRAM("nonce does not match")
	}
	if err := checkExtensions(attrs[2:]); err != nil {
		return err
	}
	proof, err := base64.StdEncoding.Strict().DecodeString(proof64)
	if err != nil {
		return invalidSCRAM("bad proof base64")
	}
	if len(proof) != s.newHash().Size() {
		return invalidSCRAM("bad proof length")
	}

	// RFC 5802 §3: ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage),
	// and the proof holds when H(ClientKey) is StoredKey. The check runs for
	// fake keys too, so an unknown user costs the same time.
	authMessage := s.clientFirstBare + "," + s.serverFirst + "," + withoutProof
	clientKey := hmacSum(s.newHash, s.keys.StoredKey, authMessage)
	subtle.XORBytes(clientKey, clientKey, proof)
	h := s.newHash()
	h.Write(clientKey)
	match := subtle.ConstantTimeCompare(h.Sum(nil), s.keys.StoredKey) == 1
	if s.lookupErr != nil {
		return fmt.Errorf("sasl: scram: looking up the user: %w", s.lookupErr)
	}
	if !match {
		return ErrBadProof
	}
	s.serverFinal = []byte("v=" + base64.StdEncoding.EncodeToString(hmacSum(s.newHash, s.keys.ServerKey, authMessage)))
	return nil
}

// checkKeys refuses keys that do not fit the mechanism's hash or the
// bounds on the iteration count.
func (s *SCRAM) checkKeys(k SCRAMKeys) error {
	size := s.newHash().Size()
	switch {
	case k.Iterations < MinSCRAMIterations || k.Iterations > MaxSCRAMIterations:
		return fmt.Errorf("%w: %d iterations, outside %d to %d", ErrBadSCRAMKeys, k.Iterations, MinSCRAMIterations, MaxSCRAMIterations)
	case len(k.Salt) == 0:
		return fmt.Errorf("%w: empty salt", ErrBadSCRAMKeys)
	case len(k.StoredKey) != size || len(k.ServerKey) != size:
		return fmt.Errorf("%w: keys are not %d bytes long as %s needs", ErrBadSCRAMKeys, size, s.name)
	}
	return nil
}

// fakeKeys makes keys for a user the lookup did not give: the same for the
// same hash and user name for the life of the process, as a real
// user's salt is, so that asking twice does not tell them apart (RFC 5802
// §9; Dovecot and Cyrus do the same). shape gives the iteration count and
// salt length.
func (s *SCRAM) fakeKeys(shape SCRAMKeys) SCRAMKeys {
	iterations, saltLen := fakeIterations, fakeSaltBytes
	if shape.Iterations >= MinSCRAMIterations && shape.Iterations <= MaxSCRAMIterations {
		iterations = shape.Iterations
	}
	if n := len(shape.Salt); n > 0 && n <= 64 {
		saltLen = n
	}
	size := s.newHash().Size()
	return SCRAMKeys{
		Iterations: iterations,
		Salt:       fakeBytes(s.hashName, "salt", s.authcid, saltLen),
		StoredKey:  fakeBytes(s.hashName, "stored key", s.authcid, size),
		ServerKey:  fakeBytes(s.hashName, "server key", s.authcid, size),
	}
}

// fakeSecret keys the fake keys; it lives as long as the process, so
// restarting the proxy changes them (as a reload of Dovecot does).
var fakeSecret = sync.OnceValue(func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand, Go 1.24)
	return b
})

// fakeBytes returns n bytes of HMAC-SHA-256 under fakeSecret over the
// hash name, the purpose and the user name, in counter mode.
func fakeBytes(hashName, purpose, user string, n int) []byte {
	var out []byte
	for counter := byte(0); len(out) < n; counter++ {
		mac := hmac.New(sha256.New, fakeSecret())
		mac.Write([]byte{counter})
		mac.Write([]byte(hashName + "\x00" + purpose + "\x00" + user))
		out = mac.Sum(out)
	}
	return out[:n]
}

func hmacSum(h func() hash.Hash, key []byte, msg string) []byte {
	mac := hmac.New(h, key)
	mac.Write([]byte(msg))
	return mac.Sum(nil)
}

// decodeSASLName undoes RFC 5802 §5.1's escapes in a user name: "=2C" is
// ",", "=3D" is "=", and any other "=" is an error. The name must be
// non-empty UTF-8 and carry no CR, LF or NUL (see valid).
func decodeSASLName(s string) (string, error) {
	if s == "" {
		return "", invalidSCRAM("empty name")
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '=' {
			b.WriteByte(s[i])
			continue
		}
		switch {
		case strings.HasPrefix(s[i+1:], "2C"):
			b.WriteByte(',')
		case strings.HasPrefix(s[i+1:], "3D"):
			b.WriteByte('=')
		default:
			return "", invalidSCRAM("bad escape in name")
		}
		i += 2
	}
	name := b.String()
	if !utf8.ValidString(name) || !valid(name) {
		return "", invalidSCRAM("bad character in name")
	}
	return name, nil
}

// printable is RFC 5802 §7's nonce: one or more of %x21-7E except ",".
func printable(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e || s[i] == ',' {
			return false
		}
	}
	return true
}

// checkExtensions checks optional attributes (RFC 5802 §7: attr-val is
// ALPHA "=" value). Unknown ones are ignored, but "m" must make the
// exchange fail (RFC 5802 §5.1).
func checkExtensions(attrs []string) error {
	for _, a := range attrs {
		if len(a) < 3 || a[1] != '=' || !isAlpha(a[0]) || !utf8.ValidString(a) || strings.IndexByte(a, 0) >= 0 {
			return invalidSCRAM("bad attribute")
		}
		if a[0] == 'm' {
			return ErrSCRAMExtension
		}
	}
	return nil
}

func isAlpha(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }

func invalidSCRAM(what string) error {
	return fmt.Errorf("%w: scram: %s", ErrInvalidResponse, what)
}

var _ Server = (*SCRAM)(nil)
