package pop3

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

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
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	reg := prometheus.NewPedanticRegistry()
	if err := metrics.register(reg); err != nil {
		t.Fatal(err)
	}
	if err := metrics.register(reg); err != nil { // a second handler of the same config
		t.Fatal(err)
	}
	okBefore := testutil.ToFloat64(metrics.logins.WithLabelValues("plain", "ok"))
	failedBefore := testutil.ToFloat64(metrics.logins.WithLabelValues("plain", "failed"))
	quitBefore := testutil.ToFloat64(metrics.sessions.WithLabelValues("ok"))
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS bad")
	ts.expect("+OK")
	ts.expect("-ERR")
	ts.loginAndQuit()
	if d := testutil.ToFloat64(metrics.logins.WithLabelValues("plain", "ok")) - okBefore; d != 1 {
		t.Errorf("logins ok +%v", d)
	}
	if d := testutil.ToFloat64(metrics.logins.WithLabelValues("plain", "failed")) - failedBefore; d != 1 {
		t.Errorf("logins failed +%v", d)
	}
	if d := testutil.ToFloat64(metrics.sessions.WithLabelValues("ok")) - quitBefore; d != 1 {
		t.Errorf("sessions ok +%v", d)
	}
	if n, err := testutil.GatherAndCount(reg, "caddy_layer4_pop3_login_duration_seconds"); err != nil || n == 0 {
		t.Errorf("login histogram: %d series, %v", n, err)
	}
}

func TestMetricsNilSafe(t *testing.T) {
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
