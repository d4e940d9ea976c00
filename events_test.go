package pop3

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
)

// eventRecorder is an events subscriber that records what it gets; block,
// when set, holds every call until it is closed.
type eventRecorder struct {
	queue  *eventQueue // the handler's events in flight
	mu     sync.Mutex
	events []recordedEvent
	block  chan struct{}
}

type recordedEvent struct {
	name string
	data map[string]any
}

func (r *eventRecorder) Handle(_ context.Context, e caddy.Event) error {
	if r.block != nil {
		<-r.block
	}
	r.mu.Lock()
	r.events = append(r.events, recordedEvent{name: e.Name(), data: e.Data})
	r.mu.Unlock()
	return nil
}

// wait returns the events once n have come and no event is still being
// handed to subscribers.
func (r *eventRecorder) wait(t *testing.T, n int) []recordedEvent {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.mu.Lock()
		got := append([]recordedEvent(nil), r.events...)
		r.mu.Unlock()
		if len(got) >= n && len(r.queue.emitting) == 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("events %v, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// recordEvents gives h an events app whose only subscriber records the
// pop3 events.
func recordEvents(t *testing.T, h *Handler) *eventRecorder {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	app := new(caddyevents.App)
	if err := app.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	rec := &eventRecorder{queue: h.proc.events}
	for _, name := range []string{"pop3_login", "pop3_auth_failed"} {
		if err := app.On(name, rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	h.ctx, h.events = ctx, app
	return rec
}

// TestSlowSubscriberDoesNotDelayLogin checks that a subscriber that takes
// its time (an exec of a script) holds up neither the login nor the -ERR.
func TestSlowSubscriberDoesNotDelayLogin(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	rec := recordEvents(t, h)
	rec.block = make(chan struct{})
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS wrong-pw")
	ts.expect("+OK")
	ts.expect("-ERR [AUTH]")
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.") // expect fails after 5s: the subscriber is still blocked
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	close(rec.block)
	got := rec.wait(t, 2)
	names := map[string]map[string]any{}
	for _, e := range got {
		names[e.name] = e.data
	}
	if d := names["pop3_login"]; d["user"] != "alice" || d["upstream_user"] != "alice" || d["upstream"] != addr {
		t.Errorf("pop3_login data %v", d)
	}
	if d := names["pop3_auth_failed"]; d["user"] != "alice" {
		t.Errorf("pop3_auth_failed data %v", d)
	}
}

// TestEventsDroppedWhenSubscribersStuck checks that events waiting for a
// stuck subscriber are bounded: beyond maxEmitting they are dropped, with
// one warning, and the session goes on.
func TestEventsDroppedWhenSubscribersStuck(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	rec := recordEvents(t, h)
	rec.block = make(chan struct{})
	h.proc.events.warning.reset()
	for i := 0; i < maxEmitting; i++ {
		h.emit("pop3_login", func() map[string]any { return map[string]any{"n": i} })
	}
	if n := len(h.proc.events.emitting); n != maxEmitting {
		t.Fatalf("%d events in flight, want %d", n, maxEmitting)
	}
	ts := startSession(t, h, logs, false)
	ts.loginAndQuit()
	h.emit("pop3_login", func() map[string]any { return nil })
	if n := logs.FilterMessage("event subscribers too slow: events dropped").Len(); n != 1 {
		t.Errorf("%d drop warnings, want 1 (rate-limited)", n)
	}
	close(rec.block)
	if got := rec.wait(t, maxEmitting); len(got) != maxEmitting {
		t.Errorf("%d events delivered, want %d", len(got), maxEmitting)
	}
}

// TestEventsAfterReload: a session of a replaced config still reports its
// logins and failures; the config's context, cancelled by the reload,
// would make the events app drop them with an ERROR.
func TestEventsAfterReload(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	rec := recordEvents(t, h)
	ctx, cancel := caddy.NewContext(h.ctx)
	h.ctx = ctx
	ts := startSession(t, h, logs, false)
	cancel() // the reload
	ts.send("USER alice", "PASS wrong-pw")
	ts.expect("+OK")
	ts.expect("-ERR [AUTH]")
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
	if got := rec.wait(t, 1); len(got) != 1 || got[0].name != "pop3_auth_failed" {
		t.Errorf("events %v, want pop3_auth_failed", got)
	}
}
