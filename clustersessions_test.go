package pop3

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/redistest"
)

// Short registry timing for the tests: changes reach Redis within
// testSessionSync, and an instance that stops writing leaves the list
// testSessionTTL after its last write.
const (
	testSessionSync = 50 * time.Millisecond
	testSessionTTL  = 2 * time.Second
)

// clusterApp is a started pop3 app of an instance on the Redis at addr,
// with its own process state unless proc is given (a reload's new app).
func clusterApp(t *testing.T, addr, instance string, proc *processState) *App {
	t.Helper()
	a := sharedApp(t, addr, instance, "")
	if proc != nil {
		a.proc = proc
	}
	a.sessionSync, a.sessionTTL = testSessionSync, testSessionTTL
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Stop() })
	return a
}

// instances starts a private Redis and a started app for each name.
func instances(t *testing.T, names ...string) (*redistest.Server, []*App) {
	t.Helper()
	srv := redistest.Run(t)
	apps := make([]*App, len(names))
	for i, name := range names {
		apps[i] = clusterApp(t, srv.Addr, name, nil)
	}
	return srv, apps
}

// waitSubscribers waits until n connections subscribe to app's kicks:
// Redis sees a subscription end when it reads the closed connection.
func waitSubscribers(t *testing.T, app *App, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		subs, err := app.client.PubSubNumSub(t.Context(), app.kickChannel()).Result()
		if err == nil && subs[app.kickChannel()] == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("subscribers to kicks: %v %v, want %d", subs, err, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// localApp is a started pop3 app without redis on proc.
func localApp(t *testing.T, instance string, proc *processState) *App {
	t.Helper()
	a := &App{Instance: instance, proc: proc}
	if err := a.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Stop() })
	return a
}

// sessionsRequest is a request to proc's admin API with the error, if
// any, as Caddy's admin endpoint would answer it.
func sessionsRequest(t *testing.T, proc *processState, method, query string) (*httptest.ResponseRecorder, error) {
	t.Helper()
	rec := httptest.NewRecorder()
	err := (adminAPI{proc: proc}).handleSessions(rec, httptest.NewRequest(method, "/pop3/sessions"+query, nil))
	if err != nil {
		ae, ok := err.(caddy.APIError)
		if !ok {
			t.Fatal(err)
		}
		rec.Code = ae.HTTPStatus
	}
	return rec, err
}

// clusterList is GET /pop3/sessions?cluster=1 plus query on proc.
func clusterList(t *testing.T, proc *processState, query string) []clusterSession {
	t.Helper()
	rec, err := sessionsRequest(t, proc, http.MethodGet, "?cluster=1"+query)
	if err != nil {
		t.Fatalf("GET ?cluster=1%s: %v", query, err)
	}
	var list []clusterSession
	if err := json.NewDecoder(rec.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	return list
}

// waitList polls the cluster list until done accepts it.
func waitList(t *testing.T, proc *processState, query string, done func([]clusterSession) bool) []clusterSession {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		list := clusterList(t, proc, query)
		if done(list) {
			return list
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster list%s: %+v", query, list)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// loggedInFrom is a session from the loopback address from that logged in
// as alice.
func loggedInFrom(t *testing.T, h *Handler, from string) *testSession {
	t.Helper()
	ts := sessionFrom(t, h, from)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	return ts
}

func byInstance(list []clusterSession) map[string][]clusterSession {
	m := map[string][]clusterSession{}
	for _, c := range list {
		m[c.Instance] = append(m[c.Instance], c)
	}
	return m
}

// Three instances: any one lists the sessions of all, each with its
// instance, with the admin API's filters; without cluster=1 it lists its
// own; Redis never holds a password.
func TestClusterSessionsListed(t *testing.T) {
	t.Parallel()
	_, apps := instances(t, "a", "b", "c")
	a, b, c := apps[0], apps[1], apps[2]
	sessionFrom(t, instanceHandler(t, a, nil), "127.0.0.1")
	loggedInFrom(t, instanceHandler(t, b, nil), "127.0.0.2")
	sessionFrom(t, instanceHandler(t, c, nil), "127.0.0.3")

	start := time.Now()
	var list []clusterSession
	for _, app := range []*App{a, b, c} { // each sees the two others' through Redis
		list = waitList(t, app.proc, "", func(l []clusterSession) bool {
			m := byInstance(l)
			return len(l) == 3 && len(m["a"]) == 1 && len(m["b"]) == 1 && m["b"][0].State == "relay" && len(m["c"]) == 1
		})
	}
	t.Logf("sessions of three instances listed by each after %v", time.Since(start))
	m := byInstance(list)
	if alice := m["b"][0]; alice.User != "alice" || alice.Upstream == "" || !strings.HasPrefix(alice.Remote, "127.0.0.2:") || alice.TLS {
		t.Errorf("b's session %+v", alice)
	}
	if pre := m["a"][0]; pre.User != "" || pre.State != "authorization" || !strings.HasPrefix(pre.Remote, "127.0.0.1:") || pre.Start.IsZero() {
		t.Errorf("a's session %+v", pre)
	}

	for query, want := range map[string]string{
		"&user=alice":                    "b",
		"&remote=127.0.0.3":              "c",
		"&id=" + m["a"][0].ID:            "a",
		"&remote=" + m["b"][0].Remote:    "b",
		"&user=alice&remote=127.0.0.1":   "",
		"&id=" + m["c"][0].ID + "&user=": "c",
	} {
		got := clusterList(t, a.proc, query)
		if want == "" && len(got) != 0 || want != "" && (len(got) != 1 || got[0].Instance != want) {
			t.Errorf("?cluster=1%s: %+v, want instance %q", query, got, want)
		}
	}
	// Without cluster=1, or with cluster=0, an instance lists its own.
	for _, q := range []string{"", "?cluster=0"} {
		rec, _ := sessionsRequest(t, a.proc, http.MethodGet, q)
		var views []sessionView
		if err := json.NewDecoder(rec.Body).Decode(&views); err != nil || len(views) != 1 || views[0].ID != onlySessionID(t, a.proc) {
			t.Errorf("GET %q: %+v %v", q, views, err)
		}
	}
	if rec, _ := sessionsRequest(t, a.proc, http.MethodGet, "?cluster=maybe"); rec.Code != http.StatusBadRequest {
		t.Errorf("?cluster=maybe: %d", rec.Code)
	}
	// What Redis holds: user names, never the password.
	for _, name := range []string{"a", "b", "c"} {
		for id, v := range a.client.HGetAll(t.Context(), a.sessionsKey(name)).Val() {
			if strings.Contains(v, "secret-pw") || !strings.Contains(v, `"id":"`+id+`"`) {
				t.Errorf("registry entry of %s: %s", name, v)
			}
		}
	}
}

// onlySessionID is the id of the one session of proc.
func onlySessionID(t *testing.T, proc *processState) string {
	t.Helper()
	all := proc.sessions.matching(func(*session) bool { return true })
	if len(all) != 1 {
		t.Fatalf("%d sessions in the process", len(all))
	}
	return all[0].id
}

// DELETE ?cluster=1 on one instance closes sessions that live on others:
// before login the client reads the kick's -ERR, after login its
// connection closes; the answer counts this instance's and the others'.
func TestClusterSessionsKick(t *testing.T) {
	t.Parallel()
	_, apps := instances(t, "a", "b", "c")
	a, b, c := apps[0], apps[1], apps[2]
	pre := sessionFrom(t, instanceHandler(t, c, nil), "127.0.0.5")
	hb := instanceHandler(t, b, nil)
	remoteAlice := loggedInFrom(t, hb, "127.0.0.6")
	localAlice := loggedInFrom(t, instanceHandler(t, a, nil), "127.0.0.7")
	list := waitList(t, a.proc, "", func(l []clusterSession) bool {
		m := byInstance(l)
		return len(m["a"]) == 1 && len(m["b"]) == 1 && m["b"][0].User == "alice" && len(m["c"]) == 1
	})
	preID := byInstance(list)["c"][0].ID

	start := time.Now()
	rec, err := sessionsRequest(t, a.proc, http.MethodDelete, "?cluster=1&id="+preID)
	if err != nil || !strings.Contains(rec.Body.String(), `"closed":1`) {
		t.Fatalf("DELETE ?cluster=1&id=: %s %v", rec.Body, err)
	}
	if got := pre.expect("-ERR [SYS/TEMP] Session closed by the administrator"); !strings.HasSuffix(got, "(session "+preID+")") {
		t.Errorf("kick reply %q", got)
	}
	pre.closed()
	t.Logf("a session on another instance closed %v after the DELETE", time.Since(start))

	rec, err = sessionsRequest(t, a.proc, http.MethodDelete, "?cluster=1&user=alice")
	if err != nil || !strings.Contains(rec.Body.String(), `"closed":2`) {
		t.Fatalf("DELETE ?cluster=1&user=alice: %s %v", rec.Body, err)
	}
	remoteAlice.closed()
	localAlice.closed()
	waitList(t, a.proc, "", func(l []clusterSession) bool { return len(l) == 0 })
	logs, _ := limitedLogs.Load(hb)
	for _, e := range logs.(*observer.ObservedLogs).FilterMessage("session").All() {
		if e.ContextMap()["result"] != "closed_by_admin" {
			t.Errorf("b's session result %v", e.ContextMap()["result"])
		}
	}
	if rec, _ := sessionsRequest(t, a.proc, http.MethodDelete, "?cluster=1"); rec.Code != http.StatusBadRequest {
		t.Errorf("DELETE ?cluster=1 without a filter: %d", rec.Code)
	}
}

// An instance that stopped writing (it died) leaves the list within the
// TTL; one that stops properly takes its sessions out at once.
func TestClusterSessionsInstanceGone(t *testing.T) {
	t.Parallel()
	_, apps := instances(t, "a", "dead", "gone")
	a, dead, gone := apps[0], apps[1], apps[2]
	sessionFrom(t, instanceHandler(t, dead, nil), "127.0.0.1")
	sessionFrom(t, instanceHandler(t, gone, nil), "127.0.0.2")
	waitList(t, a.proc, "", func(l []clusterSession) bool { return len(l) == 2 })

	// Dead: its loops end, with no goodbye.
	dead.stop()
	dead.stop = nil
	dead.wg.Wait()
	_ = dead.pubsub.Close()
	died := time.Now()
	if l := clusterList(t, a.proc, "&remote=127.0.0.1"); len(l) != 1 {
		t.Fatalf("a dead instance's session vanished at once: %+v", l)
	}
	waitList(t, a.proc, "&remote=127.0.0.1", func(l []clusterSession) bool { return len(l) == 0 })
	if d := time.Since(died); d > testSessionTTL+time.Second {
		t.Errorf("a dead instance's session was listed for %v, TTL %v", d, testSessionTTL)
	} else {
		t.Logf("a dead instance's session left the list %v after its death (TTL %v)", d, testSessionTTL)
	}
	if l := clusterList(t, dead.proc, "&remote=127.0.0.1"); len(l) != 1 || l[0].Instance != "dead" {
		t.Errorf("the dead instance's list: %+v", l) // it still has its session
	}

	// Gone: Stop without a successor removes its sessions from Redis.
	if err := gone.Stop(); err != nil {
		t.Fatal(err)
	}
	if l := clusterList(t, a.proc, ""); len(l) != 0 {
		t.Errorf("a stopped instance's session still listed: %+v", l)
	}
}

// A reload: the new app subscribes before the old one unsubscribes, the
// old one leaves the registry to it, and kicks from other instances still
// arrive, through one subscription.
func TestClusterSessionsReload(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	other := clusterApp(t, srv.Addr, "other", nil)
	old := clusterApp(t, srv.Addr, "a", nil)
	ts := sessionFrom(t, instanceHandler(t, old, nil), "127.0.0.1")
	list := waitList(t, other.proc, "", func(l []clusterSession) bool { return len(l) == 1 })

	renewed := clusterApp(t, srv.Addr, "a", old.proc)
	if err := old.Stop(); err != nil {
		t.Fatal(err)
	}
	if l := clusterList(t, other.proc, ""); len(l) != 1 {
		t.Fatalf("after the reload: %+v", l)
	}
	waitSubscribers(t, other, 2) // other and the new app
	// The session's changes still reach Redis, written by the new app.
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	waitList(t, other.proc, "&user=alice", func(l []clusterSession) bool { return len(l) == 1 && l[0].State == "relay" })
	rec, err := sessionsRequest(t, other.proc, http.MethodDelete, "?cluster=1&id="+list[0].ID)
	if err != nil || !strings.Contains(rec.Body.String(), `"closed":1`) {
		t.Fatalf("DELETE: %s %v", rec.Body, err)
	}
	ts.closed()

	// A reload to a config without redis: the old app takes its entry out
	// of Redis, and the process stops noting changes for it.
	localApp(t, "a", old.proc)
	keep := sessionFrom(t, instanceHandler(t, renewed, nil), "127.0.0.1")
	waitList(t, other.proc, "", func(l []clusterSession) bool { return len(l) == 1 })
	if err := renewed.Stop(); err != nil {
		t.Fatal(err)
	}
	if n := other.client.Exists(t.Context(), other.sessionsKey("a")).Val(); n != 0 {
		t.Error("the registry entry outlived a reload without redis")
	}
	old.proc.sessions.mu.Lock()
	tracking := old.proc.sessions.dirty != nil
	old.proc.sessions.mu.Unlock()
	if tracking {
		t.Error("session changes still noted with nobody to write them")
	}
	keep.send("QUIT")
	keep.expect("+OK")
	keep.closed()
}

// An instance whose app starts while Redis is down subscribes and
// registers once Redis is back: its sessions are listed and kicked from
// another instance.
func TestClusterSessionsStartWithRedisDown(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	late := clusterApp(t, srv.Addr, "late", nil)
	if d := time.Since(start); d > time.Duration(late.Redis.Timeout)+300*time.Millisecond {
		t.Errorf("Start with Redis down took %v", d)
	}
	ts := sessionFrom(t, instanceHandler(t, late, nil), "127.0.0.1")
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	a := clusterApp(t, srv.Addr, "a", nil)
	l := waitList(t, a.proc, "", func(l []clusterSession) bool { return len(l) == 1 && l[0].Instance == "late" })
	waitSubscribers(t, a, 2)
	t.Logf("resubscribed %v after Start", time.Since(start))
	if rec, err := sessionsRequest(t, a.proc, http.MethodDelete, "?cluster=1&id="+l[0].ID); err != nil || !strings.Contains(rec.Body.String(), `"closed":1`) {
		t.Fatalf("DELETE: %s %v", rec.Body, err)
	}
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.closed()
}

// With Redis down or hung, ?cluster=1 answers 503 within the Redis timeout
// and closes nothing, while the instance's own list works; once Redis is
// back (empty, after a restart), the instances write their sessions again.
func TestClusterSessionsRedisDown(t *testing.T) {
	t.Parallel()
	srv, apps := instances(t, "a", "b")
	a, b := apps[0], apps[1]
	local := sessionFrom(t, instanceHandler(t, a, nil), "127.0.0.1")
	sessionFrom(t, instanceHandler(t, b, nil), "127.0.0.2")
	waitList(t, a.proc, "", func(l []clusterSession) bool { return len(l) == 2 })
	timeout := time.Duration(a.Redis.Timeout)

	down := func(how string) {
		t.Helper()
		for _, method := range []string{http.MethodGet, http.MethodDelete} {
			start := time.Now()
			rec, err := sessionsRequest(t, a.proc, method, "?cluster=1&remote=127.0.0.1")
			took := time.Since(start)
			if rec.Code != http.StatusServiceUnavailable || err == nil || !strings.Contains(err.Error(), "session registry (redis) unavailable") {
				t.Fatalf("%s, %s ?cluster=1: %d %v", how, method, rec.Code, err)
			}
			if took > timeout+300*time.Millisecond {
				t.Errorf("%s, %s ?cluster=1 took %v (redis timeout %v)", how, method, took, timeout)
			}
			t.Logf("%s: %s ?cluster=1 answered %d in %v: %v", how, method, rec.Code, took, err)
		}
		rec, err := sessionsRequest(t, a.proc, http.MethodGet, "")
		if err != nil || !strings.Contains(rec.Body.String(), `"remote":"127.0.0.1:`) {
			t.Fatalf("%s, the local list: %s %v", how, rec.Body, err)
		}
	}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	down("redis stopped")
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Pause(); err != nil {
		t.Fatal(err)
	}
	down("redis hung")
	// Registering sessions is no part of a login: with Redis hung, one
	// takes no Redis timeout.
	start := time.Now()
	sessionFrom(t, instanceHandler(t, b, nil), "127.0.0.3").loginAndQuit()
	if d := time.Since(start); d >= timeout {
		t.Errorf("a login with Redis hung took %v (redis timeout %v)", d, timeout)
	} else {
		t.Logf("a login with Redis hung took %v", d)
	}
	if err := srv.Continue(); err != nil {
		t.Fatal(err)
	}
	// The DELETEs closed nothing.
	local.send("NOOP")
	local.expect("+OK")
	waitList(t, a.proc, "", func(l []clusterSession) bool { return len(l) == 2 })
}

// Without a redis block the process is the whole cluster: ?cluster=1
// lists and closes its own sessions, each with its instance.
func TestClusterSessionsWithoutRedis(t *testing.T) {
	t.Parallel()
	a := localApp(t, "solo", newTestProcess())
	ts := sessionFrom(t, instanceHandler(t, a, nil), "127.0.0.1")
	l := clusterList(t, a.proc, "")
	if len(l) != 1 || l[0].Instance != "solo" {
		t.Fatalf("?cluster=1: %+v", l)
	}
	rec, err := sessionsRequest(t, a.proc, http.MethodDelete, "?cluster=1&id="+l[0].ID)
	if err != nil || !strings.Contains(rec.Body.String(), `"closed":1`) {
		t.Fatalf("DELETE: %s %v", rec.Body, err)
	}
	ts.expect("-ERR [SYS/TEMP] Session closed by the administrator")
	ts.closed()

	// Without a pop3 app at all, the instance is the host's name.
	h, _ := newTestHandler(t, "127.0.0.1:1", nil)
	bare := sessionFrom(t, h, "127.0.0.1")
	if l := clusterList(t, h.proc, ""); len(l) != 1 || l[0].Instance != hostname {
		t.Fatalf("?cluster=1 without an app: %+v", l)
	}
	bare.send("QUIT")
	bare.expect("+OK")
	bare.closed()
}
