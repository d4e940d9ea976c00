package pop3

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func TestStartTLSOnly(t *testing.T) {
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
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ts.send("STLS")
	ts.expect("-ERR STLS not available")
}

func TestImplicitTLSIsSecure(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOnly })
	client, server := tcpPair(t)
	defer client.Close()
	done := make(chan error, 1)
	go func() {
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
	ts.send("CAPA")
	ts.expect("+OK")
	caps := ts.multiline()
	if slices.Contains(caps, "STLS") || !slices.Contains(caps, "USER") {
		t.Errorf("CAPA over implicit TLS = %q", caps)
	}
	ts.send("USER alice", "PASS secret-pw", "QUIT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK bye")
	ts.closed()
}
