package sasl

import (
	"crypto/sha256"
	"strings"
	"testing"
)

// FuzzSCRAMClientMessages feeds a client-first-message and a
// client-final-message to SCRAM-SHA-256 and SCRAM-SHA-256-PLUS: no panic; a name it accepts is
// free of CR, LF and NUL and escapes back to what the client sent; a
// server-first-message echoes the client nonce; a wrong proof is never
// accepted.
func FuzzSCRAMClientMessages(f *testing.F) {
	// RFC 7677 §3, then what gsasl sent with an authzid, then oddities.
	f.Add([]byte("n,,n=user,r=rOprNGfwEbeRWgbNEkqO"), []byte("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="))
	f.Add([]byte("n,a=a=2Cb=3Dc,n=user,r=Uyn6RKpuxNgSbpTbiBVmdtwh"), []byte("c=bixhPWE9MkNiPTNEYyw=,r=Uyn6RKpuxNgSbpTbiBVmdtwh,p=AAAA"))
	f.Add([]byte("y,,n=us=3Der,r=abc,x=ext"), []byte("c=eSws,r=abc,x=1,p=="))
	f.Add([]byte("p=tls-exporter,,n=user,r=abc"), []byte(""))
	f.Add([]byte("n,,m=x,n=user,r=abc"), []byte("c=,r=,p="))
	keys, err := DeriveSCRAMKeys(sha256.New, scramPassword, mustDecode(f, "W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, first, final []byte) {
		users := map[string]SCRAMKeys{scramUser: keys}
		for _, s := range []*SCRAM{NewSCRAMSHA256(lookupOf(users, nil)), NewSCRAMSHA256Plus(lookupOf(users, nil), []byte("cb"))} {
			fuzzSCRAM(t, s, first, final)
		}
	})
}

// fuzzSCRAM checks one server against the properties FuzzSCRAMClientMessages
// lists.
func fuzzSCRAM(t *testing.T, s *SCRAM, first, final []byte) {
	s.serverNonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
	serverFirst, _, err := s.Next(first)
	if err != nil {
		return
	}
	if !valid(s.authcid, s.authzid) {
		t.Fatalf("accepted names %q, %q", s.authcid, s.authzid)
	}
	if !strings.Contains(string(first), ",n="+encodeSASLName(s.authcid)+",") {
		t.Fatalf("user %q is not what %q sent", s.authcid, first)
	}
	if !strings.HasPrefix(string(serverFirst), "r="+s.nonce+",s=") || !strings.HasSuffix(s.nonce, s.serverNonce) {
		t.Fatalf("server-first %q", serverFirst)
	}
	serverFinal, _, err := s.Next(final)
	if err != nil {
		return
	}
	// Only the RFC 7677 seed's proof is right.
	if s.authcid != scramUser || s.plus || !strings.HasPrefix(string(serverFinal), "v=") {
		t.Fatalf("%s accepted %q then %q", s.name, first, final)
	}
}

// encodeSASLName is the inverse of decodeSASLName (RFC 5802 §5.1).
func encodeSASLName(s string) string {
	return strings.NewReplacer("=", "=3D", ",", "=2C").Replace(s)
}
