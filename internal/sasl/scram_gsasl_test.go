package sasl

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// gsasl returns the path of GNU SASL's command-line tool. A missing one
// fails the test unless the developer opted out with POP3_TEST_NO_GSASL=1
// (scripts/test.sh ignores that in CI).
func gsasl(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("gsasl")
	if err != nil {
		if os.Getenv("POP3_TEST_NO_GSASL") == "1" && os.Getenv("CI") == "" {
			t.Skip("gsasl not installed and POP3_TEST_NO_GSASL=1")
		}
		t.Fatalf("gsasl (Debian package gsasl, scripts/install-deps.sh) is needed: %v", err)
	}
	return path
}

// TestSCRAMGSASL runs GNU SASL's client against our server. In its
// stdin/stdout mode gsasl prints the mechanism name, then each client
// message in base64 on a line of its own, and reads each server challenge
// the same way. After the server-final-message it prints an empty line,
// which is the empty response POP3 asks for (see SCRAM), then reads the
// outcome's additional data (none: an empty line).
func TestSCRAMGSASL(t *testing.T) {
	t.Parallel()
	bin := gsasl(t)
	tests := []struct {
		name        string
		password    string
		authzid     string
		tamperFinal bool // flip a bit of the server signature
		want        Credentials
		err         error // the server's
		clientFails bool
	}{
		{name: "right password", password: scramPassword, want: Credentials{Username: scramUser}},
		{name: "authzid", password: scramPassword, authzid: "admin", want: Credentials{Username: scramUser, Identity: "admin"}},
		{name: "escaped authzid", password: scramPassword, authzid: "a,b=c", want: Credentials{Username: scramUser, Identity: "a,b=c"}},
		{name: "wrong password", password: "pen", err: ErrBadProof, clientFails: true},
		// gsasl checks our server signature: a wrong one makes it fail
		// before it sends the empty response.
		{name: "wrong server signature", password: scramPassword, tamperFinal: true, err: errClientGone, clientFails: true},
	}
	for _, m := range scramMechs {
		users := map[string]SCRAMKeys{scramUser: mustKeys(t, m.hash, scramPassword, []byte("gsasl salt"), 4096)}
		for _, tc := range tests {
			t.Run(m.name+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				args := []string{"--client", "--quiet", "--no-cb", "--mechanism=" + m.name,
					"--authentication-id=" + scramUser, "--password=" + tc.password}
				if tc.authzid != "" {
					args = append(args, "--authorization-id="+tc.authzid)
				}
				s := m.new(lookupOf(users, nil))
				tamper := func(challenge []byte) []byte { return challenge }
				if tc.tamperFinal {
					tamper = func(challenge []byte) []byte {
						if v, ok := strings.CutPrefix(string(challenge), "v="); ok {
							sig := mustDecode(t, v)
							sig[0] ^= 1
							return []byte("v=" + base64.StdEncoding.EncodeToString(sig))
						}
						return challenge
					}
				}
				creds, clientErr, err := runGSASL(t, bin, args, nil, s, tamper)
				if !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
					t.Fatalf("server: %v, want %v", err, tc.err)
				}
				if (clientErr != nil) != tc.clientFails {
					t.Errorf("gsasl: %v", clientErr)
				}
				if creds != tc.want {
					t.Errorf("credentials %+v, want %+v", creds, tc.want)
				}
			})
		}
	}
}

// errClientGone is gsasl ending before the exchange did.
var errClientGone = errors.New("gsasl ended early")

// runGSASL drives s with a gsasl client, passing each challenge through
// tamper, and returns what s yielded, how gsasl ended and the server's
// error. A non-nil cbData is the tls-exporter channel binding gsasl sees.
func runGSASL(t *testing.T, bin string, args []string, cbData []byte, s *SCRAM, tamper func([]byte) []byte) (Credentials, error, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != s.name {
		t.Fatalf("gsasl chose %q (%v); stderr: %s", lines.Text(), lines.Err(), stderr.String())
	}
	send := func(b []byte) {
		t.Helper()
		if _, err := io.WriteString(stdin, base64.StdEncoding.EncodeToString(b)+"\n"); err != nil {
			t.Errorf("writing to gsasl: %v", err)
		}
	}

	// gsasl asks for the binding on stdout, without a newline, before its
	// client-first-message.
	prompt := ""
	if cbData != nil {
		send(cbData)
		prompt = "Enter base64 encoded tls-exporter channel binding: "
	}

	var creds Credentials
	serverErr := func() error {
		var response []byte // gsasl sends the client-first-message unasked
		for {
			challenge, done, err := s.Next(response)
			if err != nil {
				return err
			}
			if done {
				creds = s.Credentials()
				send(nil) // success, without additional data
				return nil
			}
			if response != nil {
				send(tamper(challenge))
			}
			if !lines.Scan() {
				return errClientGone
			}
			line, ok := strings.CutPrefix(lines.Text(), prompt)
			if !ok {
				t.Fatalf("gsasl did not ask for the channel binding: %q", lines.Text())
			}
			prompt = ""
			response = mustDecode(t, line) // "" is an empty response
		}
	}()
	_ = stdin.Close()
	_, _ = io.Copy(io.Discard, stdout)
	clientErr := cmd.Wait()
	if clientErr != nil {
		clientErr = fmt.Errorf("%w: %s", clientErr, stderr.String())
	}
	return creds, clientErr, serverErr
}

// TestSCRAMPlusGSASL runs gsasl's SCRAM-SHA-256-PLUS client, which binds
// to tls-exporter, against NewSCRAMSHA256Plus.
func TestSCRAMPlusGSASL(t *testing.T) {
	t.Parallel()
	bin := gsasl(t)
	keys := mustKeys(t, sha256.New, scramPassword, []byte("gsasl salt"), 4096)
	serverCB := []byte("0123456789abcdef0123456789abcdef")
	tests := []struct {
		name     string
		clientCB []byte
		authzid  string
		err      error
	}{
		{"same connection", serverCB, "", nil},
		{"same connection, authzid", serverCB, "admin", nil},
		{"another connection", []byte("0123456789abcdef0123456789abcdeF"), "", ErrInvalidResponse},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			args := []string{"--client", "--quiet", "--mechanism=SCRAM-SHA-256-PLUS",
				"--authentication-id=" + scramUser, "--password=" + scramPassword}
			if tc.authzid != "" {
				args = append(args, "--authorization-id="+tc.authzid)
			}
			s := NewSCRAMSHA256Plus(lookupOf(map[string]SCRAMKeys{scramUser: keys}, nil), serverCB)
			creds, clientErr, err := runGSASL(t, bin, args, tc.clientCB, s, func(b []byte) []byte { return b })
			if !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Fatalf("server: %v, want %v", err, tc.err)
			}
			if tc.err == nil && (clientErr != nil || creds != (Credentials{Username: scramUser, Identity: tc.authzid})) {
				t.Errorf("gsasl: %v; credentials %+v", clientErr, creds)
			}
		})
	}
}

// TestDeriveSCRAMKeysGSASL checks DeriveSCRAMKeys against the keys
// `gsasl --mkpasswd` derives, as a passwd-file made with it holds them.
func TestDeriveSCRAMKeysGSASL(t *testing.T) {
	t.Parallel()
	bin := gsasl(t)
	for _, m := range scramMechs {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			out, err := exec.CommandContext(t.Context(), bin, "--mkpasswd", "--mechanism="+m.name,
				"--password=p@ss wörd", "--iteration-count=5000").Output()
			if err != nil {
				t.Fatal(err)
			}
			// {SCRAM-SHA-256}count,salt,stored-key,server-key
			fields := strings.Split(strings.TrimPrefix(strings.TrimSpace(string(out)), "{"+m.name+"}"), ",")
			if len(fields) != 4 || fields[0] != "5000" {
				t.Fatalf("gsasl printed %q", out)
			}
			k := mustKeys(t, m.hash, "p@ss wörd", mustDecode(t, fields[1]), 5000)
			if got := base64.StdEncoding.EncodeToString(k.StoredKey); got != fields[2] {
				t.Errorf("StoredKey %s, gsasl %s", got, fields[2])
			}
			if got := base64.StdEncoding.EncodeToString(k.ServerKey); got != fields[3] {
				t.Errorf("ServerKey %s, gsasl %s", got, fields[3])
			}
		})
	}
}
