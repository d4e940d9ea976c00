package pop3

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func adminRequest(t *testing.T, method, query string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(method, "/pop3/sessions"+query, nil)
	if err := handleSessions(rec, req); err != nil {
		if ae, ok := err.(caddy.APIError); ok {
			rec.Code = ae.HTTPStatus
			return rec
		}
		t.Fatal(err)
	}
	return rec
}

func TestAdminListsAndKicksSessions(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	before := startSession(t, h, logs, true) // not logged in
	after := startSession(t, h, logs, true)
	after.send("USER alice", "PASS secret-pw", "RETR 1")
	after.expect("+OK")
	after.expect("+OK Logged in.")
	after.expect("+OK")
	after.multiline()

	var views []sessionView
	if err := json.NewDecoder(adminRequest(t, http.MethodGet, "").Body).Decode(&views); err != nil {
		t.Fatal(err)
	}
	var alice *sessionView
	for i, v := range views {
		if v.User == "alice" {
			alice = &views[i]
		}
	}
	if len(views) != 2 || alice == nil || alice.State != "relay" || alice.Upstream != addr || alice.FromClient == 0 {
		t.Fatalf("sessions %+v", views)
	}
	if rec := adminRequest(t, http.MethodDelete, ""); rec.Code != http.StatusBadRequest {
		t.Errorf("DELETE without a filter: %d", rec.Code)
	}

	// Kick by user: the relaying session is closed.
	if body := adminRequest(t, http.MethodDelete, "?user=alice").Body.String(); !strings.Contains(body, `"closed":1`) {
		t.Errorf("DELETE ?user=alice: %s", body)
	}
	after.closed()
	// Kick by id: the session before login gets a -ERR with the reason.
	var rest []sessionView
	_ = json.NewDecoder(adminRequest(t, http.MethodGet, "").Body).Decode(&rest)
	if len(rest) != 1 {
		t.Fatalf("left: %+v", rest)
	}
	adminRequest(t, http.MethodDelete, "?id="+rest[0].ID)
	if got := before.expect("-ERR [SYS/TEMP] Session closed by the administrator"); !strings.HasSuffix(got, "(session "+rest[0].ID+")") {
		t.Errorf("kick reply %q", got)
	}
	before.closed()
	for _, e := range logs.FilterMessage("session").All() {
		if e.ContextMap()["result"] != "closed_by_admin" {
			t.Errorf("session result %v", e.ContextMap()["result"])
		}
	}
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

// TestAdminFiltersOutsideTheRegistryLock: the admin API's filter, which
// asks the kernel about each socket, must not hold up session starts and
// ends.
func TestAdminFiltersOutsideTheRegistryLock(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ran := false
	liveSessions.matching(func(*session) bool {
		ran = true
		if !liveSessions.mu.TryLock() {
			t.Error("the registry is locked while the filter runs")
			return false
		}
		liveSessions.mu.Unlock()
		return false
	})
	if !ran {
		t.Fatal("no session to filter")
	}
	if got := len(liveSessions.matching(func(s *session) bool { return s.h == h })); got != 1 {
		t.Errorf("%d sessions of the handler, want 1", got)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
}

// TestAdminShowsAndKicksUpstreamUser: a session that logged in as one user
// for another's mailbox (an authzid) shows both, and DELETE ?user= with
// either name closes it.
func TestAdminShowsAndKicksUpstreamUser(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	for _, kickBy := range []string{"bob@example.com", "alice"} {
		ts := startSession(t, h, logs, true)
		ts.send("AUTH PLAIN " + b64("bob@example.com\x00alice\x00secret-pw"))
		ts.expect("+OK Logged in.")
		var views []sessionView
		if err := json.NewDecoder(adminRequest(t, http.MethodGet, "").Body).Decode(&views); err != nil {
			t.Fatal(err)
		}
		if len(views) != 1 || views[0].User != "alice" || views[0].UpstreamUser != "bob@example.com" {
			t.Fatalf("sessions %+v, want user alice, upstream_user bob@example.com", views)
		}
		if body := adminRequest(t, http.MethodDelete, "?user="+kickBy).Body.String(); !strings.Contains(body, `"closed":1`) {
			t.Errorf("DELETE ?user=%s: %s", kickBy, body)
		}
		ts.closed()
	}
	// Without an authzid there is no second name to show.
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	if body := adminRequest(t, http.MethodGet, "").Body.String(); strings.Contains(body, "upstream_user") {
		t.Errorf("upstream_user shown for a session acting as its own user: %s", body)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
}
