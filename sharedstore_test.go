package pop3

import (
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-pop3/caddy-pop3/internal/redistest"
)

// sharedApp is a pop3 app on the Redis at addr, as an instance's config
// provisions it.
func sharedApp(t *testing.T, addr, instance, onFailure string) *App {
	t.Helper()
	a := &App{Redis: &RedisConfig{Addresses: []string{addr}, KeyPrefix: "test:" + t.Name() + ":"}, Instance: instance, OnStoreFailure: onFailure, proc: newTestProcess()}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	if err := a.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Cleanup() })
	return a
}

// instanceHandler is a handler of another instance: its own process
// state, the app's shared store.
func instanceHandler(t *testing.T, app *App, l *Limits) *Handler {
	t.Helper()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) {
		h.proc, h.app, h.Limits = app.proc, app, l
	})
	limitedLogs.Store(h, logs)
	return h
}

// Three instances sharing Redis block an address at the cluster-wide
// count, not three times it, and count sessions together.
func TestSharedLimitsAcrossInstances(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	limits := func() *Limits {
		return &Limits{
			FailuresPerIP: &FailureLimit{Count: 3, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Hour)},
			SessionsPerIP: 2,
		}
	}
	var hs []*Handler
	for _, name := range []string{"a", "b", "c"} {
		hs = append(hs, instanceHandler(t, sharedApp(t, srv.Addr, name, ""), limits()))
	}
	for _, h := range hs { // one failure on each instance
		s := sessionFrom(t, h, "127.0.0.1")
		s.send("USER alice", "PASS wrong", "QUIT")
		s.expect("+OK")
		s.expect("-ERR [AUTH]")
		s.expect("+OK")
		s.closed()
	}
	s := sessionFrom(t, hs[0], "127.0.0.1")
	s.send("USER alice", "PASS secret-pw")
	s.expect("+OK")
	s.expect("-ERR [AUTH] Authentication failed")
	// The block shows in every instance's admin API.
	for _, h := range hs {
		if rec := blocksRequest(t, h.proc, "GET", ""); !strings.Contains(rec.Body.String(), `"address":"127.0.0.1"`) {
			t.Fatalf("instance's blocks: %s", rec.Body)
		}
	}
	// Two sessions from the address are open (s, and one on b): a third
	// on c is refused.
	other := sessionFrom(t, hs[1], "127.0.0.1")
	if !strings.HasPrefix(other.greeting, "+OK") {
		t.Fatalf("second session: %q", other.greeting)
	}
	if third := sessionFrom(t, hs[2], "127.0.0.1"); !strings.HasPrefix(third.greeting, "-ERR [SYS/TEMP] Too many sessions") {
		t.Fatalf("third session, on another instance: %q", third.greeting)
	}
}

// With Redis down, on_store_failure open decides with the instance's own
// state and closed refuses; both come back when Redis does.
func TestSharedLimitsStoreFailure(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	l := &Limits{FailuresPerIP: &FailureLimit{Count: 1, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Hour)}}
	open := instanceHandler(t, sharedApp(t, srv.Addr, "open", StoreFailureOpen), l)
	closedLimits := *l
	closed := instanceHandler(t, sharedApp(t, srv.Addr, "closed", StoreFailureClosed), &closedLimits)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sessionFrom(t, open, "127.0.0.1").loginAndQuit()
	c := sessionFrom(t, closed, "127.0.0.1")
	c.send("USER alice", "PASS secret-pw")
	c.expect("+OK")
	c.expect("-ERR [SYS/TEMP] Service temporarily unavailable")
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("logins with Redis down took %v", d)
	}
	// A failure while Redis is down blocks in the instance's own memory.
	w := sessionFrom(t, open, "127.0.0.2")
	w.send("USER alice", "PASS wrong", "USER alice", "PASS secret-pw")
	w.expect("+OK")
	w.expect("-ERR [AUTH]")
	w.expect("+OK")
	w.expect("-ERR [AUTH] Authentication failed")
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	// Redis is tried again storeRetryAfter after it last failed.
	for deadline := time.Now().Add(storeRetryAfter + 3*time.Second); ; {
		c := sessionFrom(t, closed, "127.0.0.1")
		c.send("USER alice", "PASS secret-pw")
		c.expect("+OK")
		if strings.HasPrefix(c.readLine(), "+OK") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("logins still refused after Redis came back")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A hung Redis costs a login at most one timeout, and only the first
// login after each storeRetryAfter: the others decide at once.
func TestSharedLimitsHungRedis(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	l := &Limits{
		ConnectionsPerIP: &RateLimit{Count: 100, Window: caddy.Duration(time.Minute)},
		SessionsPerIP:    100, SessionsPerUser: 100,
		FailuresPerIP: &FailureLimit{Count: 100, Window: caddy.Duration(time.Hour), Block: caddy.Duration(time.Hour)},
	}
	h := instanceHandler(t, sharedApp(t, srv.Addr, "a", ""), l)
	sessionFrom(t, h, "127.0.0.1").loginAndQuit() // connected
	if err := srv.Pause(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Continue() }()
	var took []time.Duration
	for range 5 {
		start := time.Now()
		sessionFrom(t, h, "127.0.0.1").loginAndQuit()
		took = append(took, time.Since(start))
	}
	timeout := defaultRedisTimeout
	if took[0] > timeout+time.Second {
		t.Errorf("first login with Redis hung took %v, want at most about one timeout (%v)", took[0], timeout)
	}
	for _, d := range took[1:] {
		if d > timeout {
			t.Errorf("logins after the first waited for Redis again: %v", took)
			break
		}
	}
}

// The login penalty counts failures from an address at every instance:
// after three failures at one, the next at another waits as the fourth.
func TestSharedLoginPenalty(t *testing.T) {
	t.Parallel()
	srv := redistest.Run(t)
	a := instanceHandler(t, sharedApp(t, srv.Addr, "a", ""), nil)
	b := instanceHandler(t, sharedApp(t, srv.Addr, "b", ""), nil)
	a.AuthFailureDelay = caddy.Duration(50 * time.Millisecond)
	b.AuthFailureDelay = a.AuthFailureDelay
	for range 3 {
		s := sessionFrom(t, a, "127.0.0.1")
		s.send("USER alice", "PASS wrong")
		s.expect("+OK")
		s.expect("-ERR [AUTH]")
	}
	s := sessionFrom(t, b, "127.0.0.1")
	s.send("USER alice", "PASS wrong")
	s.expect("+OK")
	start := time.Now()
	s.expect("-ERR [AUTH]")
	if d := time.Since(start); d < 350*time.Millisecond { // the fourth failure: 8 × 50ms; b's own first would be 50ms
		t.Fatalf("failure at the second instance waited %v, want about 400ms", d)
	}
}
