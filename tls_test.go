package pop3

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestStartTLSOnly(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOnly })
	ts := startSession(t, h, logs, false)
	for _, cmd := range []string{"USER alice", "PASS secret-pw", "AUTH PLAIN " + b64("\x00alice\x00secret-pw"), "AUTH LOGIN"} {
		ts.send(cmd)
		ts.expect("-ERR [AUTH] Plaintext authentication disallowed")
	}
	if len(up.Lines()) != 0 {
		t.Fatalf("upstream contacted before TLS: %q", up.Lines())
	}
	ts.startTLS()
	ts.send("STLS")
	ts.expect("-ERR Already using TLS")
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("STAT", "QUIT")
	ts.expect("+OK 1 ")
	ts.expect("+OK bye")
	ts.closed()
	ts.assertNoSecret("secret-pw")
}

func TestStartTLSResetsState(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOn; h.MaxErrors = 3 })
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "FOO", "BAR")
	ts.expect("+OK")
	ts.expect("-ERR")
	ts.expect("-ERR")
	ts.startTLS()
	ts.send("PASS secret-pw") // the USER from before TLS is forgotten
	ts.expect("-ERR No user name")
	ts.send("FOO") // and so is the error count: 1 of 3
	ts.expect("-ERR Unknown command")
	ts.send("NOOP")
	ts.expect("+OK")
}

func TestStartTLSInjection(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOn })
	ts := startSession(t, h, logs, true)
	ts.send("STLS", "USER alice", "PASS secret-pw")
	if got := ts.readLine(); !strings.HasPrefix(got, "-ERR") {
		t.Fatalf("STLS with pipelined plaintext answered %q", got)
	}
	ts.closed()
	if len(up.Lines()) != 0 {
		t.Fatalf("injected commands reached the upstream: %q", up.Lines())
	}
}

func TestNoSTLSWhenOff(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ts.send("STLS")
	ts.expect("-ERR STLS not available")
}

// startBehindTLSHandler runs Handle behind a TLS handshake done as
// caddy-l4's tls handler does it (port 995 with tls, then pop3) and reads
// the greeting.
func startBehindTLSHandler(t *testing.T, h *Handler, logs *observer.ObservedLogs) *testSession {
	t.Helper()
	client, server := tcpPair(t)
	t.Cleanup(func() { _ = client.Close() })
	done := make(chan error, 1)
	go func() {
		defer server.Close()
		tc := tls.Server(server, &tls.Config{Certificates: []tls.Certificate{testCertificate(t)}})
		if err := tc.Handshake(); err != nil {
			done <- err
			return
		}
		cx := layer4.WrapConnection(tc, nil, zap.NewNop())
		st := tc.ConnectionState()
		cx.SetVar(layer4.TLSConnectionStatesVarName, []*tls.ConnectionState{&st})
		done <- h.Handle(cx, nil)
	}()
	tc := tls.Client(client, &tls.Config{InsecureSkipVerify: true})
	ts := &testSession{t: t, conn: tc, done: done, logs: logs, handle: h}
	ts.r = newBufioReader(tc)
	ts.expect("+OK POP3 ready")
	return ts
}

func TestRouteTLSIsSecure(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOnly })
	ts := startBehindTLSHandler(t, h, logs)
	ts.send("CAPA")
	ts.expect("+OK")
	caps := ts.multiline()
	if slices.Contains(caps, "STLS") || !slices.Contains(caps, "USER") {
		t.Errorf("CAPA over implicit TLS = %q", caps)
	}
	ts.loginAndQuit()
}

// serverRoots trusts the test handler's own certificate, so that clients
// verify it as they would a real one.
func serverRoots(t *testing.T, h *Handler) *x509.CertPool {
	t.Helper()
	cert, err := x509.ParseCertificate(h.tlsConfig.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

// startImplicitSession runs an implicit_tls session on a TCP pair: the
// client handshakes with cfg and reads the greeting, which also takes in
// the TLS 1.3 session tickets that follow the handshake.
func startImplicitSession(t *testing.T, h *Handler, logs *observer.ObservedLogs, cfg *tls.Config) (*testSession, tls.ConnectionState) {
	t.Helper()
	ts := handleOn(t, h, logs, true)
	tc := tls.Client(ts.conn, cfg)
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	ts.conn, ts.r = tc, newBufioReader(tc)
	ts.greeting = ts.expect("+OK POP3 ready")
	return ts, tc.ConnectionState()
}

func implicitCount(h *Handler, result string) float64 {
	return testutil.ToFloat64(h.proc.metrics.implicitHandshakes.WithLabelValues(result))
}

func TestImplicitTLSLoginAndResumption(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ImplicitTLS = true; h.StartTLS = StartTLSOnly })
	cfg := &tls.Config{
		RootCAs:            serverRoots(t, h),
		ServerName:         "localhost",
		MinVersion:         tls.VersionTLS13,
		ClientSessionCache: tls.NewLRUClientSessionCache(4),
	}
	okBefore, resumedBefore := implicitCount(h, "ok"), implicitCount(h, "resumed")

	ts, st := startImplicitSession(t, h, logs, cfg)
	if st.DidResume || len(st.VerifiedChains) == 0 {
		t.Errorf("first handshake: resumed %v, verified chains %d", st.DidResume, len(st.VerifiedChains))
	}
	ts.send("CAPA")
	ts.expect("+OK")
	caps := ts.multiline()
	if slices.Contains(caps, "STLS") || !slices.Contains(caps, "USER") || !slices.Contains(caps, "SASL PLAIN LOGIN") {
		t.Errorf("CAPA over implicit_tls = %q, want USER and SASL, no STLS", caps)
	}
	ts.send("STLS")
	ts.expect("-ERR Already using TLS")
	ts.send("USER alice", "PASS secret-pw", "STAT", "QUIT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK 1 ")
	ts.expect("+OK bye")
	ts.closed()
	if !slices.Contains(up.Lines(), "PASS secret-pw") && !slices.Contains(up.Lines(), "AUTH PLAIN "+b64("\x00alice\x00secret-pw")) {
		t.Errorf("upstream got %q", up.Lines())
	}

	// The same handler's one TLS config takes back the ticket it issued.
	ts, st = startImplicitSession(t, h, logs, cfg)
	if !st.DidResume {
		t.Error("second connection did not resume the TLS session")
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()

	if d := implicitCount(h, "ok") - okBefore; d != 1 {
		t.Errorf("implicit_tls_total{result=ok} +%v, want 1", d)
	}
	if d := implicitCount(h, "resumed") - resumedBefore; d != 1 {
		t.Errorf("implicit_tls_total{result=resumed} +%v, want 1", d)
	}
	for _, e := range logs.FilterMessage("session").All() {
		if e.ContextMap()["tls"] != true {
			t.Errorf("session log line without tls: %v", e.ContextMap())
		}
	}
	ts.assertNoSecret("secret-pw")
}

// handshakeFailed checks how a session that never completed its TLS
// handshake ended: nothing sent in plaintext, Handle nil, no ERROR log,
// result tls_handshake_failed.
func handshakeFailed(t *testing.T, ts *testSession, logs *observer.ObservedLogs, failedBefore float64) {
	t.Helper()
	_ = ts.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, _ := io.ReadAll(ts.conn)
	if strings.Contains(string(got), "OK") || strings.Contains(string(got), "ERR") {
		t.Errorf("client got plaintext POP3 %q", got)
	}
	ts.closed()
	if errs := logs.FilterLevelExact(zap.ErrorLevel).All(); len(errs) != 0 {
		t.Errorf("ERROR logged: %v", errs)
	}
	if s := logs.FilterMessage("session").All(); len(s) != 1 || s[0].ContextMap()["result"] != "tls_handshake_failed" {
		t.Errorf("session log lines %v, want one with result tls_handshake_failed", s)
	}
	if len(logs.FilterMessage("TLS handshake failed").All()) != 1 {
		t.Error("no debug line for the failed handshake")
	}
	if d := implicitCount(ts.handle, "failed") - failedBefore; d != 1 {
		t.Errorf("implicit_tls_total{result=failed} +%v, want 1", d)
	}
}

func TestImplicitTLSPlaintextClient(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ImplicitTLS = true })
	before := implicitCount(h, "failed")
	ts := handleOn(t, h, logs, true)
	ts.send("CAPA")
	handshakeFailed(t, ts, logs, before)
	if len(up.Lines()) != 0 {
		t.Errorf("upstream contacted: %q", up.Lines())
	}
}

func TestImplicitTLSTimeout(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.ImplicitTLS = true
		h.Timeout = caddy.Duration(300 * time.Millisecond)
	})
	before := implicitCount(h, "failed")
	start := time.Now()
	ts := handleOn(t, h, logs, true) // connects and never sends a ClientHello
	handshakeFailed(t, ts, logs, before)
	if took := time.Since(start); took < 300*time.Millisecond || took > 5*time.Second {
		t.Errorf("silent client closed after %v, want about the 300ms timeout", took)
	}
}

// TestImplicitTLSBehindTLSHandler: with caddy-l4's tls handler still in
// front, the connection is TLS already and the session must not wait for a
// second handshake.
func TestImplicitTLSBehindTLSHandler(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ImplicitTLS = true })
	for range 2 {
		ts := startBehindTLSHandler(t, h, logs)
		ts.loginAndQuit()
	}
	if w := logs.FilterLevelExact(zap.WarnLevel).FilterMessageSnippet("already TLS").All(); len(w) != 1 {
		t.Errorf("%d warnings about the double TLS, want 1 per handler", len(w))
	}
}
