package opensslfmt

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

var (
	oidCN    = asn1.ObjectIdentifier{2, 5, 4, 3}
	oidC     = asn1.ObjectIdentifier{2, 5, 4, 6}
	oidO     = asn1.ObjectIdentifier{2, 5, 4, 10}
	oidOU    = asn1.ObjectIdentifier{2, 5, 4, 11}
	oidEmail = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}
)

func TestDN(t *testing.T) {
	raw := func(tag int, b []byte) asn1.RawValue {
		return asn1.RawValue{Class: asn1.ClassUniversal, Tag: tag, Bytes: b}
	}
	utf8s := func(s string) asn1.RawValue { return raw(asn1.TagUTF8String, []byte(s)) }
	tests := []struct {
		name string
		rdns pkix.RDNSequence
		want string
	}{
		{"most specific first", pkix.RDNSequence{{{Type: oidC, Value: "US"}}, {{Type: oidO, Value: "Acme"}}, {{Type: oidCN, Value: "x"}}}, "CN=x,O=Acme,C=US"},
		{"specials", pkix.RDNSequence{{{Type: oidCN, Value: utf8s(`a,b+c"d\e<f>g;h=i`)}}}, `CN=a\,b\+c\"d\\e\<f\>g\;h=i`},
		{"leading space and hash", pkix.RDNSequence{{{Type: oidCN, Value: utf8s(" a")}}, {{Type: oidOU, Value: utf8s("#b")}}}, `OU=\#b,CN=\ a`},
		{"trailing space, inner hash", pkix.RDNSequence{{{Type: oidCN, Value: utf8s("a# ")}}}, `CN=a#\ `},
		{"lone space", pkix.RDNSequence{{{Type: oidCN, Value: utf8s(" ")}}}, `CN=\ `},
		{"lone hash", pkix.RDNSequence{{{Type: oidCN, Value: utf8s("#")}}}, `CN=#`},
		{"control bytes", pkix.RDNSequence{{{Type: oidCN, Value: utf8s("a\r\nb\x7f")}}}, `CN=a\0D\0Ab\7F`},
		{"UTF8String bytes", pkix.RDNSequence{{{Type: oidCN, Value: utf8s("é")}}}, `CN=\C3\A9`},
		{"T61String is Latin-1", pkix.RDNSequence{{{Type: oidCN, Value: raw(asn1.TagT61String, []byte{'x', 0xe9})}}}, `CN=x\C3\A9`},
		{"BMPString", pkix.RDNSequence{{{Type: oidCN, Value: raw(asn1.TagBMPString, []byte{0, 'a', 0x00, 0xe9})}}}, `CN=a\C3\A9`},
		{"unknown type dumped", pkix.RDNSequence{{{Type: asn1.ObjectIdentifier{1, 2, 3, 4}, Value: utf8s("abc")}}}, `1.2.3.4=#0C03616263`},
		{"non-string value dumped", pkix.RDNSequence{{{Type: oidCN, Value: 5}}}, `CN=#020105`},
		{"multi-valued RDN", pkix.RDNSequence{{{Type: oidC, Value: "US"}}, {{Type: oidCN, Value: "a"}, {Type: oidOU, Value: "b"}}}, `OU=b+CN=a,C=US`},
		{"empty", pkix.RDNSequence{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			der, err := asn1.Marshal(tt.rdns)
			if err != nil {
				t.Fatal(err)
			}
			if got := DN(der); got != tt.want {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestSerial(t *testing.T) {
	for _, tt := range []struct {
		n    *big.Int
		want string
	}{
		{big.NewInt(0), "00"},
		{big.NewInt(1), "01"},
		{big.NewInt(0x100), "0100"},
		{big.NewInt(-0x1ab), "-01AB"},
		{new(big.Int).SetBytes([]byte{0xc0, 0x7a, 0xd5, 0x6b, 0x84, 0x6b, 0x5b, 0xff}), "C07AD56B846B5BFF"},
	} {
		if got := Serial(&x509.Certificate{SerialNumber: tt.n}); got != tt.want {
			t.Errorf("serial %v = %q, want %q", tt.n, got, tt.want)
		}
	}
}

// TestMatchesOpenSSL compares the subject, issuer and serial
// formatting with the openssl command NGINX's library ships, where present:
// `openssl x509 -nameopt RFC2253` is X509_NAME_print_ex(XN_FLAG_RFC2253).
func TestMatchesOpenSSL(t *testing.T) {
	bin, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("no openssl command to compare with")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	raw := func(tag int, b []byte) asn1.RawValue {
		return asn1.RawValue{Class: asn1.ClassUniversal, Tag: tag, Bytes: b}
	}
	utf8s := func(s string) asn1.RawValue { return raw(asn1.TagUTF8String, []byte(s)) }
	names := []pkix.RDNSequence{
		{{{Type: oidC, Value: "US"}}, {{Type: oidO, Value: "Acme, Inc."}}, {{Type: oidCN, Value: "x"}}},
		{{{Type: oidCN, Value: utf8s(`a,b+c"d\e<f>g;h=i`)}}, {{Type: oidOU, Value: utf8s("#b")}}, {{Type: oidO, Value: utf8s(" lead")}}},
		{{{Type: oidCN, Value: utf8s("a# ")}}, {{Type: oidOU, Value: utf8s("#")}}, {{Type: oidO, Value: utf8s(" ")}}},
		{{{Type: oidCN, Value: utf8s("a\r\nb\x7f\x00")}}, {{Type: oidO, Value: utf8s("Jöhn 日本")}}},
		{{{Type: oidCN, Value: raw(asn1.TagT61String, []byte{'x', 0xe9})}}, {{Type: oidOU, Value: raw(asn1.TagBMPString, []byte{0, 'a', 0x30, 0xb3})}}},
		{{{Type: asn1.ObjectIdentifier{1, 2, 3, 4}, Value: utf8s("abc")}}, {{Type: oidEmail, Value: "john@example.com"}}},
		{{{Type: oidC, Value: "US"}}, {{Type: oidCN, Value: "a"}, {Type: oidOU, Value: "b"}}},
		{
			{{Type: asn1.ObjectIdentifier{0, 9, 2342, 19200300, 100, 1, 25}, Value: raw(asn1.TagIA5String, []byte("example"))}},
			{{Type: asn1.ObjectIdentifier{2, 5, 4, 5}, Value: "1234"}},
			{{Type: asn1.ObjectIdentifier{2, 5, 4, 42}, Value: "Given"}},
			{{Type: asn1.ObjectIdentifier{0, 9, 2342, 19200300, 100, 1, 1}, Value: utf8s("uid")}},
		},
	}
	serials := []*big.Int{big.NewInt(1), big.NewInt(0x0abcdef012), new(big.Int).Lsh(big.NewInt(0xff), 150)}
	dir := t.TempDir()
	for i, name := range names {
		der, err := asn1.Marshal(name)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serials[i%len(serials)],
			RawSubject:   der,
			RawIssuer:    der,
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(time.Hour),
		}
		certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(certDER)
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(dir, fmt.Sprintf("%d.pem", i))
		if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, "x509", "-in", file, "-noout", "-nameopt", "RFC2253", "-subject", "-issuer", "-serial").Output()
		if err != nil {
			t.Fatalf("openssl: %v", err)
		}
		want := fmt.Sprintf("subject=%s\nissuer=%s\nserial=%s\n", DN(cert.RawSubject), DN(cert.RawIssuer), Serial(cert))
		if string(out) != want {
			t.Errorf("name %d\nopenssl: %q\n    ours: %q", i, out, want)
		}
	}
}
