//go:build integration

package integration

// A certificate from an ACME CA: Debian's pebble issues one for mail.test to
// a Caddy whose only app is layer4 (tls_automate_names), solving http-01 on
// an alternate port, and real TLS clients verify it over STLS and implicit
// TLS.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	bigint "math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// acmeName is the name the certificate is for. pebble-challtestsrv answers
// every A query with 127.0.0.1, so pebble validates it on loopback.
const acmeName = "mail.test"

// TestACME gets a certificate for mail.test from pebble and checks it with
// Go's TLS client and curl, over STLS and implicit TLS, through the proxy to
// Dovecot.
func TestACME(t *testing.T) {
	need(t)
	start := time.Now()
	for _, tool := range []string{"pebble", "pebble-challtestsrv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (scripts/install-deps.sh installs the pebble package): %v", tool, err)
		}
	}
	usedSecret(alice, alicePass)
	dir := t.TempDir()
	ports := make([]string, 8)
	for i := range ports {
		var err error
		if ports[i], err = freePort(); err != nil {
			t.Fatal(err)
		}
	}
	acmeAddr, mgmtAddr, dnsAddr, challMgmtAddr, httpAddr, tlsAddr, stlsAddr, implicitAddr :=
		ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6], ports[7]

	// pebble's own HTTPS listeners (ACME and management) need a
	// certificate; Debian ships none.
	caFile, certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	listenerCA, err := writeLocalhostCert(caFile, certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}

	// A DNS server for pebble's validation: every name is 127.0.0.1, and
	// no AAAA answers so that the http-01 check uses IPv4.
	startProcess(t, "pebble-challtestsrv", nil, "pebble-challtestsrv",
		"-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
		"-dns01", dnsAddr, "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", challMgmtAddr)
	waitFor(t, 10*time.Second, "pebble-challtestsrv", func() bool {
		c, err := net.DialTimeout("tcp", challMgmtAddr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	cfg, err := json.Marshal(map[string]any{"pebble": map[string]any{
		"listenAddress":           acmeAddr,
		"managementListenAddress": mgmtAddr,
		"certificate":             certFile,
		"privateKey":              keyFile,
		"httpPort":                mustPort(t, httpAddr),
		"tlsPort":                 mustPort(t, tlsAddr),
		"ocspResponderURL":        "",
	}})
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(dir, "pebble.json")
	if err := os.WriteFile(cfgFile, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	// NOSLEEP: validate at once; NONCEREJECT=0: no random badNonce errors.
	pebble := startProcess(t, "pebble", []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0"},
		"pebble", "-config", cfgFile, "-dnsserver", dnsAddr)
	pebbleClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: listenerCA}}}
	waitFor(t, 10*time.Second, "pebble's directory", func() bool {
		resp, err := pebbleClient.Get("https://" + acmeAddr + "/dir")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	p := startCaddy(t, "acme", fmt.Sprintf(`{
	admin off
	log {
		level DEBUG
	}
	acme_ca https://%[1]s/dir
	acme_ca_root %[2]s
	email a@example.com
	cert_issuer acme {
		alt_http_port %[3]s
		disable_tlsalpn_challenge
	}
	# No HTTP site names the host: ask for its certificate explicitly.
	tls_automate_names %[4]s
	layer4 {
		%[5]s {
			route {
				pop3 %[7]s {
					auth_failure_delay 1ms
				}
			}
		}
		%[6]s {
			route {
				tls {
					connection_policy {
						alpn pop3
					}
				}
				pop3 %[7]s
			}
		}
	}
}
`, acmeAddr, caFile, port(httpAddr), acmeName, stlsAddr, implicitAddr, env.dc.POP3Addr), listener{addr: stlsAddr})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pebble output tail:\n%s", tail(pebble.String(), 30))
		}
	})

	obtained := time.Now()
	waitFor(t, 30*time.Second, "Caddy's \"certificate obtained successfully\"", func() bool {
		for _, e := range caddyEntries(p.log()) {
			if e["msg"] == "certificate obtained successfully" && e["identifier"] == acmeName {
				return true
			}
		}
		return false
	})
	t.Logf("certificate obtained %v after Caddy's listener greeted", time.Since(obtained).Round(time.Millisecond))

	// pebble makes a new root for every run; its management port serves it.
	resp, err := pebbleClient.Get("https://" + mgmtAddr + "/roots/0")
	if err != nil {
		t.Fatalf("fetching pebble's root: %v", err)
	}
	rootPEM, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("fetching pebble's root: %d %v", resp.StatusCode, err)
	}
	rootFile := filepath.Join(dir, "pebble-root.pem")
	if err := os.WriteFile(rootFile, rootPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatalf("no certificate in pebble's root: %q", rootPEM)
	}
	tlsCfg := &tls.Config{RootCAs: roots, ServerName: acmeName, MinVersion: tls.VersionTLS12}
	checkChain := func(t *testing.T, st *tls.ConnectionState) {
		t.Helper()
		if len(st.VerifiedChains) == 0 || !slices.Contains(st.PeerCertificates[0].DNSNames, acmeName) {
			t.Fatalf("certificate not verified for %s: %d chains, names %q", acmeName, len(st.VerifiedChains), st.PeerCertificates[0].DNSNames)
		}
		chain := st.VerifiedChains[0]
		if root := chain[len(chain)-1].Subject.CommonName; !strings.Contains(root, "Pebble") {
			t.Errorf("chain ends in %q, want pebble's root", root)
		}
	}

	t.Run("go-stls", func(t *testing.T) {
		c := dialPOP3(t, stlsAddr, nil)
		checkChain(t, c.stls(tlsCfg))
		c.login(alice, alicePass)
		compareRetr(t, c, 1, env.aliceMsgs[0])
		c.quit()
	})
	t.Run("go-implicit-tls", func(t *testing.T) {
		cfg := tlsCfg.Clone()
		cfg.NextProtos = []string{"pop3"}
		c := dialPOP3(t, implicitAddr, cfg)
		st := c.conn.(*tls.Conn).ConnectionState()
		checkChain(t, &st)
		if st.NegotiatedProtocol != "pop3" {
			t.Errorf("ALPN %q, want pop3", st.NegotiatedProtocol)
		}
		c.login(alice, alicePass)
		c.ok("STAT")
		c.quit()
	})

	// curl lists the mailbox: directly from Dovecot in plaintext, and
	// through the proxy verifying pebble's certificate.
	curl := func(t *testing.T, url string, args ...string) []byte {
		t.Helper()
		args = append([]string{"-sS", "--max-time", "20", "-u", alice + ":" + alicePass}, args...)
		out, stderr, err := run(t, nil, "curl", append(args, url)...)
		if err != nil {
			t.Fatalf("curl %s: %v\n%s", url, err, stderr)
		}
		return out
	}
	want := curl(t, "pop3://"+env.dc.POP3Addr+"/")
	if !bytes.HasPrefix(want, []byte("1 ")) || bytes.Count(want, []byte("\n")) != len(env.aliceMsgs) {
		t.Fatalf("curl directly from Dovecot: %q", want)
	}
	for _, tc := range []struct{ name, scheme, addr string }{
		{"curl-stls", "pop3", stlsAddr},
		{"curl-implicit-tls", "pop3s", implicitAddr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url := tc.scheme + "://" + acmeName + ":" + port(tc.addr) + "/"
			got := curl(t, url, "--ssl-reqd", "--cacert", rootFile, "--resolve", acmeName+":"+port(tc.addr)+":127.0.0.1")
			if !bytes.Equal(got, want) {
				t.Errorf("curl %s: %q, want Dovecot's %q", url, got, want)
			}
		})
	}
	t.Logf("TestACME took %v", time.Since(start).Round(time.Millisecond))
}

func mustPort(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if _, err := fmt.Sscan(p, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// writeLocalhostCert makes a CA and a certificate for localhost and
// 127.0.0.1 signed by it, writes them as PEM and returns a pool with the CA.
func writeLocalhostCert(caFile, certFile, keyFile string) (*x509.CertPool, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          bigint.NewInt(1),
		Subject:               pkix.Name{CommonName: "caddy-pop3 test CA for pebble"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: bigint.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	for file, block := range map[string]*pem.Block{
		caFile:   {Type: "CERTIFICATE", Bytes: caDER},
		certFile: {Type: "CERTIFICATE", Bytes: leafDER},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
			return nil, err
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pool, nil
}

// startProcess runs a helper program until the test ends and returns its
// output so far, for failure messages.
func startProcess(t *testing.T, name string, extraEnv []string, bin string, args ...string) *syncBuffer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), extraEnv...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cancel() // kills this process only
		<-done
	})
	return out
}
