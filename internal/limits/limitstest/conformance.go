// Package limitstest holds the test table every [limits.Store] must pass, so
// the in-process and the shared implementations are held to the same rules.
// It sits apart from package limits so that the proxy does not link testing.
package limitstest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
)

// t0 is a whole millisecond: a store may keep times in milliseconds.
var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

// lease is the session lease of the tests that do not test leases.
const lease = time.Minute

// Option changes what StoreConformance expects of a store.
type Option func(*options)

type options struct {
	leases bool
}

// WithLeases tests that session leases end: a slot whose holder does not
// renew it is free again at the end of its lease. Give it for stores that
// keep leases; [limits.Memory] ignores them.
func WithLeases() Option { return func(o *options) { o.leases = true } }

// StoreConformance runs the rules of [limits.Store] against stores made by
// newStore, a fresh one per subtest. Subtests run in parallel.
func StoreConformance(t *testing.T, newStore func() limits.Store, opts ...Option) {
	t.Helper()
	ctx := context.Background()
	var o options
	for _, opt := range opts {
		opt(&o)
	}

	t.Run("Acquire", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			name string
			max  int64
			want []bool
		}{
			{"max 0 admits nobody", 0, []bool{false, false}},
			{"max -1 admits nobody", -1, []bool{false}},
			{"max 1", 1, []bool{true, false, false}},
			{"max 3", 3, []bool{true, true, true, false}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				s := newStore()
				for i, want := range tc.want {
					if ok, err := s.Acquire(ctx, "ip:192.0.2.1", fmt.Sprint("s", i), tc.max, t0, lease); ok != want || err != nil {
						t.Fatalf("Acquire %d = %v, %v; want %v, nil", i, ok, err, want)
					}
				}
			})
		}
	})

	t.Run("a holder is counted once", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		const k = "user:alice"
		mustAcquire(t, s, k, "a", 2, true)
		mustAcquire(t, s, k, "a", 2, true)
		mustAcquire(t, s, k, "b", 2, true)
		mustAcquire(t, s, k, "a", 2, true) // present: renewed, not refused
		mustAcquire(t, s, k, "c", 2, false)
		mustRelease(t, s, k, "a")
		mustAcquire(t, s, k, "c", 2, true)
	})

	t.Run("Release", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		const k = "user:alice"
		mustAcquire(t, s, k, "a", 2, true)
		mustAcquire(t, s, k, "b", 2, true)
		mustAcquire(t, s, k, "c", 2, false)
		mustRelease(t, s, k, "a")
		mustAcquire(t, s, k, "c", 2, true)
		mustAcquire(t, s, k, "d", 2, false)
		mustRelease(t, s, k, "b")
		mustRelease(t, s, k, "c")
		mustRelease(t, s, k, "c") // released twice: nothing more to release
		mustRelease(t, s, k, "x") // never acquired
		mustRelease(t, s, "user:nobody", "a")
		mustAcquire(t, s, k, "a", 1, true) // the counter restarted at zero, not below
		mustAcquire(t, s, k, "b", 1, false)
	})

	t.Run("Acquire rejects an empty holder or a lease of no length", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		for _, a := range []struct {
			holder string
			lease  time.Duration
		}{{"", lease}, {"a", 0}, {"a", -time.Second}} {
			if _, err := s.Acquire(ctx, "k", a.holder, 1, t0, a.lease); !errors.Is(err, limits.ErrInvalid) {
				t.Errorf("Acquire(holder %q, lease %v) error = %v; want ErrInvalid", a.holder, a.lease, err)
			}
		}
		if _, err := s.Renew(ctx, []limits.Lease{{Key: "k", Holder: "a"}}, t0, 0); !errors.Is(err, limits.ErrInvalid) {
			t.Errorf("Renew(lease 0) error = %v; want ErrInvalid", err)
		}
		mustAcquire(t, s, "k", "a", 1, true) // the refusals took nothing
	})

	t.Run("Renew reports the slots that are gone", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		mustAcquire(t, s, "ip:192.0.2.1", "a", 2, true)
		mustAcquire(t, s, "user:alice", "a", 2, true)
		mustAcquire(t, s, "user:alice", "b", 2, true)
		mustRelease(t, s, "user:alice", "b")
		leases := []limits.Lease{
			{Key: "ip:192.0.2.1", Holder: "a"},
			{Key: "user:alice", Holder: "b"}, // released
			{Key: "user:alice", Holder: "a"},
			{Key: "user:nobody", Holder: "a"}, // never acquired
		}
		lost, err := s.Renew(ctx, leases, t0.Add(time.Second), lease)
		if want := []limits.Lease{leases[1], leases[3]}; !slices.Equal(lost, want) || err != nil {
			t.Fatalf("Renew = %v, %v; want %v, nil", lost, err, want)
		}
		if lost, err := s.Renew(ctx, nil, t0, lease); len(lost) != 0 || err != nil {
			t.Fatalf("Renew(nothing) = %v, %v", lost, err)
		}
		mustAcquire(t, s, "user:alice", "c", 2, true) // Renew did not take b's slot again
		mustAcquire(t, s, "user:alice", "d", 2, false)
	})

	if o.leases {
		t.Run("leases", func(t *testing.T) {
			t.Parallel()
			for _, tc := range []struct {
				name  string
				max   int64
				steps []leaseStep
			}{
				{"an unrenewed slot is free at the end of its lease", 1, []leaseStep{
					{0, acquire, "a", true}, {lease - time.Millisecond, acquire, "b", false}, {lease, acquire, "b", true},
				}},
				{"Renew moves the end", 1, []leaseStep{
					{0, acquire, "a", true}, {lease / 2, renew, "a", true},
					{lease, acquire, "b", false}, {lease + lease/2 - time.Millisecond, acquire, "b", false},
					{lease + lease/2, acquire, "b", true},
				}},
				{"Acquire of a present holder renews it", 1, []leaseStep{
					{0, acquire, "a", true}, {lease / 2, acquire, "a", true},
					{lease, acquire, "b", false}, {lease + lease/2, acquire, "b", true},
				}},
				{"an expired slot is lost, not renewed", 1, []leaseStep{
					{0, acquire, "a", true}, {lease, renew, "a", false}, {lease, acquire, "b", true},
				}},
				{"one holder's lease ends, another's holds", 2, []leaseStep{
					{0, acquire, "a", true}, {lease / 2, acquire, "b", true}, {lease / 2, acquire, "c", false},
					{lease, acquire, "c", true}, {lease, acquire, "d", false},
				}},
			} {
				t.Run(tc.name, func(t *testing.T) {
					t.Parallel()
					s := newStore()
					const k = "user:alice"
					for i, st := range tc.steps {
						ok, err := st.do(s, k, tc.max)
						if ok != st.want || err != nil {
							t.Fatalf("step %d at +%v: %s %q = %v, %v; want %v, nil", i, st.at, st.verb, st.holder, ok, err, st.want)
						}
					}
				})
			}
		})
	}

	t.Run("Acquire concurrently never exceeds max", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		const max, workers = 10, 100
		var ok atomic.Int64
		var wg sync.WaitGroup
		for i := range workers {
			wg.Go(func() {
				got, err := s.Acquire(ctx, "ip:192.0.2.9", fmt.Sprint("s", i), max, t0, lease)
				if err != nil {
					t.Error(err)
				}
				if got {
					ok.Add(1)
				}
			})
		}
		wg.Wait()
		if n := ok.Load(); n != max {
			t.Fatalf("%d of %d concurrent Acquires succeeded; want %d", n, workers, max)
		}
	})

	t.Run("Allow", func(t *testing.T) {
		t.Parallel()
		const rate, window = 3, 3 * time.Second // one token per second
		for _, tc := range []struct {
			name  string
			steps []step
		}{
			{"burst then empty", []step{{0, true}, {0, true}, {0, true}, {0, false}, {0, false}}},
			{"one token back per window/rate", []step{
				{0, true}, {0, true}, {0, true}, {999 * time.Millisecond, false},
				{time.Second, true}, {time.Second, false}, {2 * time.Second, true},
			}},
			{"full again after the window", []step{
				{0, true}, {0, true}, {0, true}, {0, false},
				{window, true}, {window, true}, {window, true}, {window, false},
			}},
			{"an idle bucket holds no more than rate", []step{
				{0, true}, {time.Hour, true}, {time.Hour, true}, {time.Hour, true}, {time.Hour, false},
			}},
			{"refusals take nothing", []step{
				{0, true}, {0, true}, {0, true}, {0, false}, {0, false}, {0, false}, {time.Second, true},
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				s := newStore()
				for i, st := range tc.steps {
					ok, err := s.Allow(ctx, "ip:2001:db8::/64", rate, window, t0.Add(st.at))
					if ok != st.want || err != nil {
						t.Fatalf("step %d at +%v: Allow = %v, %v; want %v, nil", i, st.at, ok, err, st.want)
					}
				}
			})
		}
	})

	t.Run("Allow keys are independent", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		for _, k := range []string{"ip:2001:db8::1", "ip:2001:db8::2", "userip:alice|2001:db8::1", "user:alice"} {
			if ok, err := s.Allow(ctx, k, 1, time.Minute, t0); !ok || err != nil {
				t.Fatalf("first Allow(%q) = %v, %v", k, ok, err)
			}
			if ok, _ := s.Allow(ctx, k, 1, time.Minute, t0); ok {
				t.Fatalf("second Allow(%q) allowed", k)
			}
		}
	})

	t.Run("Allow rejects a zero rate or window", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		for _, a := range []struct {
			rate   int64
			window time.Duration
		}{{0, time.Second}, {-1, time.Second}, {1, 0}, {1, -time.Second}} {
			if _, err := s.Allow(ctx, "k", a.rate, a.window, t0); !errors.Is(err, limits.ErrInvalid) {
				t.Errorf("Allow(rate %d, window %v) error = %v; want ErrInvalid", a.rate, a.window, err)
			}
		}
		if _, err := s.Fail(ctx, "k", 0, t0); !errors.Is(err, limits.ErrInvalid) {
			t.Errorf("Fail(window 0) error = %v; want ErrInvalid", err)
		}
	})

	t.Run("Fail", func(t *testing.T) {
		t.Parallel()
		const window = 10 * time.Second
		for _, tc := range []struct {
			name string
			at   []time.Duration
			want []int64
		}{
			{"counts within the window", []time.Duration{0, time.Second, 9999 * time.Millisecond}, []int64{1, 2, 3}},
			{"all fall out at once when the window ends", []time.Duration{0, 5 * time.Second, window}, []int64{1, 2, 1}},
			{"a new window starts at the next failure", []time.Duration{0, 15 * time.Second, 24 * time.Second, 25 * time.Second}, []int64{1, 1, 2, 1}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				s := newStore()
				for i, at := range tc.at {
					n, err := s.Fail(ctx, "userip:alice|192.0.2.1", window, t0.Add(at))
					if n != tc.want[i] || err != nil {
						t.Fatalf("Fail %d at +%v = %d, %v; want %d, nil", i, at, n, err, tc.want[i])
					}
				}
			})
		}
	})

	t.Run("Reset", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		for range 3 {
			mustFail(t, s, "userip:alice|192.0.2.1", 0)
			mustFail(t, s, "user:alice", 0)
		}
		if err := s.Reset(ctx, "userip:alice|192.0.2.1"); err != nil {
			t.Fatal(err)
		}
		if err := s.Reset(ctx, "user:nobody"); err != nil {
			t.Fatal(err)
		}
		if n := mustFail(t, s, "userip:alice|192.0.2.1", 0); n != 1 {
			t.Errorf("after Reset: Fail = %d; want 1", n)
		}
		if n := mustFail(t, s, "user:alice", 0); n != 4 {
			t.Errorf("another key after Reset: Fail = %d; want 4", n)
		}
	})

	t.Run("Block", func(t *testing.T) {
		t.Parallel()
		until := t0.Add(5 * time.Second)
		for _, tc := range []struct {
			name  string
			do    func(s limits.Store) error
			at    time.Duration
			want  bool
			until time.Time
		}{
			{"not blocked", func(limits.Store) error { return nil }, 0, false, time.Time{}},
			{"blocked before until", blockUntil("ip:192.0.2.1", until), 4999 * time.Millisecond, true, until},
			{"free at until", blockUntil("ip:192.0.2.1", until), 5 * time.Second, false, time.Time{}},
			{"another key is free", blockUntil("ip:192.0.2.2", until), 0, false, time.Time{}},
			{"unblocked", func(s limits.Store) error {
				if err := s.Block(ctx, "ip:192.0.2.1", until, t0); err != nil {
					return err
				}
				return s.Unblock(ctx, "ip:192.0.2.1")
			}, 0, false, time.Time{}},
			{"a later Block shortens", func(s limits.Store) error {
				if err := s.Block(ctx, "ip:192.0.2.1", t0.Add(time.Hour), t0); err != nil {
					return err
				}
				return s.Block(ctx, "ip:192.0.2.1", until, t0)
			}, 0, true, until},
			{"a Block that ends by now lifts", func(s limits.Store) error {
				if err := s.Block(ctx, "ip:192.0.2.1", t0.Add(time.Hour), t0); err != nil {
					return err
				}
				return s.Block(ctx, "ip:192.0.2.1", t0, t0)
			}, 0, false, time.Time{}},
			{"unblocking a free key", func(s limits.Store) error { return s.Unblock(ctx, "ip:192.0.2.1") }, 0, false, time.Time{}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				s := newStore()
				if err := tc.do(s); err != nil {
					t.Fatal(err)
				}
				u, blocked, err := s.Blocked(ctx, "ip:192.0.2.1", t0.Add(tc.at))
				if blocked != tc.want || !u.Equal(tc.until) || err != nil {
					t.Fatalf("Blocked = %v, %v, %v; want %v, %v, nil", u, blocked, err, tc.until, tc.want)
				}
			})
		}
	})

	t.Run("Block rejects a zero time", func(t *testing.T) {
		t.Parallel()
		if err := newStore().Block(ctx, "k", time.Time{}, t0); !errors.Is(err, limits.ErrInvalid) {
			t.Fatalf("Block(zero time) error = %v; want ErrInvalid", err)
		}
	})

	t.Run("Blocks lists live blocks by key", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		for k, until := range map[string]time.Time{
			"user:bob":             t0.Add(time.Minute),
			"ip:2001:db8::/64":     t0.Add(time.Hour),
			"ip:192.0.2.1":         t0.Add(time.Second), // expires at t0+1s
			"userip:bob|192.0.2.1": t0.Add(2 * time.Second),
			"user:alice":           t0.Add(time.Minute),
		} {
			if err := s.Block(ctx, k, until, t0); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Unblock(ctx, "user:alice"); err != nil {
			t.Fatal(err)
		}
		got, err := s.Blocks(ctx, t0.Add(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		want := []limits.Block{
			{Key: "ip:2001:db8::/64", Until: t0.Add(time.Hour)},
			{Key: "user:bob", Until: t0.Add(time.Minute)},
			{Key: "userip:bob|192.0.2.1", Until: t0.Add(2 * time.Second)},
		}
		if !equalBlocks(got, want) {
			t.Fatalf("Blocks = %v; want %v", got, want)
		}
		if got, err := s.Blocks(ctx, t0.Add(time.Hour)); len(got) != 0 || err != nil {
			t.Fatalf("Blocks after all ended = %v, %v; want none", got, err)
		}
	})

	t.Run("namespaces are separate", func(t *testing.T) {
		t.Parallel()
		s := newStore()
		const k = "ip:192.0.2.1"
		mustAcquire(t, s, k, "a", 1, true)
		mustFail(t, s, k, 0)
		if err := s.Block(ctx, k, t0.Add(time.Hour), t0); err != nil {
			t.Fatal(err)
		}
		if ok, err := s.Allow(ctx, k, 1, time.Minute, t0); !ok || err != nil {
			t.Fatalf("Allow = %v, %v; want a full bucket", ok, err)
		}
		if err := s.Reset(ctx, k); err != nil {
			t.Fatal(err)
		}
		if _, blocked, _ := s.Blocked(ctx, k, t0); !blocked {
			t.Fatal("Reset lifted a block")
		}
		mustAcquire(t, s, k, "b", 1, false)
	})
}

// leaseStep is one call of the lease tests: at t0+at, verb (acquire or
// renew) for holder, which should succeed or not.
type leaseStep struct {
	at     time.Duration
	verb   string
	holder string
	want   bool
}

const (
	acquire = "Acquire"
	renew   = "Renew"
)

// do runs the step on key; a Renew succeeds when it lost nothing.
func (st leaseStep) do(s limits.Store, key string, max int64) (bool, error) {
	if st.verb == renew {
		lost, err := s.Renew(context.Background(), []limits.Lease{{Key: key, Holder: st.holder}}, t0.Add(st.at), lease)
		return len(lost) == 0, err
	}
	return s.Acquire(context.Background(), key, st.holder, max, t0.Add(st.at), lease)
}

type step struct {
	at   time.Duration
	want bool
}

func blockUntil(key string, until time.Time) func(limits.Store) error {
	return func(s limits.Store) error { return s.Block(context.Background(), key, until, t0) }
}

func equalBlocks(a, b []limits.Block) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Key != b[i].Key || !a[i].Until.Equal(b[i].Until) {
			return false
		}
	}
	return true
}

func mustAcquire(t *testing.T, s limits.Store, key, holder string, max int64, want bool) {
	t.Helper()
	if ok, err := s.Acquire(context.Background(), key, holder, max, t0, lease); ok != want || err != nil {
		t.Fatalf("Acquire(%q, %q, %d) = %v, %v; want %v, nil", key, holder, max, ok, err, want)
	}
}

func mustRelease(t *testing.T, s limits.Store, key, holder string) {
	t.Helper()
	if err := s.Release(context.Background(), key, holder); err != nil {
		t.Fatalf("Release(%q, %q): %v", key, holder, err)
	}
}

func mustFail(t *testing.T, s limits.Store, key string, at time.Duration) int64 {
	t.Helper()
	n, err := s.Fail(context.Background(), key, time.Minute, t0.Add(at))
	if err != nil {
		t.Fatalf("Fail(%q): %v", key, err)
	}
	return n
}
