package passwdfile

import (
	"crypto/hmac"
	"encoding/base64"
	"testing"
)

// TestSCRAMRFCExamples runs the exchanges of RFC 5802 section 5
// (SCRAM-SHA-1) and RFC 7677 section 3 (SCRAM-SHA-256) as a server would
// with NewSCRAM's keys: the client's proof checks against StoredKey, and
// ServerKey gives the server signature the RFC shows.
func TestSCRAMRFCExamples(t *testing.T) {
	t.Parallel()
	tests := []struct {
		mech, salt, clientFirstBare, serverFirst, clientFinalNoProof, proof, serverSignature string
	}{
		{
			mech:               "SCRAM-SHA-1",
			salt:               "QSXCR+Q6sek8bf92",
			clientFirstBare:    "n=user,r=fyko+d2lbbFgONRv9qkxdawL",
			serverFirst:        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
			clientFinalNoProof: "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
			proof:              "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
			serverSignature:    "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
		},
		{
			mech:               "SCRAM-SHA-256",
			salt:               "W22ZaJ0SNY7soEsUEjb6gQ==",
			clientFirstBare:    "n=user,r=rOprNGfwEbeRWgbNEkqO",
			serverFirst:        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
			clientFinalNoProof: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
			proof:              "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
			serverSignature:    "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
		},
	}
	for _, tt := range tests {
		t.Run(tt.mech, func(t *testing.T) {
			t.Parallel()
			salt, _ := base64.StdEncoding.DecodeString(tt.salt)
			s, err := NewSCRAM(tt.mech, "pencil", salt, 4096)
			if err != nil {
				t.Fatal(err)
			}
			authMessage := []byte(tt.clientFirstBare + "," + tt.serverFirst + "," + tt.clientFinalNoProof)
			mac := hmac.New(s.Hash(), s.StoredKey)
			mac.Write(authMessage)
			clientKey, _ := base64.StdEncoding.DecodeString(tt.proof)
			for i, b := range mac.Sum(nil) {
				clientKey[i] ^= b
			}
			h := s.Hash()()
			h.Write(clientKey)
			if !hmac.Equal(h.Sum(nil), s.StoredKey) {
				t.Error("the RFC's client proof does not check against StoredKey")
			}
			mac = hmac.New(s.Hash(), s.ServerKey)
			mac.Write(authMessage)
			if got := base64.StdEncoding.EncodeToString(mac.Sum(nil)); got != tt.serverSignature {
				t.Errorf("server signature %s, want %s", got, tt.serverSignature)
			}
			if !s.Verify("pencil") || s.Verify("Pencil") || s.Verify("") {
				t.Error("Verify does not check exactly the password")
			}
		})
	}
}

func TestNewSCRAMErrors(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		mech string
		salt []byte
		iter int
	}{
		{"SCRAM-SHA-512", []byte("salt"), 4096},
		{"scram-sha-1", []byte("salt"), 4096},
		{"SCRAM-SHA-1", nil, 4096},
		{"SCRAM-SHA-1", []byte("salt"), 4095},
		{"SCRAM-SHA-256", []byte("salt"), 1 << 31},
	} {
		if _, err := NewSCRAM(tt.mech, "pencil", tt.salt, tt.iter); err == nil {
			t.Errorf("NewSCRAM(%q, %q, %d) succeeded", tt.mech, tt.salt, tt.iter)
		}
	}
}
