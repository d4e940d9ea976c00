//go:build integration

package integration

// Real POP3 clients through the proxy: curl, Python's poplib and
// fetchmail, each also run directly against Dovecot where that compares.

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// run runs a client with a time limit and returns stdout, stderr and the
// error.
func run(t *testing.T, env []string, name string, args ...string) ([]byte, string, error) {
	t.Helper()
	return runStdin(t, env, nil, name, args...)
}

// runInput is run with input on the client's stdin.
func runInput(t *testing.T, input, name string, args ...string) ([]byte, string, error) {
	t.Helper()
	return runStdin(t, nil, strings.NewReader(input), name, args...)
}

func runStdin(t *testing.T, env []string, stdin io.Reader, name string, args ...string) ([]byte, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.Bytes(), stderr.String(), err
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// curlPOP3 runs curl against url (host localhost, resolved to 127.0.0.1),
// trusting only cafile.
func curlPOP3(t *testing.T, url, cafile, user, pass string, extra ...string) ([]byte, string, error) {
	t.Helper()
	usedSecret(user, pass)
	p := url[strings.LastIndex(url, ":")+1:]
	p, _, _ = strings.Cut(p, "/")
	args := append([]string{"-sS", "--max-time", "30", "--cacert", cafile, "--resolve", "localhost:" + p + ":127.0.0.1",
		"-u", user + ":" + pass}, extra...)
	return run(t, nil, "curl", append(args, url)...)
}

// TestCurl lists and fetches with curl over STLS (--ssl-reqd) and implicit
// TLS (pop3s://, by the tls handler and by implicit_tls), through the proxy
// and directly, and checks that a wrong password makes curl fail.
func TestCurl(t *testing.T) {
	need(t)
	root := env.caddy.rootCAFile()
	dcCA := env.dc.CACertFile
	direct := "localhost:" + port(env.dc.POP3Addr)
	directS := "localhost:" + port(env.dc.POP3SAddr)
	only := "localhost:" + port(env.only)
	implicit := "localhost:" + port(env.implicit)
	implicitOpt := "localhost:" + port(env.implicitOpt) // pop3 implicit_tls

	for _, u := range []struct{ name, pass string }{{alice, alicePass}, {bob, bobPass}} {
		t.Run(u.name, func(t *testing.T) {
			list := func(url, ca string, extra ...string) []byte {
				out, stderr, err := curlPOP3(t, url, ca, u.name, u.pass, extra...)
				if err != nil {
					t.Fatalf("curl %s: %v\n%s", url, err, stderr)
				}
				return out
			}
			wantList := list("pop3://"+direct+"/", dcCA, "--ssl-reqd")
			if !bytes.HasPrefix(wantList, []byte("1 ")) {
				t.Fatalf("direct LIST via curl: %q", wantList)
			}
			if got := list("pop3://"+only+"/", root, "--ssl-reqd"); !bytes.Equal(got, wantList) {
				t.Errorf("LIST over STLS: got %q, want %q", got, wantList)
			}
			for _, addr := range []string{implicit, implicitOpt} {
				if got := list("pop3s://"+addr+"/", root); !bytes.Equal(got, wantList) {
					t.Errorf("LIST over pop3s://%s: got %q, want %q", addr, got, wantList)
				}
			}
			for n := 1; n <= 2; n++ {
				want := list(fmt.Sprintf("pop3://%s/%d", direct, n), dcCA, "--ssl-reqd")
				if !bytes.Equal(want, env.aliceMsgs[n-1]) {
					t.Errorf("direct RETR %d via curl differs from the stored message:\n%q\n%q", n, want, env.aliceMsgs[n-1])
				}
				if got := list(fmt.Sprintf("pop3s://%s/%d", directS, n), dcCA); !bytes.Equal(got, want) {
					t.Errorf("direct pop3s RETR %d differs from direct STLS", n)
				}
				for _, url := range []string{fmt.Sprintf("pop3://%s/%d", only, n), fmt.Sprintf("pop3s://%s/%d", implicit, n), fmt.Sprintf("pop3s://%s/%d", implicitOpt, n)} {
					extra := []string{"--ssl-reqd"}
					if strings.HasPrefix(url, "pop3s") {
						extra = nil
					}
					if got := list(url, root, extra...); !bytes.Equal(got, want) {
						t.Errorf("%s: got %q, want Dovecot's %q", url, got, want)
					}
				}
			}
		})
	}

	t.Run("wrong-password", func(t *testing.T) {
		for _, url := range []string{"pop3://" + only + "/1", "pop3s://" + implicit + "/1", "pop3s://" + implicitOpt + "/1"} {
			out, stderr, err := curlPOP3(t, url, root, alice, wrongPass, "--ssl-reqd")
			if err == nil {
				t.Errorf("curl %s with a wrong password succeeded: %q", url, out)
			} else if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 67 {
				t.Errorf("curl %s with a wrong password: %v (want exit 67, login denied)\n%s", url, err, stderr)
			}
		}
	})
	t.Run("ssl-reqd-without-STLS", func(t *testing.T) {
		// The starttls off listener offers no STLS: curl must refuse to
		// send the password in plaintext.
		url := "pop3://localhost:" + port(env.off) + "/1"
		if out, _, err := curlPOP3(t, url, root, alice, alicePass, "--ssl-reqd"); err == nil {
			t.Errorf("curl --ssl-reqd succeeded without STLS: %q", out)
		}
	})
	t.Run("untrusted-root", func(t *testing.T) {
		for _, addr := range []string{implicit, implicitOpt} {
			if out, _, err := curlPOP3(t, "pop3s://"+addr+"/1", dcCA, alice, alicePass); err == nil {
				t.Errorf("curl trusting only Dovecot's certificate accepted Caddy's on %s: %q", addr, out)
			}
		}
	})
}

// pythonPOP3 fetches message n with poplib (POP3 + stls, or POP3_SSL) and
// prints the sha256 and size of the message as poplib returns it (lines
// unstuffed, joined with CRLF), plus STAT.
const pythonPOP3 = `
import hashlib, os, poplib, ssl, sys
mode, host, port, cafile, n = sys.argv[1:6]
user, password = os.environ["POP3_USER"], os.environ["POP3_PASS"]
ctx = ssl.create_default_context(cafile=cafile)
if mode == "stls":
    p = poplib.POP3(host, int(port), timeout=30)
    p.stls(context=ctx)
else:
    p = poplib.POP3_SSL(host, int(port), context=ctx, timeout=30)
caps = p.capa()
p.user(user)
p.pass_(password)
count, size = p.stat()
resp, lines, octets = p.retr(int(n))
data = b"".join(l + b"\r\n" for l in lines)
print(hashlib.sha256(data).hexdigest(), len(data), count, size, "STLS" in caps)
p.quit()
`

// TestPythonPoplib fetches messages with Python's poplib over STLS and over
// implicit TLS (both forms), through the proxy and directly.
func TestPythonPoplib(t *testing.T) {
	need(t)
	root := env.caddy.rootCAFile()
	for _, u := range []struct{ name, pass string }{{alice, alicePass}, {bob, bobPass}} {
		usedSecret(u.name, u.pass)
		for n := 1; n <= 2; n++ {
			msg := env.aliceMsgs[n-1]
			sum := sha256.Sum256(msg)
			wantPrefix := fmt.Sprintf("%s %d ", hex.EncodeToString(sum[:]), len(msg))
			var directOut string
			for _, tc := range []struct{ name, mode, addr, ca string }{
				{"direct-stls", "stls", env.dc.POP3Addr, env.dc.CACertFile},
				{"direct-ssl", "ssl", env.dc.POP3SAddr, env.dc.CACertFile},
				{"proxy-stls", "stls", env.only, root},
				{"proxy-ssl", "ssl", env.implicit, root},
				{"proxy-ssl-implicit_tls", "ssl", env.implicitOpt, root},
			} {
				t.Run(fmt.Sprintf("%s/%d/%s", u.name, n, tc.name), func(t *testing.T) {
					out, stderr, err := run(t, []string{"POP3_USER=" + u.name, "POP3_PASS=" + u.pass},
						"python3", "-c", pythonPOP3, tc.mode, "localhost", port(tc.addr), tc.ca, fmt.Sprint(n))
					if err != nil {
						t.Fatalf("python3: %v\n%s", err, stderr)
					}
					got := strings.TrimSpace(string(out))
					if !strings.HasPrefix(got, wantPrefix) {
						t.Errorf("got %q, want the stored message: %q...", got, wantPrefix)
					}
					// STAT and the message must match Dovecot's; the CAPA
					// after the TLS upgrade differs (Dovecot lists STLS).
					fields := strings.Fields(got)
					if len(fields) == 5 {
						got = strings.Join(fields[:4], " ")
					}
					if directOut == "" {
						directOut = got
					} else if got != directOut {
						t.Errorf("got %q, direct Dovecot gave %q", got, directOut)
					}
					if strings.HasPrefix(tc.name, "proxy") && len(fields) == 5 && fields[4] != "False" {
						t.Errorf("CAPA after TLS lists STLS")
					}
				})
			}
		}
	}
}

// TestFetchmail fetches alice's mailbox with fetchmail over STLS and over
// implicit TLS, keeping the messages, and compares what its MDA got with
// the stored messages.
//
// fetchmail's sslcertck insists on a subject CommonName in the server
// certificate ("Server name not specified in certificate!"), and the leaf
// certificates of Caddy's internal CA have none (SAN only). So fetchmail
// checks the leaf's fingerprint instead, which it does in any mode; the
// test takes that fingerprint from a handshake verified against Caddy's
// root.
func TestFetchmail(t *testing.T) {
	need(t)
	if _, err := exec.LookPath("fetchmail"); err != nil {
		t.Fatalf("fetchmail not installed (scripts/install-deps.sh installs it): %v", err)
	}
	usedSecret(alice, alicePass)
	cfg := caddyTLS(t)
	conn, err := tls.Dial("tcp", env.implicit, cfg)
	if err != nil {
		t.Fatal(err)
	}
	leaf := conn.ConnectionState().PeerCertificates[0]
	conn.Close()
	sum := md5.Sum(leaf.Raw) // fetchmail 6.4 fingerprints are MD5
	var fp []string
	for _, b := range sum {
		fp = append(fp, fmt.Sprintf("%02X", b))
	}
	fingerprint := strings.Join(fp, ":")
	wrong := strings.Repeat("00:", 15) + "00"
	for _, tc := range []struct{ name, addr, ssl, fingerprint string }{
		{"stls", env.only, "sslproto tls1.2+", fingerprint},
		{"implicit-tls", env.implicit, "ssl sslproto tls1.2+", fingerprint},
		{"stls-wrong-fingerprint", env.only, "sslproto tls1.2+", wrong},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "mail")
			rc := fmt.Sprintf(`set no syslog
poll localhost via 127.0.0.1 port %s protocol pop3 auth password
  user "%s" there with password "%s" is "%s" here
  %s sslcertfile "%s" no sslcertck sslfingerprint "%s" sslcommonname localhost
  keep fetchall
  mda "/bin/sh -c 'cat >> %s; echo ==END== >> %s'"
`, port(tc.addr), alice, alicePass, "root", tc.ssl, env.caddy.rootCAFile(), tc.fingerprint, out, out)
			rcFile := filepath.Join(dir, "fetchmailrc")
			if err := os.WriteFile(rcFile, []byte(rc), 0o600); err != nil {
				t.Fatal(err)
			}
			stdout, stderr, err := run(t, []string{"HOME=" + dir, "FETCHMAILHOME=" + dir},
				"fetchmail", "-f", rcFile, "--nodetach", "--idfile", filepath.Join(dir, "ids"), "-v")
			if tc.fingerprint == wrong {
				// The pin is what verifies the server here: a wrong one
				// must stop fetchmail before it logs in.
				if err == nil || !strings.Contains(stderr, "fingerprints do not match") || strings.Contains(string(stdout), "PASS") {
					t.Errorf("fetchmail with a wrong fingerprint: %v\n%s\n%s", err, redactAll(string(stdout)), redactAll(stderr))
				}
				return
			}
			if err != nil {
				t.Fatalf("fetchmail: %v\n%s\n%s", err, redactAll(string(stdout)), redactAll(stderr))
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			msgs := strings.Split(strings.TrimSuffix(string(got), "==END==\n"), "==END==\n")
			if len(msgs) != len(env.aliceMsgs) {
				t.Fatalf("fetchmail delivered %d messages, want %d:\n%s", len(msgs), len(env.aliceMsgs), got)
			}
			for i, m := range msgs {
				// fetchmail adds a Received: header and hands the MDA LF
				// line ends; the message itself must follow unchanged.
				want := strings.ReplaceAll(string(env.aliceMsgs[i]), "\r\n", "\n")
				if !strings.HasSuffix(m, want) {
					t.Errorf("message %d: got\n%q\nwant it to end with\n%q", i+1, m, want)
				}
			}
		})
	}
}

// redactAll hides every test password in client output.
func redactAll(s string) string {
	for secret := range allSecrets() {
		s = strings.ReplaceAll(s, secret, "<secret>")
	}
	return s
}
