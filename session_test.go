package pop3

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"fmt"
	"math/big"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"
	"weak"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// testSession is a client talking to Handle over a pipe or a TCP pair.
type testSession struct {
	t        *testing.T
	conn     net.Conn
	r        *bufio.Reader
	done     chan error
	logs     *observer.ObservedLogs
	handle   *Handler
	greeting string
	cx       weak.Pointer[layer4.Connection] // what Handle got, to see it collected
}

func newTestHandler(t *testing.T, upstream string, mod func(*Handler)) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	h := &Handler{
		Upstream:         []*Upstream{{Address: upstream}},
		StartTLS:         StartTLSOff,
		Timeout:          caddy.Duration(5 * time.Second),
		AuthFailureDelay: caddy.Duration(time.Millisecond),
		proc:             newTestProcess(),
	}
	if mod != nil {
		mod(h)
	}
	core, logs := observer.New(zap.DebugLevel)
	h.logger = zap.New(core)
	if err := h.setup(); err != nil {
		t.Fatalf("setup: %v", err)
	}
	t.Cleanup(h.pool.release) // a recycled port must not inherit this test's upstream state
	if h.tlsOn {
		h.tlsConfig = &tls.Config{Certificates: []tls.Certificate{testCertificate(t)}}
	}
	return h, logs
}

// startSession runs Handle on one end of a pipe (or TCP pair with tcp) and
// reads the greeting.
func startSession(t *testing.T, h *Handler, logs *observer.ObservedLogs, tcp bool) *testSession {
	t.Helper()
	ts := startSessionRaw(t, h, logs, tcp)
	if !strings.HasPrefix(ts.greeting, "+OK POP3 ready") {
		t.Fatalf("greeting %q", ts.greeting)
	}
	return ts
}

// startSessionGreeting starts a TCP session and keeps whatever greeting came.
func startSessionGreeting(t *testing.T, h *Handler, logs *observer.ObservedLogs) *testSession {
	t.Helper()
	return startSessionRaw(t, h, logs, true)
}

func startSessionRaw(t *testing.T, h *Handler, logs *observer.ObservedLogs, tcp bool) *testSession {
	t.Helper()
	ts := handleOn(t, h, logs, tcp)
	ts.greeting = ts.readLine()
	return ts
}

// handleOn runs Handle on one end of a pipe (or TCP pair with tcp) and
// returns the client end, nothing read yet.
func handleOn(t *testing.T, h *Handler, logs *observer.ObservedLogs, tcp bool) *testSession {
	t.Helper()
	var client, server net.Conn
	if tcp {
		client, server = tcpPair(t)
	} else {
		client, server = net.Pipe()
	}
	ts := &testSession{t: t, conn: client, r: bufio.NewReader(client), done: make(chan error, 1), logs: logs, handle: h}
	cx := layer4.WrapConnection(server, nil, zap.NewNop())
	ts.cx = weak.Make(cx)
	go func() {
		err := h.Handle(cx, nil)
		_ = server.Close()
		ts.done <- err
	}()
	t.Cleanup(func() { _ = client.Close() })
	return ts
}

func newBufioReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

func tcpPair(t *testing.T) (net.Conn, net.Conn) { return tcpPairFrom(t, "") }

// tcpPairFrom is tcpPair with the client bound to the loopback address
// from (all of 127.0.0.0/8 reaches lo); "" lets the kernel choose.
func tcpPairFrom(t *testing.T, from string) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	var d net.Dialer
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	client, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return client, <-accepted
}

func (ts *testSession) send(lines ...string) {
	ts.t.Helper()
	_ = ts.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := ts.conn.Write([]byte(strings.Join(lines, "\r\n") + "\r\n")); err != nil {
		ts.t.Fatalf("send %q: %v", lines[0], err)
	}
}

func (ts *testSession) readLine() string {
	ts.t.Helper()
	_ = ts.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := ts.r.ReadString('\n')
	if err != nil {
		ts.t.Fatalf("reading reply: %v (got %q)", err, line)
	}
	if !strings.HasSuffix(line, "\r\n") {
		ts.t.Fatalf("reply %q does not end in CRLF", line)
	}
	return strings.TrimSuffix(line, "\r\n")
}

// expect reads one line and checks its prefix.
func (ts *testSession) expect(prefix string) string {
	ts.t.Helper()
	line := ts.readLine()
	if !strings.HasPrefix(line, prefix) {
		ts.t.Fatalf("got %q, want prefix %q", line, prefix)
	}
	return line
}

// multiline reads a dot-terminated list after its status line.
func (ts *testSession) multiline() []string {
	ts.t.Helper()
	var out []string
	for {
		l := ts.readLine()
		if l == "." {
			return out
		}
		out = append(out, l)
	}
}

// closed waits for Handle to return nil and the connection to close.
func (ts *testSession) closed() {
	ts.t.Helper()
	select {
	case err := <-ts.done:
		if err != nil {
			ts.t.Fatalf("Handle returned %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		ts.t.Fatal("session did not end")
	}
	// The client must see the close, not a timeout: a parked relay lives on
	// after Handle returns.
	_ = ts.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	rest, err := ts.r.ReadString('\n')
	var ne net.Error
	switch {
	case err == nil:
		ts.t.Fatalf("unexpected line after close: %q", rest)
	case errors.As(err, &ne) && ne.Timeout():
		ts.t.Fatal("Handle returned but the connection is still open")
	}
}

// loginAndQuit logs in as alice with USER/PASS, quits and waits for the end.
func (ts *testSession) loginAndQuit() {
	ts.t.Helper()
	ts.send("USER alice", "PASS secret-pw", "QUIT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK bye")
	ts.closed()
}

// startTLS runs STLS and the client handshake.
func (ts *testSession) startTLS() {
	ts.t.Helper()
	ts.send("STLS")
	ts.expect("+OK")
	tc := tls.Client(ts.conn, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		ts.t.Fatalf("TLS handshake: %v", err)
	}
	ts.conn, ts.r = tc, bufio.NewReader(tc)
}

// assertNoSecret fails if any log entry, message or field, holds a secret.
func (ts *testSession) assertNoSecret(secrets ...string) {
	ts.t.Helper()
	entries := ts.logs.All()
	if len(entries) == 0 {
		ts.t.Fatal("no log entries to check")
	}
	for _, e := range entries {
		text := e.Message + fmt.Sprint(e.ContextMap())
		for _, s := range secrets {
			if strings.Contains(text, s) {
				ts.t.Errorf("log entry holds a secret: %q", text)
			}
		}
	}
}

var sessionIDSuffix = regexp.MustCompile(` \(session [0-9a-f]{12}\)$`)

// withoutSessionID checks that a reply ends with the session id an operator
// can look up in the log, and returns it without.
func withoutSessionID(t *testing.T, line string) string {
	t.Helper()
	if !sessionIDSuffix.MatchString(line) {
		t.Errorf("reply %q does not end with a session id", line)
	}
	return sessionIDSuffix.ReplaceAllString(line, "")
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func b64decode(s string) (string, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	return string(b), err
}

// testCA returns a CA certificate and key for client certificates.
func testCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(100),
		Subject:               pkix.Name{CommonName: "test client CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return ca, key
}

// testClientCert returns a client certificate for cn signed by ca.
func testClientCert(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(101),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func testCertificate(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func fakeUpstream(t *testing.T, mod func(*pop3test.Upstream)) (*pop3test.Upstream, string) {
	t.Helper()
	u := &pop3test.Upstream{
		Users:    map[string]string{"alice": "secret-pw", "bob@example.com": "p@ss wörd:%"},
		SASL:     []string{"PLAIN"},
		Messages: []string{"Subject: hi\r\n\r\nhello\r\n"},
	}
	if mod != nil {
		mod(u)
	}
	return u, u.Start(t)
}

func TestDrainAfterReload(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.DrainTimeout = caddy.Duration(100 * time.Millisecond) })
	other, _ := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	untouched := startSession(t, other, logs, false)
	start := time.Now()
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	ts.expect("-ERR [SYS/TEMP] Server configuration changed")
	ts.closed()
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("drained after %v", d)
	}
	untouched.send("NOOP")
	untouched.expect("+OK")
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	reg := prometheus.NewPedanticRegistry()
	if err := h.proc.metrics.register(reg); err != nil {
		t.Fatal(err)
	}
	if err := h.proc.metrics.register(reg); err != nil { // a second handler of the same config
		t.Fatal(err)
	}
	okBefore := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "ok"))
	failedBefore := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed"))
	quitBefore := testutil.ToFloat64(h.proc.metrics.sessions.WithLabelValues("ok"))
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS bad")
	ts.expect("+OK")
	ts.expect("-ERR")
	ts.loginAndQuit()
	if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "ok")) - okBefore; d != 1 {
		t.Errorf("logins ok +%v", d)
	}
	if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", "failed")) - failedBefore; d != 1 {
		t.Errorf("logins failed +%v", d)
	}
	if d := testutil.ToFloat64(h.proc.metrics.sessions.WithLabelValues("ok")) - quitBefore; d != 1 {
		t.Errorf("sessions ok +%v", d)
	}
	if n, err := testutil.GatherAndCount(reg, "caddy_layer4_pop3_login_duration_seconds"); err != nil || n == 0 {
		t.Errorf("login histogram: %d series, %v", n, err)
	}
}

func TestMetricsNilSafe(t *testing.T) {
	t.Parallel()
	var m *pop3Metrics
	m.sessionStarted()
	m.sessionEnded("ok", 1, 2)
	m.sessionRefused("too_many_sessions")
	m.login("plain", "ok", 0.1)
	m.dialError("x")
	m.health("x", true)
	m.startTLS("ok")
	m.implicitTLS("ok")
	if err := m.register(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
}
