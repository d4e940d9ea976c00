package pop3

import (
	"crypto/sha256"
	"crypto/tls"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

// withParkAfter shortens parkAfter for one test.
func withParkAfter(t *testing.T, d time.Duration) {
	old := parkAfter.get()
	parkAfter.set(d)
	t.Cleanup(func() { parkAfter.set(old) })
}

// relayGoroutines counts goroutines running a relay pump.
func relayGoroutines() int {
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	n := 0
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, "caddy-pop3.(*relay).pump") {
			n++
		}
	}
	return n
}

// waitParked waits for Handle to return and for no pump to run: the session
// is parked.
func (ts *testSession) waitParked() {
	ts.t.Helper()
	select {
	case err := <-ts.done:
		if err != nil {
			ts.t.Fatalf("Handle returned %v", err)
		}
	case <-time.After(5 * time.Second):
		ts.t.Fatal("the quiet relay did not detach from its handler")
	}
	deadline := time.Now().Add(5 * time.Second)
	for relayGoroutines() > 0 {
		if time.Now().After(deadline) {
			ts.t.Fatalf("%d relay goroutines still run", relayGoroutines())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// expectClosed checks that the client sees the connection end.
func (ts *testSession) expectClosed() {
	ts.t.Helper()
	_ = ts.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := ts.r.ReadString('\n'); err == nil || strings.Contains(err.Error(), "timeout") {
		ts.t.Fatalf("connection still open: %q %v", rest, err)
	}
}

func TestQuietRelayParksAndWakes(t *testing.T) {
	withParkAfter(t, 100*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw", "STAT")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK 1 ")
	ts.waitParked()

	// Either direction wakes: the command reaches the upstream and its reply
	// the client, several times over, with parking in between.
	for i := 0; i < 3; i++ {
		ts.send("STAT")
		ts.expect("+OK 1 ")
		time.Sleep(300 * time.Millisecond)
		if n := relayGoroutines(); n != 0 {
			t.Fatalf("round %d: %d relay goroutines after parking again", i, n)
		}
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.expectClosed()
	line := sessionLine(t, logs)
	// The first STAT was pipelined with the login and is relayed too.
	if line["result"] != "ok" || line["bytes_from_client"].(int64) != int64(4*len("STAT\r\n")+len("QUIT\r\n")) {
		t.Errorf("session line %v", line)
	}
}

// parkedSession logs a session in, lets it park and returns it.
func parkedSession(t *testing.T, mod func(*Handler)) (*testSession, *observer.ObservedLogs) {
	t.Helper()
	withParkAfter(t, 50*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, mod)
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.waitParked()
	return ts, logs
}

// TestParkedSessionReleasesItsConnection: once parked, a session holds its
// sockets and not the layer4 connection the handler got (its replacer,
// vars and buffers), which is most of what an idle session would cost.
func TestParkedSessionReleasesItsConnection(t *testing.T) {
	ts, _ := parkedSession(t, nil)
	for i := 0; i < 5 && ts.cx.Value() != nil; i++ {
		runtime.GC()
	}
	if ts.cx.Value() != nil {
		t.Error("a parked session keeps the layer4 connection alive")
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.expectClosed()
}

func TestParkedRelayIdleTimeout(t *testing.T) {
	start := time.Now()
	ts, logs := parkedSession(t, func(h *Handler) { h.ProxyTimeout = caddy.Duration(500 * time.Millisecond) })
	ts.expectClosed()
	if d := time.Since(start); d < 400*time.Millisecond || d > 2*time.Second {
		t.Errorf("parked session closed after %v, want about 500ms", d)
	}
	if line := sessionLine(t, logs); line["result"] != "idle_timeout" {
		t.Errorf("session line %v", line)
	}
}

func TestParkedRelayKick(t *testing.T) {
	ts, logs := parkedSession(t, nil)
	views := ts.handle.proc.sessions.matching(func(s *session) bool { return s.view().User == "alice" })
	if len(views) != 1 {
		t.Fatalf("%d parked sessions listed, want 1", len(views))
	}
	views[0].kick("Session closed by the administrator")
	ts.expectClosed()
	if line := sessionLine(t, logs); line["result"] != "closed_by_admin" {
		t.Errorf("session line %v", line)
	}
}

// TestClientHalfCloseWhileParked: the client's EOF wakes its direction,
// which half-closes the upstream; the upstream's answer still arrives.
func TestClientHalfCloseWhileParked(t *testing.T) {
	ts, logs := parkedSession(t, nil)
	ts.send("QUIT")
	if err := closeWriteConn(ts.conn); err != nil {
		t.Fatal(err)
	}
	ts.expect("+OK bye")
	ts.expectClosed()
	if line := sessionLine(t, logs); line["result"] != "ok" {
		t.Errorf("session line %v", line)
	}
}

// TestTLSRelayParks: a relay under TLS the handler terminated (STLS here)
// parks too; after it, a large message still arrives byte for byte.
func TestTLSRelayParks(t *testing.T) {
	withParkAfter(t, 50*time.Millisecond)
	msg := bigMessage(1 << 20)
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.StartTLS = StartTLSOnly })
	ts := startSession(t, h, logs, true)
	ts.startTLS()
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.waitParked()
	for i := 0; i < 2; i++ {
		ts.send("RETR 1")
		ts.expect("+OK")
		got := make([]byte, len(msg)+3)
		_ = ts.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(ts.r, got); err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256([]byte(msg+".\r\n")) {
			t.Fatal("message relayed after parking differs")
		}
		time.Sleep(200 * time.Millisecond)
		if n := relayGoroutines(); n != 0 {
			t.Fatalf("round %d: %d relay goroutines after parking again", i, n)
		}
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.expectClosed()
	if line := sessionLine(t, logs); line["result"] != "ok" || line["tls"] != true {
		t.Errorf("session line %v", line)
	}
}

func TestImplicitTLSRelayParks(t *testing.T) {
	withParkAfter(t, 50*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ImplicitTLS = true })
	ts, _ := startImplicitSession(t, h, logs, &tls.Config{RootCAs: serverRoots(t, h), ServerName: "localhost"})
	ts.loginParkWakeQuit()
}

// TestRouteTLSRelayKeepsGoroutines: under caddy-l4's tls handler the
// socket cannot be swapped, so the relay must not park.
func TestRouteTLSRelayKeepsGoroutines(t *testing.T) {
	withParkAfter(t, 50*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startBehindTLSHandler(t, h, logs)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-ts.done:
		t.Fatalf("Handle returned (%v) under the route's TLS", err)
	default:
	}
	ts.send("STAT")
	ts.expect("+OK 1 ")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
}

// TestUpstreamTLSRelayParks: TLS to the upstream does not keep the relay
// from parking; its direction waits on the socket under the TLS.
func TestUpstreamTLSRelayParks(t *testing.T) {
	withParkAfter(t, 50*time.Millisecond)
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) {
		u.TLS = &tls.Config{Certificates: []tls.Certificate{testCertificate(t)}}
	})
	h, logs := newTestHandler(t, "", func(h *Handler) {
		h.Upstream = []*Upstream{{Address: addr, TLS: &reverseproxy.TLSConfig{InsecureSkipVerify: true}}}
	})
	startSession(t, h, logs, true).loginParkWakeQuit()
}

// loginParkWakeQuit logs in, waits for the relay to park, wakes it with
// STAT, quits and checks the session line.
func (ts *testSession) loginParkWakeQuit() {
	ts.t.Helper()
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.waitParked()
	ts.send("STAT")
	ts.expect("+OK 1 ")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.expectClosed()
	if line := sessionLine(ts.t, ts.logs); line["result"] != "ok" {
		ts.t.Errorf("session line %v", line)
	}
}

// TestParkingUnderChurn: many sessions park and wake at random moments,
// with commands arriving while their relays park; every reply must come,
// in order, and every session must end with its session line.
func TestParkingUnderChurn(t *testing.T) {
	withParkAfter(t, 20*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	const sessions = 30
	var wg sync.WaitGroup
	for i := 0; i < sessions; i++ {
		ts := startSession(t, h, logs, true)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ts.send("USER alice", "PASS secret-pw")
			ts.expect("+OK")
			ts.expect("+OK Logged in.")
			for j := 0; j < 15; j++ {
				// 0-40 ms apart: around parkAfter, so commands meet relays
				// that are parking, parked and waking.
				time.Sleep(time.Duration((i*7+j*13)%41) * time.Millisecond)
				ts.send("NOOP", "STAT")
				ts.expect("+OK")
				ts.expect("+OK 1 ")
			}
			ts.send("QUIT")
			ts.expect("+OK bye")
			ts.expectClosed()
		}(i)
	}
	wg.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for len(logs.FilterMessage("session").All()) < sessions && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	lines := logs.FilterMessage("session").All()
	if len(lines) != sessions {
		t.Fatalf("%d session lines, want %d", len(lines), sessions)
	}
	for _, l := range lines {
		if l.ContextMap()["result"] != "ok" {
			t.Errorf("session line %v", l.ContextMap())
		}
	}
	if parked := len(logs.FilterMessage("relay parked").All()); parked < sessions/2 {
		t.Errorf("%d of %d sessions parked, want most", parked, sessions)
	}
}

// TestParkedRelaySlowClient: a relay that parks while its client drains
// the socket's send queue slowly is still active: the kernel's counts move.
func TestParkedRelaySlowClient(t *testing.T) {
	withParkAfter(t, 50*time.Millisecond)
	msg := bigMessage(256 << 10)
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{msg} })
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ProxyTimeout = caddy.Duration(300 * time.Millisecond) })
	ts := startSlowSession(t, h, logs)
	ts.send("USER alice", "PASS secret-pw", "RETR 1")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK")
	got, err := readSlowly(ts.conn, ts.r, len(msg)+3, 192<<10)
	if err != nil {
		t.Fatalf("after %d of %d bytes: %v", len(got), len(msg)+3, err)
	}
	if string(got) != msg+".\r\n" {
		t.Fatal("relayed message differs")
	}
	if len(logs.FilterMessage("relay parked").All()) == 0 {
		t.Error("the relay did not park while the client read")
	}
	ts.send("QUIT")
	ts.expect("+OK bye")
	if line := sessionLine(t, logs); line["result"] != "ok" {
		t.Errorf("session line %v", line)
	}
}
