package pop3

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestParkedSessionsMetricNilSafe(t *testing.T) {
	var m *pop3Metrics
	m.parked(1)
	m.parked(-1)
	reg := prometheus.NewRegistry()
	if err := newPOP3Metrics().register(reg); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(reg, "caddy_layer4_pop3_parked_sessions"); err != nil || n != 1 {
		t.Errorf("parked_sessions registered: %d series, %v", n, err)
	}
}

// TestParkedSessionsGauge: the gauge counts sessions while they are parked,
// not while a command wakes them, and every way a parked session ends
// (QUIT, client close, kick, proxy_timeout) takes it off again; afterwards
// the process is back at its descriptors, goroutines and parker entries.
func TestParkedSessionsGauge(t *testing.T) {
	waitForNoSessions(t) // none of an earlier test is parked or about to be
	withParkAfter(t, 50*time.Millisecond)
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.ProxyTimeout = caddy.Duration(3 * time.Second) })
	parked := func() float64 { return testutil.ToFloat64(h.proc.metrics.parkedSessions) }
	waitGauge := func(want float64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for parked() != want {
			if time.Now().After(deadline) {
				t.Fatalf("parked_sessions %v, want %v", parked(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	base := takeProcessBaseline()
	gauge := parked()

	const n = 4
	var ts [n]*testSession
	for i := range ts {
		ts[i] = startSession(t, h, logs, true)
		ts[i].send("USER alice", "PASS secret-pw")
		ts[i].expect("+OK")
		ts[i].expect("+OK Logged in.")
	}
	for i := range ts {
		ts[i].waitParked()
	}
	waitGauge(gauge + n)
	if got := parker.Waiting(); got != base.waiting+2*n {
		t.Errorf("%d directions in the parker, want %d", got, base.waiting+2*n)
	}

	// A command wakes a session; it parks again once quiet.
	ts[0].send("STAT")
	ts[0].expect("+OK 1 ")
	waitGauge(gauge + n)

	ts[0].send("QUIT")
	ts[0].expect("+OK bye")
	ts[0].expectClosed()
	waitGauge(gauge + n - 1)

	_ = ts[1].conn.Close()
	waitGauge(gauge + n - 2)

	views := h.proc.sessions.matching(func(s *session) bool { return s.view().Remote == ts[2].conn.LocalAddr().String() })
	if len(views) != 1 {
		t.Fatalf("%d sessions for the third client", len(views))
	}
	views[0].kick("Session closed by the administrator")
	ts[2].expectClosed()
	waitGauge(gauge + n - 3)

	ts[3].expectClosed() // proxy_timeout while parked
	waitGauge(gauge)
	for i := range ts {
		_ = ts[i].conn.Close()
	}
	// Every session line written: the relays are done with parkAfter
	// before withParkAfter's cleanup sets it back (the observer's lock
	// orders the two for the race detector).
	deadline := time.Now().Add(5 * time.Second)
	for len(logs.FilterMessage("session").All()) < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := len(logs.FilterMessage("session").All()); got != n {
		t.Errorf("%d session lines, want %d", got, n)
	}
	expectBaseline(t, base, 2, 5*time.Second)
}
