package redisstore_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
	"github.com/caddy-pop3/caddy-pop3/internal/limits/limitstest"
	"github.com/caddy-pop3/caddy-pop3/internal/limits/redisstore"
	"github.com/caddy-pop3/caddy-pop3/internal/redistest"
)

// start runs a redis-server for t and returns it with a client made as the
// proxy would make it: the context's deadline bounds every wait.
func start(t *testing.T) (*redistest.Server, redis.UniversalClient) {
	t.Helper()
	srv := redistest.Run(t)
	c := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{srv.Addr}, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = c.Close() })
	return srv, c
}

func TestConformance(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	var n atomic.Int64
	limitstest.StoreConformance(t, func() limits.Store {
		// A prefix per store: the subtests share one server.
		return redisstore.New(c, redisstore.Options{KeyPrefix: fmt.Sprintf("test%d:", n.Add(1)), Timeout: 5 * time.Second})
	}, limitstest.WithLeases())
}

func TestKeysExpireByTTL(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, c := start(t)
	s := redisstore.New(c, redisstore.Options{})
	now := time.Now()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := s.Acquire(ctx, "user:alice", "i1/s1", 2, now, time.Minute)
	must(err)
	_, err = s.Acquire(ctx, "user:alice", "i1/s2", 2, now, 2*time.Minute)
	must(err)
	_, err = s.Allow(ctx, "ip:192.0.2.1", 3, 30*time.Second, now) // full again in 10s
	must(err)
	_, err = s.Fail(ctx, "userip:alice|192.0.2.1", 5*time.Minute, now)
	must(err)
	must(s.Block(ctx, "ip:192.0.2.1", now.Add(time.Hour), now))
	for key, want := range map[string]time.Duration{
		"caddy-pop3:session:user:alice":              2 * time.Minute, // the longest lease
		"caddy-pop3:bucket:ip:192.0.2.1":             10 * time.Second,
		"caddy-pop3:failures:userip:alice|192.0.2.1": 5 * time.Minute,
		"caddy-pop3:block:ip:192.0.2.1":              time.Hour,
	} {
		want += 5 * time.Second // the grace after the end
		got, err := c.PTTL(ctx, key).Result()
		if err != nil || got > want || got < want-5*time.Second {
			t.Errorf("PTTL %s = %v, %v; want about %v", key, got, err, want)
		}
	}
	must(s.Release(ctx, "user:alice", "i1/s1"))
	must(s.Release(ctx, "user:alice", "i1/s2"))
	if n, err := c.Exists(ctx, "caddy-pop3:session:user:alice").Result(); n != 0 || err != nil {
		t.Errorf("the set of a key without slots exists: %d, %v", n, err)
	}
}

func TestBlocksIsCapped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, c := start(t)
	// A prefix with glob characters: SCAN must match it literally.
	s := redisstore.New(c, redisstore.Options{KeyPrefix: "a*[b]:", MaxBlocks: 5})
	other := redisstore.New(c, redisstore.Options{KeyPrefix: "ab:"})
	now := time.Now()
	for i := range 20 {
		if err := s.Block(ctx, fmt.Sprint("ip:192.0.2.", i), now.Add(time.Hour), now); err != nil {
			t.Fatal(err)
		}
	}
	if err := other.Block(ctx, "ip:198.51.100.1", now.Add(time.Hour), now); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Blocks(ctx, now); len(got) != 5 || err != nil {
		t.Fatalf("Blocks = %d entries, %v; want the cap, 5", len(got), err)
	}
	if got, err := other.Blocks(ctx, now); len(got) != 1 || got[0].Key != "ip:198.51.100.1" || err != nil {
		t.Fatalf("Blocks of another prefix = %v, %v; want its one block", got, err)
	}
}

func TestRenewAfterScriptFlush(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, c := start(t)
	s := redisstore.New(c, redisstore.Options{})
	now := time.Now()
	if ok, err := s.Acquire(ctx, "user:alice", "a", 1, now, time.Minute); !ok || err != nil {
		t.Fatalf("Acquire = %v, %v", ok, err)
	}
	if err := c.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	leases := []limits.Lease{{Key: "user:alice", Holder: "a"}, {Key: "user:bob", Holder: "a"}}
	lost, err := s.Renew(ctx, leases, now, time.Minute)
	if len(lost) != 1 || lost[0] != leases[1] || err != nil {
		t.Fatalf("Renew after SCRIPT FLUSH = %v, %v; want %v lost", lost, err, leases[1])
	}
}

// TestOutage stops the server, then makes it hang: every call answers
// within the timeout with an error; after a restart on the same port the
// store works again by itself.
func TestOutage(t *testing.T) {
	t.Parallel()
	srv, c := start(t)
	const timeout = 200 * time.Millisecond
	s := redisstore.New(c, redisstore.Options{Timeout: timeout})
	ctx := context.Background()
	now := time.Now()
	calls := map[string]func() error{
		"Acquire": func() error { _, err := s.Acquire(ctx, "user:alice", "a", 1, now, time.Minute); return err },
		"Release": func() error { return s.Release(ctx, "user:alice", "a") },
		"Renew": func() error {
			_, err := s.Renew(ctx, []limits.Lease{{Key: "user:alice", Holder: "a"}}, now, time.Minute)
			return err
		},
		"Allow":   func() error { _, err := s.Allow(ctx, "ip:192.0.2.1", 100, time.Second, now); return err },
		"Fail":    func() error { _, err := s.Fail(ctx, "ip:192.0.2.1", time.Minute, now); return err },
		"Reset":   func() error { return s.Reset(ctx, "ip:192.0.2.1") },
		"Block":   func() error { return s.Block(ctx, "ip:192.0.2.1", now.Add(time.Hour), now) },
		"Blocked": func() error { _, _, err := s.Blocked(ctx, "ip:192.0.2.1", now); return err },
		"Unblock": func() error { return s.Unblock(ctx, "ip:192.0.2.1") },
		"Blocks":  func() error { _, err := s.Blocks(ctx, now); return err },
	}
	allFail := func(state string) {
		var wg sync.WaitGroup
		for name, call := range calls {
			wg.Go(func() {
				start := time.Now()
				err := call()
				took := time.Since(start)
				if err == nil {
					t.Errorf("%s with the server %s: no error", name, state)
				}
				// Slack over the timeout for scheduling on a busy machine
				// under the race detector; go-redis's own waits (a 5s
				// dial, a 3s read, retries) would take seconds.
				if took > timeout+250*time.Millisecond {
					t.Errorf("%s with the server %s took %v; timeout %v", name, state, took, timeout)
				}
			})
		}
		wg.Wait()
	}
	allWork := func(state string) {
		t.Helper()
		// The client reconnects by itself; give it a few seconds.
		deadline := time.Now().Add(5 * time.Second)
		for name, call := range calls {
			for err := call(); err != nil; err = call() {
				if time.Now().After(deadline) {
					t.Fatalf("%s after the server %s: %v", name, state, err)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}

	allWork("started")
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	allFail("stopped")
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	allWork("restarted")

	if err := srv.Pause(); err != nil {
		t.Fatal(err)
	}
	allFail("hung")
	if err := srv.Continue(); err != nil {
		t.Fatal(err)
	}
	allWork("resumed")
}
