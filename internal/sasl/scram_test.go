package sasl

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"hash"
	"strconv"
	"strings"
	"testing"
)

// scramUser is the user of the RFC 5802 and RFC 7677 examples.
const (
	scramUser     = "user"
	scramPassword = "pencil"
)

func mustDecode(t testing.TB, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustKeys(t testing.TB, h func() hash.Hash, password string, salt []byte, iterations int) SCRAMKeys {
	t.Helper()
	k, err := DeriveSCRAMKeys(h, password, salt, iterations)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// lookupOf returns a lookup that knows users, and records its calls.
func lookupOf(users map[string]SCRAMKeys, calls *[]string) SCRAMLookup {
	return func(authcid, authzid string) (SCRAMKeys, error) {
		if calls != nil {
			*calls = append(*calls, authcid+"/"+authzid)
		}
		k, ok := users[authcid]
		if !ok {
			return SCRAMKeys{}, ErrUnknownUser
		}
		return k, nil
	}
}

type scramMech struct {
	name string
	hash func() hash.Hash
	new  func(SCRAMLookup) *SCRAM
}

var scramMechs = []scramMech{
	{"SCRAM-SHA-1", sha1.New, NewSCRAMSHA1},
	{"SCRAM-SHA-256", sha256.New, NewSCRAMSHA256},
}

// scramClient is a minimal client for tests: it answers a server-first-message.
type scramClient struct {
	hash      func() hash.Hash
	password  string
	gs2Header string
	first     string // client-first-message-bare
	cbData    []byte // what the client sees of tls-exporter, for p=tls-exporter
}

func newSCRAMClient(h func() hash.Hash, password, gs2Header, user, nonce string) *scramClient {
	return &scramClient{hash: h, password: password, gs2Header: gs2Header, first: "n=" + user + ",r=" + nonce}
}

func (c *scramClient) clientFirst() []byte { return []byte(c.gs2Header + c.first) }

// final returns the client-final-message for serverFirst, and the
// server-final-message the client expects.
func (c *scramClient) final(t testing.TB, serverFirst string) (final, serverFinal string) {
	t.Helper()
	var nonce, salt string
	var iterations int
	for _, a := range strings.Split(serverFirst, ",") {
		switch {
		case strings.HasPrefix(a, "r="):
			nonce = a[2:]
		case strings.HasPrefix(a, "s="):
			salt = a[2:]
		case strings.HasPrefix(a, "i="):
			iterations, _ = strconv.Atoi(a[2:])
		}
	}
	withoutProof := "c=" + base64.StdEncoding.EncodeToString(append([]byte(c.gs2Header), c.cbData...)) + ",r=" + nonce
	authMessage := c.first + "," + serverFirst + "," + withoutProof
	// RFC 5802 §3, without DeriveSCRAMKeys.
	salted := pbkdf2Test(t, c.hash, c.password, mustDecode(t, salt), iterations)
	clientKey := hmacSum(c.hash, salted, "Client Key")
	h := c.hash()
	h.Write(clientKey)
	sig := hmacSum(c.hash, h.Sum(nil), authMessage)
	for i := range sig {
		sig[i] ^= clientKey[i]
	}
	serverSig := hmacSum(c.hash, hmacSum(c.hash, salted, "Server Key"), authMessage)
	return withoutProof + ",p=" + base64.StdEncoding.EncodeToString(sig), "v=" + base64.StdEncoding.EncodeToString(serverSig)
}

// pbkdf2Test is RFC 5802 §2.2's Hi(), written out rather than taken from
// crypto/pbkdf2, so the test does not only check the code against itself.
func pbkdf2Test(t testing.TB, h func() hash.Hash, password string, salt []byte, iterations int) []byte {
	t.Helper()
	mac := hmac.New(h, []byte(password))
	mac.Write(salt)
	mac.Write([]byte{0, 0, 0, 1})
	u := mac.Sum(nil)
	out := append([]byte(nil), u...)
	for i := 1; i < iterations; i++ {
		mac.Reset()
		mac.Write(u)
		u = mac.Sum(u[:0])
		for j := range out {
			out[j] ^= u[j]
		}
	}
	return out
}

func TestDeriveSCRAMKeys(t *testing.T) {
	t.Parallel()
	// The RFC 7677 §3 salt; the keys are what `gsasl --mkpasswd
	// --mechanism=SCRAM-SHA-256 --password=pencil --iteration-count=4096
	// --salt=W22ZaJ0SNY7soEsUEjb6gQ==` prints.
	k := mustKeys(t, sha256.New, scramPassword, mustDecode(t, "W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
	if got := base64.StdEncoding.EncodeToString(k.StoredKey); got != "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=" {
		t.Errorf("StoredKey %s", got)
	}
	if got := base64.StdEncoding.EncodeToString(k.ServerKey); got != "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=" {
		t.Errorf("ServerKey %s", got)
	}
	if k.Iterations != 4096 || base64.StdEncoding.EncodeToString(k.Salt) != "W22ZaJ0SNY7soEsUEjb6gQ==" {
		t.Errorf("got %d iterations, salt %x", k.Iterations, k.Salt)
	}
	for _, tc := range []struct {
		name       string
		salt       []byte
		iterations int
	}{
		{"too few iterations", []byte("salt"), 4095},
		{"too many iterations", []byte("salt"), 1<<20 + 1},
		{"empty salt", nil, 4096},
	} {
		if _, err := DeriveSCRAMKeys(sha256.New, "pw", tc.salt, tc.iterations); !errors.Is(err, ErrBadSCRAMKeys) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestSCRAMRFCExamples replays the example exchanges of RFC 5802 §5
// (SCRAM-SHA-1) and RFC 7677 §3 (SCRAM-SHA-256) byte for byte, plus the
// empty response POP3 adds after the server-final-message.
func TestSCRAMRFCExamples(t *testing.T) {
	t.Parallel()
	tests := []struct {
		mech        func(SCRAMLookup) *SCRAM
		hash        func() hash.Hash
		salt        string
		serverNonce string
		messages    [4]string // client-first, server-first, client-final, server-final
	}{
		{
			NewSCRAMSHA1, sha1.New, "QSXCR+Q6sek8bf92", "3rfcNHYJY1ZVvWVs7j",
			[4]string{
				"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
				"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
				"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
				"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
			},
		},
		{
			NewSCRAMSHA256, sha256.New, "W22ZaJ0SNY7soEsUEjb6gQ==", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
			[4]string{
				"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
				"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
				"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
				"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
			},
		},
	}
	for _, tc := range tests {
		var calls []string
		keys := mustKeys(t, tc.hash, scramPassword, mustDecode(t, tc.salt), 4096)
		s := tc.mech(lookupOf(map[string]SCRAMKeys{scramUser: keys}, &calls))
		s.serverNonce = tc.serverNonce
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			// No initial response: an empty challenge asks for it.
			if ch, done, err := s.Next(nil); err != nil || done || len(ch) != 0 {
				t.Fatalf("first challenge %q %v %v", ch, done, err)
			}
			ch, done, err := s.Next([]byte(tc.messages[0]))
			if err != nil || done || string(ch) != tc.messages[1] {
				t.Fatalf("server-first %q %v %v, want %q", ch, done, err, tc.messages[1])
			}
			ch, done, err = s.Next([]byte(tc.messages[2]))
			if err != nil || done || string(ch) != tc.messages[3] {
				t.Fatalf("server-final %q %v %v, want %q", ch, done, err, tc.messages[3])
			}
			if s.Credentials() != (Credentials{}) {
				t.Errorf("credentials before the end: %+v", s.Credentials())
			}
			ch, done, err = s.Next([]byte{})
			if err != nil || !done || ch != nil {
				t.Fatalf("end %q %v %v", ch, done, err)
			}
			if got := s.Credentials(); got != (Credentials{Username: scramUser}) {
				t.Errorf("credentials %+v", got)
			}
			if len(calls) != 1 || calls[0] != "user/" {
				t.Errorf("lookups %q", calls)
			}
			if _, _, err := s.Next([]byte{}); !errors.Is(err, ErrUnexpected) {
				t.Errorf("after done: %v", err)
			}
		})
	}
}

// scramRun runs the client c against s up to the server-final-message, and
// returns the server-first-message and the error of the step that failed.
func scramRun(t *testing.T, s *SCRAM, c *scramClient) (serverFirst string, err error) {
	t.Helper()
	ch, _, err := s.Next(c.clientFirst())
	if err != nil {
		return "", err
	}
	final, wantFinal := c.final(t, string(ch))
	got, done, err := s.Next([]byte(final))
	if err != nil {
		return string(ch), err
	}
	if done || string(got) != wantFinal {
		t.Fatalf("server-final %q %v, want %q", got, done, wantFinal)
	}
	if _, done, err = s.Next(nil); err != nil || !done {
		t.Fatalf("end: %v %v", done, err)
	}
	return string(ch), nil
}

func TestSCRAMPasswords(t *testing.T) {
	t.Parallel()
	for _, m := range scramMechs {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			salt := []byte("0123456789abcdef")
			users := map[string]SCRAMKeys{scramUser: mustKeys(t, m.hash, scramPassword, salt, 4096)}

			// The right password, with a random server nonce.
			s := m.new(lookupOf(users, nil))
			first, err := scramRun(t, s, newSCRAMClient(m.hash, scramPassword, "n,,", scramUser, "clientnonce"))
			if err != nil {
				t.Fatalf("right password: %v", err)
			}
			r, _, _ := strings.Cut(strings.TrimPrefix(first, "r="), ",")
			serverNonce, ok := strings.CutPrefix(r, "clientnonce")
			if !ok || len(serverNonce) < 24 || !printable(serverNonce) {
				t.Errorf("server nonce %q", serverNonce)
			}
			again, _, _ := m.new(lookupOf(users, nil)).Next([]byte("n,,n=user,r=clientnonce"))
			if string(again) == first {
				t.Error("the server nonce repeats")
			}

			// A wrong one.
			s = m.new(lookupOf(users, nil))
			known, err := scramRun(t, s, newSCRAMClient(m.hash, "pen", "n,,", scramUser, "clientnonce"))
			if !errors.Is(err, ErrBadProof) || errors.Is(err, ErrUnknownUser) {
				t.Fatalf("wrong password: %v", err)
			}
			if s.Credentials() != (Credentials{}) {
				t.Errorf("credentials after failure: %+v", s.Credentials())
			}
			if _, _, err := s.Next(nil); !errors.Is(err, ErrUnexpected) {
				t.Errorf("after failure: %v", err)
			}

			// An unknown user: the same shape of server-first-message, the same
			// salt each time, and the unknown-user error only at the end.
			var unknown [2]string
			for i := range unknown {
				s = m.new(lookupOf(users, nil))
				unknown[i], err = scramRun(t, s, newSCRAMClient(m.hash, scramPassword, "n,,", "nobody", "clientnonce"))
				if !errors.Is(err, ErrUnknownUser) || errors.Is(err, ErrBadProof) {
					t.Fatalf("unknown user: %v", err)
				}
			}
			if shape(unknown[0]) != shape(known) {
				t.Errorf("unknown user %q, known %q: shapes differ", unknown[0], known)
			}
			if salt0, salt1 := attr(unknown[0], "s"), attr(unknown[1], "s"); salt0 != salt1 {
				t.Errorf("fake salt changes: %s, %s", salt0, salt1)
			}
			other, _, _ := m.new(lookupOf(users, nil)).Next([]byte("n,,n=somebody,r=clientnonce"))
			if attr(string(other), "s") == attr(unknown[0], "s") {
				t.Error("two unknown users share a fake salt")
			}
		})
	}
}

// shape replaces every character of a server-first-message's values with
// "x", keeping its attribute names and lengths.
func shape(serverFirst string) string {
	var b strings.Builder
	for _, a := range strings.Split(serverFirst, ",") {
		b.WriteString(a[:2] + strings.Repeat("x", len(a)-2) + ",")
	}
	return b.String()
}

func attr(msg, name string) string {
	for _, a := range strings.Split(msg, ",") {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// TestSCRAMFakeShape checks that the fake keys of an unknown user take the
// iteration count and salt length the lookup returns with its error.
func TestSCRAMFakeShape(t *testing.T) {
	t.Parallel()
	errBackend := errors.New("backend down")
	s := NewSCRAMSHA256(func(string, string) (SCRAMKeys, error) {
		return SCRAMKeys{Iterations: 65536, Salt: make([]byte, 12)}, errBackend
	})
	first, err := scramRun(t, s, newSCRAMClient(sha256.New, scramPassword, "n,,", scramUser, "abc"))
	if !errors.Is(err, errBackend) || errors.Is(err, ErrUnknownUser) || errors.Is(err, ErrBadProof) {
		t.Errorf("error %v", err)
	}
	if attr(first, "i") != "65536" || len(mustDecode(t, attr(first, "s"))) != 12 {
		t.Errorf("server-first %q", first)
	}
}

func TestSCRAMBadKeys(t *testing.T) {
	t.Parallel()
	good := mustKeys(t, sha256.New, scramPassword, []byte("salt"), 4096)
	tests := []struct {
		name string
		edit func(*SCRAMKeys)
	}{
		{"too few iterations", func(k *SCRAMKeys) { k.Iterations = 4095 }},
		{"too many iterations", func(k *SCRAMKeys) { k.Iterations = 1<<20 + 1 }},
		{"empty salt", func(k *SCRAMKeys) { k.Salt = nil }},
		{"SHA-1 stored key", func(k *SCRAMKeys) { k.StoredKey = k.StoredKey[:20] }},
		{"no server key", func(k *SCRAMKeys) { k.ServerKey = nil }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			k := good
			tc.edit(&k)
			s := NewSCRAMSHA256(func(string, string) (SCRAMKeys, error) { return k, nil })
			if _, _, err := s.Next([]byte("n,,n=user,r=abc")); !errors.Is(err, ErrBadSCRAMKeys) {
				t.Errorf("got %v", err)
			}
		})
	}
}

func TestSCRAMAuthzid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		gs2Header string
		user      string // as sent
		want      Credentials
		lookup    string
	}{
		{"authzid", "n,a=admin,", "user", Credentials{Username: "user", Identity: "admin"}, "user/admin"},
		{"escaped names", "y,a=a=2Cb=3Dc,", "us=3Der=2C", Credentials{Username: "us=er,", Identity: "a,b=c"}, "us=er,/a,b=c"},
		{"authzid is the user", "n,a=user,", "user", Credentials{Username: "user"}, "user/user"},
		{"UTF-8", "n,,", "jürgen", Credentials{Username: "jürgen"}, "jürgen/"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls []string
			keys := mustKeys(t, sha256.New, scramPassword, []byte("salt"), 4096)
			s := NewSCRAMSHA256(func(authcid, authzid string) (SCRAMKeys, error) {
				calls = append(calls, authcid+"/"+authzid)
				return keys, nil
			})
			if _, err := scramRun(t, s, newSCRAMClient(sha256.New, scramPassword, tc.gs2Header, tc.user, "n0nce")); err != nil {
				t.Fatal(err)
			}
			if got := s.Credentials(); got != tc.want {
				t.Errorf("credentials %+v, want %+v", got, tc.want)
			}
			if len(calls) != 1 || calls[0] != tc.lookup {
				t.Errorf("lookups %q, want %q", calls, tc.lookup)
			}
		})
	}
}

func TestSCRAMBadClientFirst(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		msg  string
		want error
	}{
		{"empty", "", ErrInvalidResponse},
		{"no gs2 header", "n=user,r=abc", ErrInvalidResponse},
		{"half a gs2 header", "n,", ErrInvalidResponse},
		{"bad flag", "x,,n=user,r=abc", ErrInvalidResponse},
		{"channel binding", "p=tls-unique,,n=user,r=abc", ErrChannelBinding},
		{"channel binding tls-exporter", "p=tls-exporter,a=admin,n=user,r=abc", ErrChannelBinding},
		{"mandatory extension", "n,,m=ext,n=user,r=abc", ErrSCRAMExtension},
		{"mandatory extension later", "n,,n=user,r=abc,m=ext", ErrSCRAMExtension},
		{"bad authzid", "n,z=admin,n=user,r=abc", ErrInvalidResponse},
		{"empty authzid", "n,a=,n=user,r=abc", ErrInvalidResponse},
		{"no user", "n,,r=abc", ErrInvalidResponse},
		{"empty user", "n,,n=,r=abc", ErrInvalidResponse},
		{"bad escape", "n,,n=us=2Xer,r=abc", ErrInvalidResponse},
		{"lower-case escape", "n,,n=us=2cer,r=abc", ErrInvalidResponse},
		{"escape cut short", "n,,n=user=3,r=abc", ErrInvalidResponse},
		{"bare =", "n,,n=us=er,r=abc", ErrInvalidResponse},
		{"bad escape in authzid", "n,a=ad=min,n=user,r=abc", ErrInvalidResponse},
		{"CR in user", "n,,n=us\rer,r=abc", ErrInvalidResponse},
		{"NUL in user", "n,,n=us\x00er,r=abc", ErrInvalidResponse},
		{"LF in authzid", "n,a=ad\nmin,n=user,r=abc", ErrInvalidResponse},
		{"bad UTF-8", "n,,n=us\xffer,r=abc", ErrInvalidResponse},
		{"no nonce", "n,,n=user", ErrInvalidResponse},
		{"empty nonce", "n,,n=user,r=", ErrInvalidResponse},
		{"nonce with space", "n,,n=user,r=a c", ErrInvalidResponse},
		{"nonce with DEL", "n,,n=user,r=a\x7fc", ErrInvalidResponse},
		{"nonce first", "n,,r=abc,n=user", ErrInvalidResponse},
		{"bad extension", "n,,n=user,r=abc,xyz", ErrInvalidResponse},
		{"too long", "n,,n=" + strings.Repeat("u", 2048) + ",r=abc", ErrInvalidResponse},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			looked := false
			s := NewSCRAMSHA256(func(string, string) (SCRAMKeys, error) {
				looked = true
				return SCRAMKeys{}, ErrUnknownUser
			})
			_, _, err := s.Next([]byte(tc.msg))
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
			if looked {
				t.Error("looked the user up")
			}
		})
	}
	// An unknown extension after the nonce is ignored (RFC 5802 §7).
	s := NewSCRAMSHA256(lookupOf(nil, nil))
	if _, _, err := s.Next([]byte("n,,n=user,r=abc,x=future")); err != nil {
		t.Errorf("unknown extension: %v", err)
	}
}

func TestSCRAMBadClientFinal(t *testing.T) {
	t.Parallel()
	keys := mustKeys(t, sha256.New, scramPassword, []byte("salt"), 4096)
	c := newSCRAMClient(sha256.New, scramPassword, "n,a=admin,", scramUser, "abc")
	// Each case edits the right client-final-message.
	tests := []struct {
		name string
		edit func(final string) string
	}{
		{"tampered c=", func(f string) string { return strings.Replace(f, "c=bixhPWFkbWluLA==", "c=biws", 1) }},
		{"c= of y", func(f string) string { return strings.Replace(f, "c=bixhPWFkbWluLA==", "c=eSxhPWFkbWluLA==", 1) }},
		{"c= bad base64", func(f string) string { return strings.Replace(f, "c=bixhPWFkbWluLA==", "c=bixhPWFkbWluLA=", 1) }},
		{"c= not strict base64", func(f string) string { return strings.Replace(f, "c=bixhPWFkbWluLA==", "c=bixhPWFkbWluLB==", 1) }},
		{"c= with binding data", func(f string) string {
			return strings.Replace(f, "c=bixhPWFkbWluLA==", "c="+base64.StdEncoding.EncodeToString([]byte("n,a=admin,data")), 1)
		}},
		{"no c=", func(f string) string { return strings.Replace(f, "c=bixhPWFkbWluLA==,", "", 1) }},
		{"tampered r=", func(f string) string { return strings.Replace(f, ",r=abc", ",r=abd", 1) }},
		{"client nonce only", func(f string) string {
			i, j := strings.Index(f, ",r="), strings.Index(f, ",p=")
			return f[:i] + ",r=abc" + f[j:]
		}},
		{"no r=", func(f string) string {
			i, j := strings.Index(f, ",r="), strings.Index(f, ",p=")
			return f[:i] + f[j:]
		}},
		{"no p=", func(f string) string { return f[:strings.Index(f, ",p=")] }},
		{"p= not last", func(f string) string {
			i := strings.Index(f, ",p=")
			return f[:i] + ",x=y" + f[i:] + ",x=y"
		}},
		{"p= bad base64", func(f string) string { return f + "*" }},
		{"p= too short", func(f string) string { return f[:strings.Index(f, ",p=")] + ",p=AAAA" }},
		{"p= flipped", func(f string) string {
			i := strings.Index(f, ",p=") + 3
			b := mustDecode(t, f[i:])
			b[0] ^= 1
			return f[:i] + base64.StdEncoding.EncodeToString(b)
		}},
		{"mandatory extension", func(f string) string { return "m=x," + f }},
		{"mandatory extension later", func(f string) string {
			i := strings.Index(f, ",p=")
			return f[:i] + ",m=x" + f[i:]
		}},
		{"bad extension", func(f string) string {
			i := strings.Index(f, ",p=")
			return f[:i] + ",xy" + f[i:]
		}},
		{"empty", func(string) string { return "" }},
		{"too long", func(f string) string { return strings.Repeat("x", 2049) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := NewSCRAMSHA256(lookupOf(map[string]SCRAMKeys{scramUser: keys}, nil))
			first, _, err := s.Next(c.clientFirst())
			if err != nil {
				t.Fatal(err)
			}
			final, _ := c.final(t, string(first))
			edited := tc.edit(final)
			if edited == final {
				t.Fatalf("the edit changed nothing in %q", final)
			}
			if ch, done, err := s.Next([]byte(edited)); err == nil || done || ch != nil {
				t.Errorf("%q: got %q %v %v", edited, ch, done, err)
			}
		})
	}
	// A channel binding attribute that decodes to the header is right, and
	// any non-empty answer to the server-final-message is wrong.
	s := NewSCRAMSHA256(lookupOf(map[string]SCRAMKeys{scramUser: keys}, nil))
	first, _, _ := s.Next(c.clientFirst())
	final, _ := c.final(t, string(first))
	if _, _, err := s.Next([]byte(final)); err != nil {
		t.Fatalf("right final: %v", err)
	}
	if _, done, err := s.Next([]byte("x")); !errors.Is(err, ErrInvalidResponse) || done {
		t.Errorf("non-empty last response: %v %v", done, err)
	}
	if s.Credentials() != (Credentials{}) {
		t.Errorf("credentials %+v", s.Credentials())
	}
}

func TestSCRAMUnexpected(t *testing.T) {
	t.Parallel()
	s := NewSCRAMSHA256(lookupOf(nil, nil))
	if _, _, err := s.Next(nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Next(nil); !errors.Is(err, ErrUnexpected) {
		t.Errorf("second empty challenge: %v", err)
	}
	s = NewSCRAMSHA256(lookupOf(nil, nil))
	if _, _, err := s.Next([]byte("n,,n=user,r=abc")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Next(nil); !errors.Is(err, ErrUnexpected) {
		t.Errorf("no client-final: %v", err)
	}
}

func TestSCRAMPlus(t *testing.T) {
	t.Parallel()
	keys := mustKeys(t, sha256.New, scramPassword, []byte("salt"), 4096)
	users := map[string]SCRAMKeys{scramUser: keys}
	cbData := []byte("0123456789abcdef0123456789abcdef")
	tests := []struct {
		name      string
		server    func() *SCRAM
		gs2Header string
		cbData    []byte // the client's
		want      error  // nil: success
	}{
		{"bound", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-exporter,,", cbData, nil},
		{"bound with authzid", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-exporter,a=admin,", cbData, nil},
		{"another connection", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-exporter,,", []byte("0123456789abcdef0123456789abcdeF"), ErrInvalidResponse},
		{"no binding data", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-exporter,,", nil, ErrInvalidResponse},
		{"tls-unique", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-unique,,", cbData, ErrChannelBinding},
		{"tls-server-end-point", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "p=tls-server-end-point,,", cbData, ErrChannelBinding},
		{"-PLUS without binding", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "n,,", nil, ErrDowngrade},
		{"-PLUS with y", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), cbData) }, "y,,", nil, ErrDowngrade},
		{"server without binding data", func() *SCRAM { return NewSCRAMSHA256Plus(lookupOf(users, nil), nil) }, "p=tls-exporter,,", nil, ErrChannelBinding},
		{"y where -PLUS is offered", func() *SCRAM { return NewSCRAMSHA256(lookupOf(users, nil)).PLUSOffered() }, "y,,", nil, ErrDowngrade},
		{"n where -PLUS is offered", func() *SCRAM { return NewSCRAMSHA256(lookupOf(users, nil)).PLUSOffered() }, "n,,", nil, nil},
		{"y where -PLUS is not offered", func() *SCRAM { return NewSCRAMSHA256(lookupOf(users, nil)) }, "y,,", nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newSCRAMClient(sha256.New, scramPassword, tc.gs2Header, scramUser, "abc")
			c.cbData = tc.cbData
			s := tc.server()
			_, err := scramRun(t, s, c)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if err == nil && s.Credentials().Username != scramUser {
				t.Errorf("credentials %+v", s.Credentials())
			}
		})
	}

	// An unknown user gets the same fake salt with -PLUS and without, as a
	// known user has the same salt in both.
	plus, _, _ := NewSCRAMSHA256Plus(lookupOf(nil, nil), cbData).Next([]byte("p=tls-exporter,,n=nobody,r=abc"))
	plain, _, _ := NewSCRAMSHA256(lookupOf(nil, nil)).Next([]byte("n,,n=nobody,r=abc"))
	if attr(string(plus), "s") == "" || attr(string(plus), "s") != attr(string(plain), "s") {
		t.Errorf("fake salts differ: %q, %q", plus, plain)
	}
}
