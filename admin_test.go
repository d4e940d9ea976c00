package pop3

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func adminRequest(t *testing.T, proc *processState, method, query string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(method, "/pop3/sessions"+query, nil)
	if err := (adminAPI{proc: proc}).handleSessions(rec, req); err != nil {
		if ae, ok := err.(caddy.APIError); ok {
			rec.Code = ae.HTTPStatus
			return rec
		}
		t.Fatal(err)
	}
	return rec
}

func TestAdminListsAndKicksSessions(t *testing.T) {
	t.Parallel()
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
	if err := json.NewDecoder(adminRequest(t, h.proc, http.MethodGet, "").Body).Decode(&views); err != nil {
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
	if rec := adminRequest(t, h.proc, http.MethodDelete, ""); rec.Code != http.StatusBadRequest {
		t.Errorf("DELETE without a filter: %d", rec.Code)
	}

	// Kick by user: the relaying session is closed.
	if body := adminRequest(t, h.proc, http.MethodDelete, "?user=alice").Body.String(); !strings.Contains(body, `"closed":1`) {
		t.Errorf("DELETE ?user=alice: %s", body)
	}
	after.closed()
	// Kick by id: the session before login gets a -ERR with the reason.
	var rest []sessionView
	_ = json.NewDecoder(adminRequest(t, h.proc, http.MethodGet, "").Body).Decode(&rest)
	if len(rest) != 1 {
		t.Fatalf("left: %+v", rest)
	}
	adminRequest(t, h.proc, http.MethodDelete, "?id="+rest[0].ID)
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

// TestAdminFiltersOutsideTheRegistryLock: the admin API's filter, which
// asks the kernel about each socket, must not hold up session starts and
// ends.
func TestAdminFiltersOutsideTheRegistryLock(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ran := false
	h.proc.sessions.matching(func(*session) bool {
		ran = true
		if !h.proc.sessions.mu.TryLock() {
			t.Error("the registry is locked while the filter runs")
			return false
		}
		h.proc.sessions.mu.Unlock()
		return false
	})
	if !ran {
		t.Fatal("no session to filter")
	}
	if got := len(h.proc.sessions.matching(func(s *session) bool { return s.h == h })); got != 1 {
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
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	for _, kickBy := range []string{"bob@example.com", "alice"} {
		ts := startSession(t, h, logs, true)
		ts.send("AUTH PLAIN " + b64("bob@example.com\x00alice\x00secret-pw"))
		ts.expect("+OK Logged in.")
		var views []sessionView
		if err := json.NewDecoder(adminRequest(t, h.proc, http.MethodGet, "").Body).Decode(&views); err != nil {
			t.Fatal(err)
		}
		if len(views) != 1 || views[0].User != "alice" || views[0].UpstreamUser != "bob@example.com" {
			t.Fatalf("sessions %+v, want user alice, upstream_user bob@example.com", views)
		}
		if body := adminRequest(t, h.proc, http.MethodDelete, "?user="+kickBy).Body.String(); !strings.Contains(body, `"closed":1`) {
			t.Errorf("DELETE ?user=%s: %s", kickBy, body)
		}
		ts.closed()
	}
	// Without an authzid there is no second name to show.
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	if body := adminRequest(t, h.proc, http.MethodGet, "").Body.String(); strings.Contains(body, "upstream_user") {
		t.Errorf("upstream_user shown for a session acting as its own user: %s", body)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
}
