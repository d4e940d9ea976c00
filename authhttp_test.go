package pop3

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// newTestAuthHTTP provisions an AuthHTTP for url; mods run before provision.
func newTestAuthHTTP(t *testing.T, url string, mods ...func(*AuthHTTP)) *AuthHTTP {
	t.Helper()
	a := &AuthHTTP{URL: url}
	for _, m := range mods {
		m(a)
	}
	if err := a.provision(caddy.Context{}); err != nil {
		t.Fatalf("provision: %v", err)
	}
	t.Cleanup(a.cleanup)
	return a
}

// rawAuthServer answers every request with response, byte for byte, and
// closes the connection. An empty response closes without answering.
func rawAuthServer(t *testing.T, response string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil || line == "\r\n" {
						break
					}
				}
				_, _ = c.Write([]byte(response))
			}()
		}
	}()
	return "http://" + ln.Addr().String() + "/auth"
}

// silentAuthServer accepts connections and never answers.
func silentAuthServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { <-done; _ = c.Close() }()
		}
	}()
	return "http://" + ln.Addr().String() + "/auth"
}

// downAuthServer returns the URL of a port nothing listens on.
func downAuthServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return "http://" + addr + "/auth"
}

func TestAuthHTTPRequestFields(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		req  authHTTPRequest
		// set after provision, as an {env.*} expansion could
		header map[string]string
		want   map[string]string // every field but Host
	}{
		{
			name: "plain escapes user and password",
			req:  authHTTPRequest{Method: "plain", User: "john doe", Pass: "p@ss wörd:%", Attempt: 1, ClientIP: "192.0.2.42"},
			want: map[string]string{
				"Auth-Method":        "plain",
				"Auth-User":          "john%20doe",
				"Auth-Pass":          "p@ss%20wörd:%25",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.42",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "login is sent as plain and never with a salt",
			req:  authHTTPRequest{Method: "login", User: "u", Pass: "p+q=r", Salt: "<1.2@pop.example>", Attempt: 3, ClientIP: "2001:db8::1"},
			want: map[string]string{
				"Auth-Method":        "plain",
				"Auth-User":          "u",
				"Auth-Pass":          "p+q=r",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "3",
				"Client-IP":          "2001:db8::1",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "apop sends the salt",
			req:  authHTTPRequest{Method: "apop", User: "u", Pass: "c4c9334bac560ecc979e58001b3e22fb", Salt: "<1896.697170952@dbc.mtview.ca.us>", Attempt: 1, ClientIP: "192.0.2.1"},
			want: map[string]string{
				"Auth-Method":        "apop",
				"Auth-User":          "u",
				"Auth-Pass":          "c4c9334bac560ecc979e58001b3e22fb",
				"Auth-Salt":          "<1896.697170952@dbc.mtview.ca.us>",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.1",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "cram-md5 sends the salt",
			req:  authHTTPRequest{Method: "cram-md5", User: "tim", Pass: "b913a602c7eda7a495b4e6e7334d3890", Salt: "<1896.697170952@postoffice.example.net>", Attempt: 2, ClientIP: "192.0.2.1"},
			want: map[string]string{
				"Auth-Method":        "cram-md5",
				"Auth-User":          "tim",
				"Auth-Pass":          "b913a602c7eda7a495b4e6e7334d3890",
				"Auth-Salt":          "<1896.697170952@postoffice.example.net>",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "2",
				"Client-IP":          "192.0.2.1",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "external with no password, oauth token, attempt 0 sent as 1",
			req:  authHTTPRequest{Method: "external", User: "", Attempt: 0, ClientIP: "192.0.2.1"},
			want: map[string]string{
				"Auth-Method":        "external",
				"Auth-User":          "",
				"Auth-Pass":          "",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.1",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "oauthbearer token",
			req:  authHTTPRequest{Method: "OAUTHBEARER", User: "u@example.com", Pass: "ya29.tok%en", Attempt: 1, ClientIP: "192.0.2.1", ClientHost: "mail.example.org"},
			want: map[string]string{
				"Auth-Method":        "oauthbearer",
				"Auth-User":          "u@example.com",
				"Auth-Pass":          "ya29.tok%25en",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.1",
				"Client-Host":        "mail.example.org",
				"X-Auth-Key":         "shared secret",
			},
		},
		{
			name: "control bytes never reach the wire",
			req: authHTTPRequest{
				Method:     "apop",
				User:       "a\r\nAuth-Status: OK",
				Pass:       "p\x00\x7f\t",
				Salt:       "<1.2@pop.example>\r\n",
				Attempt:    1,
				ClientIP:   "192.0.2.42\r\nX-Injected: ip",
				ClientHost: "evil.example\r\nX-Injected: ptr", // CVE-2026-28753
			},
			header: map[string]string{"X-Auth-Key": "secret\r\nX-Injected: header"},
			want: map[string]string{
				"Auth-Method":        "apop",
				"Auth-User":          "a%0D%0AAuth-Status:%20OK",
				"Auth-Pass":          "p%00%7F%09",
				"Auth-Salt":          "<1.2@pop.example>",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.42X-Injected: ip",
				"Client-Host":        "[TEMPUNAVAIL]",
				"X-Auth-Key":         "secretX-Injected: header",
			},
		},
		{
			name:   "configured User-Agent, in any case, sent once",
			req:    authHTTPRequest{Method: "plain", User: "u", Pass: "p", Attempt: 1, ClientIP: "192.0.2.1"},
			header: map[string]string{"user-agent": "pop3-proxy"},
			want: map[string]string{
				"Auth-Method":        "plain",
				"Auth-User":          "u",
				"Auth-Pass":          "p",
				"Auth-Protocol":      "pop3",
				"Auth-Login-Attempt": "1",
				"Client-IP":          "192.0.2.1",
				"User-Agent":         "pop3-proxy",
			},
		},
	}
	srv := &pop3test.AuthServer{}
	url := srv.Start(t)
	a := newTestAuthHTTP(t, url, func(a *AuthHTTP) { a.Header = map[string]string{"X-Auth-Key": "shared secret"} })
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			saved := a.Header
			if tt.header != nil {
				a.Header = tt.header
			}
			defer func() { a.Header = saved }()
			if _, err := a.check(context.Background(), tt.req); err != nil {
				t.Fatalf("check: %v", err)
			}
			got := srv.Last(t)
			if got.RequestLine != "GET /auth HTTP/1.1" {
				t.Errorf("request line = %q", got.RequestLine)
			}
			assertFields(t, got, tt.want)
		})
	}
}

// assertFields checks that req has exactly the fields in want (plus Host),
// each once, spelled as in want.
func assertFields(t *testing.T, req pop3test.AuthRequest, want map[string]string) {
	t.Helper()
	names := req.Names()
	wantNames := []string{"Host"}
	for n := range want {
		wantNames = append(wantNames, n)
	}
	sort.Strings(wantNames)
	gotNames := slices.Clone(names)
	sort.Strings(gotNames)
	if !slices.Equal(gotNames, wantNames) {
		t.Errorf("field names\n got %q\nwant %q", gotNames, wantNames)
	}
	for n, v := range want {
		if got, ok := req.Get(n); !ok || got != v {
			t.Errorf("%s = %q (present %v), want %q", n, got, ok, v)
		}
	}
	if names[0] != "Host" {
		t.Errorf("first field %q, want Host", names[0])
	}
}

func TestAuthHTTPEscapeMailAuth(t *testing.T) {
	t.Parallel()
	for c := 0; c < 256; c++ {
		in := string([]byte{byte(c)})
		want := in
		if c < 0x20 || c == ' ' || c == '%' || c == 0x7f {
			want = fmt.Sprintf("%%%02X", c)
		}
		if got := escapeMailAuth(in); got != want {
			t.Errorf("escapeMailAuth(%#x) = %q, want %q", c, got, want)
		}
	}
	if got, want := escapeMailAuth("p@ss wörd:%"), "p@ss%20wörd:%25"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestAuthHTTPClientHostValue(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"mail.example.org":    "mail.example.org",
		"Host-1.Example.ORG":  "Host-1.Example.ORG",
		"[UNAVAILABLE]":       "[UNAVAILABLE]",
		"[TEMPUNAVAIL]":       "[TEMPUNAVAIL]",
		"a\r\nb":              "[TEMPUNAVAIL]",
		"under_score.example": "[TEMPUNAVAIL]",
		"sp ace":              "[TEMPUNAVAIL]",
		"ünicode.example":     "[TEMPUNAVAIL]",
	} {
		if got := clientHostValue(in); got != want {
			t.Errorf("clientHostValue(%q) = %q, want %q", in, got, want)
		}
	}
}

// testPKI is a CA, a client certificate it issued and a server certificate.
type testPKI struct {
	caPool     *x509.CertPool
	client     tls.Certificate
	clientLeaf *x509.Certificate
	server     tls.Certificate
}

var (
	oidCN    = asn1.ObjectIdentifier{2, 5, 4, 3}
	oidC     = asn1.ObjectIdentifier{2, 5, 4, 6}
	oidO     = asn1.ObjectIdentifier{2, 5, 4, 10}
	oidOU    = asn1.ObjectIdentifier{2, 5, 4, 11}
	oidEmail = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}
)

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey := newKey()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "Test CA", Organization: []string{"Example"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)

	subject, err := asn1.Marshal(pkix.RDNSequence{
		{{Type: oidC, Value: "DE"}},
		{{Type: oidO, Value: "Example+Co"}},
		{{Type: oidCN, Value: "Jöhn, Doe"}},
		{{Type: oidEmail, Value: "john@example.com"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	clientKey := newKey()
	clientDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(0x0abcdef012),
		RawSubject:   subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, caCert, &clientKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	clientLeaf, _ := x509.ParseCertificate(clientDER)

	serverKey := newKey()
	serverTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	serverDER, err := x509.CreateCertificate(rand.Reader, serverTmpl, serverTmpl, &serverKey.PublicKey, serverKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	return &testPKI{
		caPool:     pool,
		client:     tls.Certificate{Certificate: [][]byte{clientDER}, PrivateKey: clientKey, Leaf: clientLeaf},
		clientLeaf: clientLeaf,
		server:     tls.Certificate{Certificate: [][]byte{serverDER}, PrivateKey: serverKey},
	}
}

// handshake runs a TLS handshake over a pipe and returns the server's view.
func handshake(t *testing.T, server, client *tls.Config) *tls.ConnectionState {
	t.Helper()
	c1, c2 := net.Pipe()
	defer func() { _ = c1.Close(); _ = c2.Close() }()
	server.SessionTicketsDisabled = true // a ticket written after the handshake would block the pipe
	srv, cli := tls.Server(c1, server), tls.Client(c2, client)
	errc := make(chan error, 1)
	go func() { errc <- cli.Handshake() }()
	if err := srv.Handshake(); err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	st := srv.ConnectionState()
	return &st
}

func TestAuthHTTPTLSFields(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	sum := sha1.Sum(pki.clientLeaf.Raw)
	fingerprint := hex.EncodeToString(sum[:])
	pemCert := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pki.clientLeaf.Raw}))
	escapedPEM := strings.NewReplacer(" ", "%20", "\n", "%0A").Replace(pemCert)
	const subject = `emailAddress=john@example.com,CN=J\C3\B6hn\, Doe,O=Example\+Co,C=DE`
	const issuer = `CN=Test CA,O=Example`

	tls12 := func(clientAuth tls.ClientAuthType, withCert bool) func() *tls.ConnectionState {
		return func() *tls.ConnectionState {
			client := &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12}
			if withCert {
				client.Certificates = []tls.Certificate{pki.client}
			}
			return handshake(t, &tls.Config{
				Certificates: []tls.Certificate{pki.server},
				ClientAuth:   clientAuth,
				ClientCAs:    pki.caPool,
				MaxVersion:   tls.VersionTLS12,
				CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
			}, client)
		}
	}
	tls13 := func(clientAuth tls.ClientAuthType, withCert bool) func() *tls.ConnectionState {
		return func() *tls.ConnectionState {
			client := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
			if withCert {
				client.Certificates = []tls.Certificate{pki.client}
			}
			return handshake(t, &tls.Config{
				Certificates: []tls.Certificate{pki.server},
				ClientAuth:   clientAuth,
				ClientCAs:    pki.caPool,
			}, client)
		}
	}

	tests := []struct {
		name         string
		state        func() *tls.ConnectionState
		verifyClient bool
		passCert     bool
		want         map[string]string // Auth-SSL* fields; Cipher "" means any TLS 1.3 suite
	}{
		{
			name:         "TLS 1.2, verified certificate, passed on",
			state:        tls12(tls.RequireAndVerifyClientCert, true),
			verifyClient: true,
			passCert:     true,
			want: map[string]string{
				"Auth-SSL":             "on",
				"Auth-SSL-Protocol":    "TLSv1.2",
				"Auth-SSL-Cipher":      "ECDHE-ECDSA-AES128-GCM-SHA256",
				"Auth-SSL-Verify":      "SUCCESS",
				"Auth-SSL-Subject":     subject,
				"Auth-SSL-Issuer":      issuer,
				"Auth-SSL-Serial":      "0ABCDEF012",
				"Auth-SSL-Fingerprint": fingerprint,
				"Auth-SSL-Cert":        escapedPEM,
			},
		},
		{
			name:         "TLS 1.3, verification on, no certificate",
			state:        tls13(tls.VerifyClientCertIfGiven, false),
			verifyClient: true,
			passCert:     true,
			want: map[string]string{
				"Auth-SSL":          "on",
				"Auth-SSL-Protocol": "TLSv1.3",
				"Auth-SSL-Cipher":   "",
				"Auth-SSL-Verify":   "NONE",
			},
		},
		{
			name:  "TLS 1.3, verification off",
			state: tls13(tls.NoClientCert, false),
			want: map[string]string{
				"Auth-SSL":          "on",
				"Auth-SSL-Protocol": "TLSv1.3",
				"Auth-SSL-Cipher":   "",
			},
		},
		{
			name:         "certificate nobody verified, not passed on",
			state:        tls13(tls.RequireAnyClientCert, true),
			verifyClient: true,
			want: map[string]string{
				"Auth-SSL":             "on",
				"Auth-SSL-Protocol":    "TLSv1.3",
				"Auth-SSL-Cipher":      "",
				"Auth-SSL-Verify":      "FAILED:certificate not verified",
				"Auth-SSL-Subject":     subject,
				"Auth-SSL-Issuer":      issuer,
				"Auth-SSL-Serial":      "0ABCDEF012",
				"Auth-SSL-Fingerprint": fingerprint,
			},
		},
	}
	srv := &pop3test.AuthServer{}
	url := srv.Start(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTestAuthHTTP(t, url, func(a *AuthHTTP) { a.PassClientCert = tt.passCert })
			st := tt.state()
			req := authHTTPRequest{Method: "external", Attempt: 1, ClientIP: "192.0.2.1", TLS: st, VerifyClient: tt.verifyClient}
			if _, err := a.check(context.Background(), req); err != nil {
				t.Fatalf("check: %v", err)
			}
			got := srv.Last(t)
			var gotSSL []string
			for _, n := range got.Names() {
				if strings.HasPrefix(n, "Auth-SSL") {
					gotSSL = append(gotSSL, n)
				}
			}
			var wantSSL []string
			for n := range tt.want {
				wantSSL = append(wantSSL, n)
			}
			sort.Strings(gotSSL)
			sort.Strings(wantSSL)
			if !slices.Equal(gotSSL, wantSSL) {
				t.Errorf("Auth-SSL fields\n got %q\nwant %q", gotSSL, wantSSL)
			}
			for n, v := range tt.want {
				g := got.Value(n)
				if n == "Auth-SSL-Cipher" && v == "" {
					if !slices.Contains([]string{"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}, g) {
						t.Errorf("%s = %q, want a TLS 1.3 suite", n, g)
					}
					continue
				}
				if g != v {
					t.Errorf("%s\n got %q\nwant %q", n, g, v)
				}
			}
		})
	}
}

func TestAuthHTTPResponse(t *testing.T) {
	t.Parallel()
	const okHead = "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"
	tests := []struct {
		name     string
		response string
		method   string
		want     authHTTPResult
		wantErr  bool
	}{
		{name: "ok", response: okHead + "Auth-Server: 198.51.100.1\r\nAuth-Port: 110\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "198.51.100.1:110"}},
		{name: "ok ipv6", response: okHead + "Auth-Server: 2001:db8::1\r\nAuth-Port: 995\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "[2001:db8::1]:995"}},
		{name: "ok ipv6 in brackets", response: okHead + "Auth-Server: [2001:db8::1]\r\nAuth-Port: 110\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "[2001:db8::1]:110"}},
		{name: "ok with new user and password taken verbatim", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 1110\r\nAuth-User: real@backend\r\nAuth-Pass: plain text%20pass\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "127.0.0.1:1110", User: "real@backend", Pass: "plain text%20pass"}},
		{name: "field names in any case, body ignored", response: "HTTP/1.1 200 OK\r\nauth-status: OK\r\nAUTH-SERVER: 127.0.0.1\r\nauth-port: 110\r\nContent-Length: 5\r\n\r\nhello",
			want: authHTTPResult{OK: true, Address: "127.0.0.1:110"}},
		{name: "status code ignored as NGINX", response: "HTTP/1.1 500 Internal Server Error\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "127.0.0.1:110"}},
		{name: "apop ok with password", method: "apop", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\nAuth-Pass: secret\r\n\r\n",
			want: authHTTPResult{OK: true, Address: "127.0.0.1:110", Pass: "secret"}},
		{name: "refused with wait", response: "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 3\r\n\r\n",
			want: authHTTPResult{ErrorText: "Invalid login or password", Wait: 3 * time.Second, HasWait: true}},
		{name: "refused without wait", response: "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n",
			want: authHTTPResult{ErrorText: "Invalid login or password"}},
		{name: "refused with error code, 403", response: "HTTP/1.0 403 Forbidden\r\nAuth-Status: Temporary server problem, try again later\r\nAuth-Error-Code: 451 4.3.0\r\nAuth-Wait: 0\r\n\r\n",
			want: authHTTPResult{ErrorText: "Temporary server problem, try again later", ErrorCode: "451 4.3.0", HasWait: true}},
		{name: "refusal wins over OK", response: "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Status: Account locked\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n",
			want: authHTTPResult{ErrorText: "Account locked"}},
		{name: "invalid wait ignored", response: "HTTP/1.0 200 OK\r\nAuth-Status: No\r\nAuth-Wait: 3s\r\n\r\n",
			want: authHTTPResult{ErrorText: "No"}},
		{name: "WAIT asks again", response: "HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n",
			want: authHTTPResult{Retry: true, Wait: 2 * time.Second, HasWait: true}},

		{name: "no Auth-Status", response: "HTTP/1.0 200 OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "no Auth-Status, 502", response: "HTTP/1.0 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", wantErr: true},
		{name: "OK without server", response: okHead + "Auth-Port: 110\r\n\r\n", wantErr: true},
		{name: "OK without port", response: okHead + "Auth-Server: 127.0.0.1\r\n\r\n", wantErr: true},
		{name: "host name server", response: okHead + "Auth-Server: pop.example.com\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "server with zone", response: okHead + "Auth-Server: fe80::1%eth0\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "port 0", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 0\r\n\r\n", wantErr: true},
		{name: "port too big", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 65536\r\n\r\n", wantErr: true},
		{name: "port not a number", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: +110\r\n\r\n", wantErr: true},
		{name: "control byte in user", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\nAuth-User: a\x01b\r\n\r\n", wantErr: true},
		{name: "control byte in password", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\nAuth-Pass: a\x7fb\r\n\r\n", wantErr: true},
		{name: "control byte in server", response: okHead + "Auth-Server: 127.0.0.1\x00\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "apop without password", method: "apop", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "external without password", method: "external", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n", wantErr: true},
		{name: "header over 16 KiB", response: okHead + "Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\nX-Pad: " + strings.Repeat("x", 17<<10) + "\r\n\r\n", wantErr: true},
		{name: "not HTTP", response: "+OK POP3 ready\r\n", wantErr: true},
		{name: "closed without answer", response: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTestAuthHTTP(t, rawAuthServer(t, tt.response), func(a *AuthHTTP) { a.Timeout = caddy.Duration(5 * time.Second) })
			method := tt.method
			if method == "" {
				method = "plain"
			}
			got, err := a.check(context.Background(), authHTTPRequest{Method: method, User: "u", Pass: "p", Attempt: 1, ClientIP: "192.0.2.1"})
			if tt.wantErr {
				if err == nil {
					t.Fatalf("want an error, got %+v", got)
				}
				t.Logf("error: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("check: %v", err)
			}
			if got != tt.want {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestAuthHTTPTimeout(t *testing.T) {
	for name, url := range map[string]string{
		"silent":     silentAuthServer(t),
		"slow reply": (&pop3test.AuthServer{Delay: 5 * time.Second}).Start(t),
	} {
		t.Run(name, func(t *testing.T) {
			a := newTestAuthHTTP(t, url, func(a *AuthHTTP) { a.Timeout = caddy.Duration(100 * time.Millisecond) })
			start := time.Now()
			_, err := a.check(context.Background(), authHTTPRequest{Method: "plain", User: "u", Pass: "p", Attempt: 1})
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want a deadline error", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("took %s", d)
			}
		})
	}
}

func TestAuthHTTPServerDown(t *testing.T) {
	t.Parallel()
	a := newTestAuthHTTP(t, downAuthServer(t))
	_, err := a.check(context.Background(), authHTTPRequest{Method: "plain", User: "u", Pass: "p", Attempt: 1})
	if err == nil {
		t.Fatal("want an error")
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v: a refused connection is not a timeout", err)
	}
}

func TestAuthHTTPRedirectNotFollowed(t *testing.T) {
	t.Parallel()
	target := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{"u": {Password: "p", Server: "127.0.0.1:110"}}}
	targetURL := target.Start(t)
	redirect := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, targetURL, http.StatusFound)
	}))
	t.Cleanup(redirect.Close)
	a := newTestAuthHTTP(t, redirect.URL+"/auth")
	_, err := a.check(context.Background(), authHTTPRequest{Method: "plain", User: "u", Pass: "p", Attempt: 1})
	if !errors.Is(err, errAuthHTTPResponse) {
		t.Errorf("err = %v, want an invalid response (no Auth-Status on the 302)", err)
	}
	if n := len(target.Requests()); n != 0 {
		t.Errorf("redirect followed: target got %d requests", n)
	}
}

func TestAuthHTTPFakeServer(t *testing.T) {
	t.Parallel()
	const salt = "<1896.697170952@dbc.mtview.ca.us>"
	apop := func(password string) string {
		sum := md5.Sum([]byte(salt + password))
		return hex.EncodeToString(sum[:])
	}
	cram := func(password string) string {
		m := hmac.New(md5.New, []byte(password))
		m.Write([]byte(salt))
		return hex.EncodeToString(m.Sum(nil))
	}
	users := map[string]pop3test.AuthUser{
		"john doe": {Password: "p@ss wörd:%", Server: "127.0.0.1:1110"},
		"bob":      {Password: "pw", Server: "[::1]:110", RewriteUser: "bob@backend", RewritePass: "backend pw"},
	}
	tests := []struct {
		name   string
		server *pop3test.AuthServer
		req    authHTTPRequest
		want   authHTTPResult
	}{
		{name: "plain", req: authHTTPRequest{Method: "plain", User: "john doe", Pass: "p@ss wörd:%"},
			want: authHTTPResult{OK: true, Address: "127.0.0.1:1110"}},
		{name: "plain, wrong password", req: authHTTPRequest{Method: "plain", User: "john doe", Pass: "nope"},
			want: authHTTPResult{ErrorText: "Invalid login or password", HasWait: true}},
		{name: "unknown user, wait 3s", server: &pop3test.AuthServer{Wait: 3 * time.Second}, req: authHTTPRequest{Method: "plain", User: "eve", Pass: "x"},
			want: authHTTPResult{ErrorText: "Invalid login or password", Wait: 3 * time.Second, HasWait: true}},
		{name: "refusal without wait", server: &pop3test.AuthServer{NoWait: true, FailText: "Go away", ErrorCode: "535 5.7.8"}, req: authHTTPRequest{Method: "plain", User: "eve", Pass: "x"},
			want: authHTTPResult{ErrorText: "Go away", ErrorCode: "535 5.7.8"}},
		{name: "apop", req: authHTTPRequest{Method: "apop", User: "john doe", Pass: apop("p@ss wörd:%"), Salt: salt},
			want: authHTTPResult{OK: true, Address: "127.0.0.1:1110", Pass: "p@ss wörd:%"}},
		{name: "apop, wrong digest", req: authHTTPRequest{Method: "apop", User: "john doe", Pass: apop("nope"), Salt: salt},
			want: authHTTPResult{ErrorText: "Invalid login or password", HasWait: true}},
		{name: "cram-md5", req: authHTTPRequest{Method: "cram-md5", User: "john doe", Pass: cram("p@ss wörd:%"), Salt: salt},
			want: authHTTPResult{OK: true, Address: "127.0.0.1:1110", Pass: "p@ss wörd:%"}},
		{name: "rewrite", req: authHTTPRequest{Method: "login", User: "bob", Pass: "pw"},
			want: authHTTPResult{OK: true, Address: "[::1]:110", User: "bob@backend", Pass: "backend pw"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := tt.server
			if srv == nil {
				srv = &pop3test.AuthServer{}
			}
			srv.Users = users
			a := newTestAuthHTTP(t, srv.Start(t))
			tt.req.Attempt, tt.req.ClientIP = 1, "192.0.2.1"
			got, err := a.check(context.Background(), tt.req)
			if err != nil {
				t.Fatalf("check: %v", err)
			}
			if got != tt.want {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// TestAuthHTTPErrorsHoldNoSecret runs every failure with known secrets in
// the request, the URL and a configured field and looks for them in the
// error text.
func TestAuthHTTPErrorsHoldNoSecret(t *testing.T) {
	t.Parallel()
	const (
		password = "s3cret pässword"
		salt     = "<salt-secret.1@pop.example>"
		fieldVal = "field-secret"
	)
	secrets := []string{password, escapeMailAuth(password), "s3cret", salt, "salt-secret", fieldVal, "url-secret", "query-secret"}
	withSecrets := func(u string) string {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		p.User = url.UserPassword("user", "url-secret")
		p.RawQuery = "key=query-secret"
		return p.String()
	}
	servers := map[string]string{
		"down":            downAuthServer(t),
		"silent":          silentAuthServer(t),
		"not HTTP":        rawAuthServer(t, "+OK "+password+"\r\n"),
		"no status":       rawAuthServer(t, "HTTP/1.0 200 OK\r\n\r\n"),
		"bad server":      rawAuthServer(t, "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: host.example\r\nAuth-Port: 110\r\n\r\n"),
		"bad port":        rawAuthServer(t, "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: x\r\n\r\n"),
		"control in pass": rawAuthServer(t, "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\nAuth-Pass: "+password+"\x01\r\n\r\n"),
		"no pass":         rawAuthServer(t, "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n"),
		"too big":         rawAuthServer(t, "HTTP/1.0 200 OK\r\nX-Pad: "+strings.Repeat(password, 2000)+"\r\n\r\n"),
	}
	for name, u := range servers {
		t.Run(name, func(t *testing.T) {
			a := newTestAuthHTTP(t, withSecrets(u), func(a *AuthHTTP) {
				a.Timeout = caddy.Duration(200 * time.Millisecond)
				a.Header = map[string]string{"X-Auth-Key": fieldVal}
			})
			_, err := a.check(context.Background(), authHTTPRequest{Method: "apop", User: "alice", Pass: password, Salt: salt, Attempt: 1, ClientIP: "192.0.2.1"})
			if err == nil {
				t.Fatal("want an error")
			}
			for _, s := range secrets {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error %q holds secret %q", err, s)
				}
			}
		})
	}
}

func TestAuthHTTPProvision(t *testing.T) {
	t.Parallel()
	const secret = "prov-secret"
	tests := []struct {
		name    string
		a       AuthHTTP
		wantErr string
	}{
		{name: "no url", a: AuthHTTP{}, wantErr: "url"},
		{name: "bad scheme", a: AuthHTTP{URL: "ftp://" + secret + "@127.0.0.1/"}, wantErr: "scheme"},
		{name: "no scheme", a: AuthHTTP{URL: "127.0.0.1:9000/auth"}, wantErr: "url"},
		{name: "no host", a: AuthHTTP{URL: "http://u:" + secret + "@:80/auth"}, wantErr: "host"},
		{name: "negative timeout", a: AuthHTTP{URL: "http://127.0.0.1/", Timeout: -1}, wantErr: "timeout"},
		{name: "bad header name", a: AuthHTTP{URL: "http://127.0.0.1/", Header: map[string]string{"X Key": secret}}, wantErr: "invalid name"},
		{name: "reserved header", a: AuthHTTP{URL: "http://127.0.0.1/", Header: map[string]string{"auth-user": secret}}, wantErr: "sent by the proxy"},
		{name: "reserved SSL header", a: AuthHTTP{URL: "http://127.0.0.1/", Header: map[string]string{"Auth-SSL-Verify": "SUCCESS"}}, wantErr: "sent by the proxy"},
		{name: "reserved Host", a: AuthHTTP{URL: "http://127.0.0.1/", Header: map[string]string{"Host": "x"}}, wantErr: "sent by the proxy"},
		{name: "control byte in value", a: AuthHTTP{URL: "http://127.0.0.1/", Header: map[string]string{"X-Key": secret + "\r\nX: y"}}, wantErr: "control character"},
		{name: "bad url in urls", a: AuthHTTP{URL: "http://127.0.0.1/", URLs: []string{"http://127.0.0.2/", "ftp://" + secret + "@x/"}}, wantErr: "urls 1: scheme"},
		{name: "bad url in urls alone", a: AuthHTTP{URLs: []string{"http://u:" + secret + "@:80/auth"}}, wantErr: "urls 0: host"},
		{name: "url twice", a: AuthHTTP{URL: "http://127.0.0.1/", URLs: []string{"http://127.0.0.1/"}}, wantErr: "urls 0: given twice"},
		{name: "tls without https", a: AuthHTTP{URL: "http://127.0.0.1/", URLs: []string{"http://127.0.0.2/"}, TLS: &reverseproxy.TLSConfig{}}, wantErr: "https"},
		{name: "valid", a: AuthHTTP{URL: "https://auth.example:8443/mail/auth?x=1", Header: map[string]string{"X-Auth-Key": "{env.AUTH_KEY}"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := tt.a
			err := a.provision(caddy.Context{})
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("provision: %v", err)
				}
				if time.Duration(a.Timeout) != 60*time.Second {
					t.Errorf("default timeout = %s", time.Duration(a.Timeout))
				}
				if a.servers[0].safeURL != "https://auth.example:8443/mail/auth" {
					t.Errorf("safeURL = %q", a.servers[0].safeURL)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want one about %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error %q holds the secret", err)
			}
		})
	}
}

// TestAuthHTTPAddressFields checks Client-Port, Server-IP and Server-Port,
// taken from the connection's addresses, and that they are left out when
// the connection has no IP addresses (a pipe).
func TestAuthHTTPAddressFields(t *testing.T) {
	t.Parallel()
	tcp := func(s string) net.Addr { return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(s)) }
	tests := []struct {
		name          string
		remote, local net.Addr
		want          map[string]string
	}{
		{name: "ipv4", remote: tcp("192.0.2.7:50123"), local: tcp("198.51.100.1:110"),
			want: map[string]string{"Client-IP": "192.0.2.7", "Client-Port": "50123", "Server-IP": "198.51.100.1", "Server-Port": "110"}},
		{name: "ipv6 without brackets", remote: tcp("[2001:db8::7]:40000"), local: tcp("[2001:db8::1]:995"),
			want: map[string]string{"Client-IP": "2001:db8::7", "Client-Port": "40000", "Server-IP": "2001:db8::1", "Server-Port": "995"}},
		{name: "pipe", remote: pipeAddr{}, local: pipeAddr{},
			want: map[string]string{"Client-IP": ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{"u": {Password: "p", Server: "127.0.0.1:110"}}}
			a := newTestAuthHTTP(t, srv.Start(t))
			_, err := authHTTPAuthenticator{a: a}.authenticate(context.Background(), loginRequest{
				method: AuthPlain, creds: sasl.Credentials{Username: "u", Password: "p"}, attempt: 1,
				remote: tt.remote, local: tt.local,
			})
			if err != nil {
				t.Fatalf("authenticate: %v", err)
			}
			got := srv.Last(t)
			for _, name := range []string{"Client-IP", "Client-Port", "Server-IP", "Server-Port"} {
				v, ok := got.Get(name)
				want, wantOK := tt.want[name]
				if ok != wantOK || v != want {
					t.Errorf("%s = %q (present %v), want %q (present %v)", name, v, ok, want, wantOK)
				}
			}
		})
	}
}

// pipeAddr is net.Pipe's address: no host, no port.
type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// okAuthHandler answers every request Auth-Status: OK for 127.0.0.1:110.
var okAuthHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Auth-Status", "OK")
	w.Header().Set("Auth-Server", "127.0.0.1")
	w.Header().Set("Auth-Port", "110")
})

// writePEM writes blocks of type typ to a new file and returns its path.
func writePEM(t *testing.T, typ string, ders ...[]byte) string {
	t.Helper()
	var b []byte
	for _, der := range ders {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})...)
	}
	f, err := os.CreateTemp(t.TempDir(), "*.pem")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	return f.Name()
}

// TestAuthHTTPTLSClient checks https:// URLs with Caddy's TLS client
// settings: a trust pool from a file, the server name, skipping
// verification and a client certificate for a server that requires one.
func TestAuthHTTPTLSClient(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(okAuthHandler)
	t.Cleanup(srv.Close)
	trust := json.RawMessage(fmt.Sprintf(`{"provider":"file","pem_files":[%q]}`, writePEM(t, "CERTIFICATE", srv.Certificate().Raw)))

	pki := newTestPKI(t)
	mtls := httptest.NewUnstartedServer(okAuthHandler)
	mtls.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.caPool}
	mtls.StartTLS()
	t.Cleanup(mtls.Close)
	mtlsTrust := json.RawMessage(fmt.Sprintf(`{"provider":"file","pem_files":[%q]}`, writePEM(t, "CERTIFICATE", mtls.Certificate().Raw)))
	keyDER, err := x509.MarshalPKCS8PrivateKey(pki.client.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := writePEM(t, "CERTIFICATE", pki.client.Certificate[0]), writePEM(t, "PRIVATE KEY", keyDER)

	tests := []struct {
		name    string
		url     string
		tls     *reverseproxy.TLSConfig
		wantErr string // "" for an OK answer
	}{
		{name: "system roots do not trust it", url: srv.URL, wantErr: "certificate"},
		{name: "trust pool", url: srv.URL, tls: &reverseproxy.TLSConfig{CARaw: trust}},
		{name: "trust pool, server name in the certificate", url: srv.URL, tls: &reverseproxy.TLSConfig{CARaw: trust, ServerName: "example.com"}},
		{name: "trust pool, wrong server name", url: srv.URL, tls: &reverseproxy.TLSConfig{CARaw: trust, ServerName: "other.test"}, wantErr: "other.test"},
		{name: "insecure skip verify", url: srv.URL, tls: &reverseproxy.TLSConfig{InsecureSkipVerify: true}},
		{name: "client certificate", url: mtls.URL, tls: &reverseproxy.TLSConfig{CARaw: mtlsTrust, ClientCertificateFile: certFile, ClientCertificateKeyFile: keyFile}},
		{name: "client certificate missing", url: mtls.URL, tls: &reverseproxy.TLSConfig{CARaw: mtlsTrust}, wantErr: "asking"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			t.Cleanup(cancel)
			a := &AuthHTTP{URL: tt.url + "/auth", TLS: tt.tls, Timeout: caddy.Duration(5 * time.Second)}
			if err := a.setup(ctx); err != nil {
				t.Fatalf("setup: %v", err)
			}
			t.Cleanup(a.cleanup)
			res, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1, ClientIP: "192.0.2.1"})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one about %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !res.OK {
				t.Fatalf("check = %+v, %v", res, err)
			}
		})
	}
}

func TestAuthHTTPTLSNeedsHTTPS(t *testing.T) {
	t.Parallel()
	a := &AuthHTTP{URL: "http://127.0.0.1/auth", TLS: &reverseproxy.TLSConfig{InsecureSkipVerify: true}}
	if err := a.provision(caddy.Context{}); err == nil || !strings.Contains(err.Error(), "https") {
		t.Fatalf("provision = %v, want an error about https", err)
	}
}

// countingAuthServer answers every request with status and fields, and
// counts requests and accepted connections.
func countingAuthServer(t *testing.T, status int, fields map[string]string) (url string, reqs, conns *atomic.Int32) {
	t.Helper()
	reqs, conns = new(atomic.Int32), new(atomic.Int32)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		reqs.Add(1)
		for k, v := range fields {
			w.Header().Set(k, v)
		}
		w.WriteHeader(status)
	}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL + "/auth", reqs, conns
}

var (
	authOK      = map[string]string{"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": "110"}
	authRefused = map[string]string{"Auth-Status": "Invalid login or password"}
)

func TestAuthHTTPFailover(t *testing.T) {
	t.Parallel()
	type server struct {
		kind   string // "down", "silent" or "answer"
		status int
		fields map[string]string
		asked  int32 // requests it must have had
	}
	tests := []struct {
		name    string
		servers []server
		want    authHTTPResult
		wantErr []string // substrings of the error; nil: no error
	}{
		{name: "first down, second answers",
			servers: []server{{kind: "down"}, {kind: "answer", status: 200, fields: authOK, asked: 1}},
			want:    authHTTPResult{OK: true, Address: "127.0.0.1:110"}},
		{name: "503 without Auth-Status fails over",
			servers: []server{{kind: "answer", status: 503, asked: 1}, {kind: "answer", status: 200, fields: authOK, asked: 1}},
			want:    authHTTPResult{OK: true, Address: "127.0.0.1:110"}},
		{name: "a refusal is an answer, also with a 500",
			servers: []server{{kind: "answer", status: 500, fields: authRefused, asked: 1}, {kind: "answer", status: 200, fields: authOK}},
			want:    authHTTPResult{ErrorText: "Invalid login or password"}},
		{name: "a 200 refusal is an answer",
			servers: []server{{kind: "answer", status: 200, fields: authRefused, asked: 1}, {kind: "answer", status: 200, fields: authOK}},
			want:    authHTTPResult{ErrorText: "Invalid login or password"}},
		{name: "a 4xx without Auth-Status does not fail over",
			servers: []server{{kind: "answer", status: 404, asked: 1}, {kind: "answer", status: 200, fields: authOK}},
			wantErr: []string{"no Auth-Status (HTTP status 404)"}},
		{name: "one timeout for all: a silent first server leaves none for the second",
			servers: []server{{kind: "silent"}, {kind: "answer", status: 200, fields: authOK}},
			wantErr: []string{"did not answer within"}},
		{name: "all fail: every error is told",
			servers: []server{{kind: "down"}, {kind: "answer", status: 502, asked: 1}},
			wantErr: []string{"connection refused", "HTTP status 502"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var urls []string
			var counts []*atomic.Int32
			for _, s := range tt.servers {
				var u string
				reqs := new(atomic.Int32)
				switch s.kind {
				case "down":
					u = downAuthServer(t)
				case "silent":
					u = silentAuthServer(t)
				default:
					u, reqs, _ = countingAuthServer(t, s.status, s.fields)
				}
				urls, counts = append(urls, u), append(counts, reqs)
			}
			a := newTestAuthHTTP(t, urls[0], func(a *AuthHTTP) {
				a.URLs, a.Timeout = urls[1:], caddy.Duration(300*time.Millisecond)
			})
			got, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1, ClientIP: "192.0.2.1"})
			if tt.wantErr != nil {
				if err == nil {
					t.Fatalf("check = %+v, want an error", got)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("err = %v, want %q in it", err, w)
					}
				}
			} else if err != nil || got != tt.want {
				t.Fatalf("check = %+v, %v; want %+v", got, err, tt.want)
			}
			for i, s := range tt.servers {
				if n := counts[i].Load(); n != s.asked {
					t.Errorf("server %d asked %d times, want %d", i, n, s.asked)
				}
			}
		})
	}
}

// TestAuthHTTPFailedServerAskedLast: a server that could not answer is
// asked after the others until failFor has passed.
func TestAuthHTTPFailedServerAskedLast(t *testing.T) {
	t.Parallel()
	bad, badReqs, _ := countingAuthServer(t, 503, nil)
	good, goodReqs, _ := countingAuthServer(t, 200, authOK)
	a := newTestAuthHTTP(t, "", func(a *AuthHTTP) {
		a.URL, a.URLs, a.failFor = "", []string{bad, good}, 300*time.Millisecond
	})
	login := func(wantBad, wantGood int32) {
		t.Helper()
		res, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1})
		if err != nil || !res.OK {
			t.Fatalf("check = %+v, %v", res, err)
		}
		if b, g := badReqs.Load(), goodReqs.Load(); b != wantBad || g != wantGood {
			t.Fatalf("requests: failing server %d, good one %d; want %d, %d", b, g, wantBad, wantGood)
		}
	}
	login(1, 1) // the first fails over
	login(1, 2) // the failed one is asked last, so not at all
	time.Sleep(400 * time.Millisecond)
	login(2, 3) // first again once failFor is over
}

// TestAuthHTTPKeepAlive: logins reuse the connection to the auth server.
func TestAuthHTTPKeepAlive(t *testing.T) {
	t.Parallel()
	u, reqs, conns := countingAuthServer(t, 200, authOK)
	a := newTestAuthHTTP(t, u)
	for range 3 {
		if res, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1}); err != nil || !res.OK {
			t.Fatalf("check = %+v, %v", res, err)
		}
	}
	if r, c := reqs.Load(), conns.Load(); r != 3 || c != 1 {
		t.Errorf("%d requests over %d connections, want 3 over 1", r, c)
	}
}

func TestAuthHTTPResolveAuthServer(t *testing.T) {
	t.Parallel()
	answer := func(server string) string {
		return "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: " + server + "\r\nAuth-Port: 110\r\nContent-Length: 0\r\n\r\n"
	}
	addrs := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	tests := []struct {
		name    string
		server  string
		off     bool // resolve_auth_server off
		addrs   []netip.Addr
		err     error
		block   bool // the lookup waits for its context
		want    string
		wantErr string
	}{
		{name: "first address", server: "pop.example.test", addrs: addrs("2001:db8::5", "192.0.2.5"), want: "[2001:db8::5]:110"},
		{name: "mapped address unmapped", server: "pop.example.test.", addrs: addrs("::ffff:192.0.2.5"), want: "192.0.2.5:110"},
		{name: "ip address not looked up", server: "192.0.2.9", err: errors.New("must not be called"), want: "192.0.2.9:110"},
		{name: "not found", server: "nosuch.example.test", err: &net.DNSError{Err: "no such host", Name: "nosuch.example.test", IsNotFound: true}, wantErr: "no such host"},
		{name: "no address", server: "pop.example.test", wantErr: "no address"},
		{name: "lookup bounded by the timeout", server: "pop.example.test", block: true, wantErr: "no answer within"},
		{name: "not a host name", server: "pop example", wantErr: "neither an IP address nor a host name"},
		{name: "off: host name refused", server: "pop.example.test", off: true, addrs: addrs("192.0.2.5"), wantErr: "not an IP address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var looked []string
			a := newTestAuthHTTP(t, rawAuthServer(t, answer(tt.server)), func(a *AuthHTTP) {
				a.ResolveAuthServer, a.Timeout = !tt.off, caddy.Duration(300*time.Millisecond)
				a.lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
					looked = append(looked, host)
					if tt.block {
						<-ctx.Done()
						return nil, ctx.Err()
					}
					return tt.addrs, tt.err
				}
			})
			got, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("check = %+v, %v; want an error about %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || !got.OK || got.Address != tt.want || got.Host != "" {
				t.Fatalf("check = %+v, %v; want OK for %s", got, err, tt.want)
			}
			if _, ip := parseAuthServer(tt.server); !ip && (len(looked) != 1 || looked[0] != tt.server) {
				t.Errorf("looked up %q, want %q", looked, tt.server)
			}
		})
	}
}

// TestAuthHTTPResolveAuthServerSystem resolves localhost with the system
// resolver.
func TestAuthHTTPResolveAuthServerSystem(t *testing.T) {
	t.Parallel()
	a := newTestAuthHTTP(t, rawAuthServer(t, "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: localhost\r\nAuth-Port: 110\r\nContent-Length: 0\r\n\r\n"),
		func(a *AuthHTTP) { a.ResolveAuthServer = true })
	got, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: "p", Attempt: 1})
	if err != nil || (got.Address != "127.0.0.1:110" && got.Address != "[::1]:110") {
		t.Fatalf("check = %+v, %v; want localhost's address", got, err)
	}
}

// TestAuthHTTPFailoverLogged: a failover is logged with the server's URL,
// never its user info or query, nor a request field.
func TestAuthHTTPFailoverLogged(t *testing.T) {
	t.Parallel()
	const secret = "failover-secret"
	bad, _, _ := countingAuthServer(t, 503, nil)
	good, _, _ := countingAuthServer(t, 200, authOK)
	badURL, _ := url.Parse(bad)
	badURL.User, badURL.RawQuery = url.UserPassword("u", secret), "key="+secret
	core, logs := observer.New(zap.DebugLevel)
	a := newTestAuthHTTP(t, badURL.String(), func(a *AuthHTTP) {
		a.URLs, a.logger = []string{good}, zap.New(core)
		a.Header = map[string]string{"X-Auth-Key": secret}
	})
	if res, err := a.check(context.Background(), authHTTPRequest{Method: AuthPlain, User: "u", Pass: secret, Attempt: 1}); err != nil || !res.OK {
		t.Fatalf("check = %+v, %v", res, err)
	}
	entries := logs.All()
	if len(entries) != 1 || entries[0].Level != zap.WarnLevel {
		t.Fatalf("log entries %+v, want one warning", entries)
	}
	fields := entries[0].ContextMap()
	if want := (&url.URL{Scheme: "http", Host: badURL.Host, Path: "/auth"}).String(); fields["auth_server"] != want {
		t.Errorf("auth_server = %v, want %s", fields["auth_server"], want)
	}
	if s := fmt.Sprint(entries[0].Message, fields); strings.Contains(s, secret) {
		t.Errorf("log entry holds the secret: %s", s)
	}
}
