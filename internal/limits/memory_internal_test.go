package limits

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func TestMemoryEvictsLeastRecentlyUsed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		table func(m *Memory) *table
		touch func(m *Memory, key string) // adds or uses key
	}{
		{"sessions", func(m *Memory) *table { return &m.sessions },
			func(m *Memory, k string) { m.Acquire(ctx, k, "s", 100, t0, time.Minute) }},
		{"buckets", func(m *Memory) *table { return &m.buckets },
			func(m *Memory, k string) { m.Allow(ctx, k, 2, time.Hour, t0) }},
		{"failures", func(m *Memory) *table { return &m.failures },
			func(m *Memory, k string) { m.Fail(ctx, k, time.Hour, t0) }},
		{"blocks", func(m *Memory) *table { return &m.blocks },
			func(m *Memory, k string) { m.Blocked(ctx, k, t0); m.Block(ctx, k, t0.Add(time.Hour), t0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const max = 4
			m := NewMemory(max)
			for _, k := range []string{"a", "b", "c", "d"} {
				tc.touch(m, k)
			}
			tc.touch(m, "a") // "b" is now the least recently used
			tc.touch(m, "e") // evicts "b"
			if n := tc.table(m).len(); n != max {
				t.Fatalf("table holds %d entries; want %d", n, max)
			}
			for k, want := range map[string]bool{"b": false, "a": true, "c": true, "d": true, "e": true} {
				if got := tc.table(m).has(k); got != want {
					t.Errorf("key %q kept = %v; want %v", k, got, want)
				}
			}
			for i := range 100 {
				tc.touch(m, fmt.Sprint("k", i))
				if n := tc.table(m).len(); n > max {
					t.Fatalf("table holds %d entries; bound %d", n, max)
				}
			}
		})
	}
}

func TestMemoryShardedTableStaysBounded(t *testing.T) {
	t.Parallel()
	const max = 10_000
	m := NewMemory(max)
	if n := len(m.failures.shards); n < 2 {
		t.Fatalf("%d shards; want several", n)
	}
	for i := range 3 * max {
		m.Fail(context.Background(), fmt.Sprint("user:", i), time.Hour, t0)
	}
	if n := m.failures.len(); n > max || n < max*9/10 {
		t.Fatalf("table holds %d entries; want at most %d and close to it", n, max)
	}
}

func TestMemoryDeletesIdleEntries(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := NewMemory(0)
	m.Acquire(ctx, "ip:192.0.2.1", "a", 2, t0, time.Minute)
	m.Acquire(ctx, "ip:192.0.2.1", "b", 2, t0, time.Minute)
	m.Release(ctx, "ip:192.0.2.1", "a")
	if n := m.sessions.len(); n != 1 {
		t.Fatalf("sessions hold %d entries with one session; want 1", n)
	}
	m.Release(ctx, "ip:192.0.2.1", "b")
	if n := m.sessions.len(); n != 0 {
		t.Fatalf("sessions hold %d entries after the last Release; want 0", n)
	}

	m.Fail(ctx, "user:alice", time.Minute, t0)
	m.Fail(ctx, "user:alice", time.Minute, t0.Add(time.Minute)) // the old window is dropped, a new one starts
	m.Block(ctx, "user:alice", t0.Add(time.Second), t0)
	m.Blocked(ctx, "user:alice", t0.Add(time.Second))
	m.Allow(ctx, "user:alice", 1, time.Second, t0)
	m.Allow(ctx, "user:alice", 1, time.Second, t0.Add(time.Second)) // full again: replaced
	for name, want := range map[string][2]int{
		"failures": {m.failures.len(), 1},
		"blocks":   {m.blocks.len(), 0},
		"buckets":  {m.buckets.len(), 1},
	} {
		if want[0] != want[1] {
			t.Errorf("%s hold %d entries; want %d", name, want[0], want[1])
		}
	}
}

// TestMemoryBytesPerEntry measures what a failure entry costs, key
// included; the figure is in the doc comment of Memory.
func TestMemoryBytesPerEntry(t *testing.T) {
	const n = 100_000
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m := NewMemory(2 * n) // room for uneven shards: no eviction
	for i := range n {
		m.Fail(context.Background(), fmt.Sprintf("userip:%09d", i), time.Hour, t0) // 16-byte keys
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%.0f bytes per entry with its 16-byte key", per)
	if m.failures.len() != n {
		t.Fatalf("table holds %d entries; want %d", m.failures.len(), n)
	}
	if per > 400 {
		t.Fatalf("%.0f bytes per entry; want well under 400", per)
	}
	runtime.KeepAlive(m)
}

func TestAddressKey(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		addr   string
		prefix int
		want   string
	}{
		{"192.0.2.1", 0, "192.0.2.1"},
		{"192.0.2.1", 48, "192.0.2.1"},
		{"::ffff:192.0.2.1", 0, "192.0.2.1"},
		{"::ffff:192.0.2.1", 128, "192.0.2.1"},
		{"2001:db8:1:2:3:4:5:6", 0, "2001:db8:1:2::/64"},
		{"2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::/64"},
		{"2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"},
		{"2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"},
		{"2001:db8:1:2:3:4:5:6", 200, "2001:db8:1:2:3:4:5:6/128"},
		{"2001:db8:1:2:3:4:5:6", -1, "2001:db8:1:2::/64"},
		{"fe80::1%eth0", 0, "fe80::/64"},
		{"::1", 0, "::/64"},
	} {
		t.Run(fmt.Sprint(tc.addr, "/", tc.prefix), func(t *testing.T) {
			t.Parallel()
			if got := AddressKey(netip.MustParseAddr(tc.addr), tc.prefix); got != tc.want {
				t.Fatalf("AddressKey = %q; want %q", got, tc.want)
			}
		})
	}
	if got := AddressKey(netip.Addr{}, 0); got != "" {
		t.Fatalf("AddressKey(invalid) = %q; want empty", got)
	}
}

func TestMemoryRenewReportsEvictedSlots(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := NewMemory(2)
	for _, k := range []string{"a", "b", "c"} { // c evicts a
		if ok, err := m.Acquire(ctx, k, "s", 1, t0, time.Minute); !ok || err != nil {
			t.Fatalf("Acquire(%q) = %v, %v", k, ok, err)
		}
	}
	leases := []Lease{{Key: "a", Holder: "s"}, {Key: "b", Holder: "s"}, {Key: "c", Holder: "s"}}
	lost, err := m.Renew(ctx, leases, t0, time.Minute)
	if len(lost) != 1 || lost[0] != leases[0] || err != nil {
		t.Fatalf("Renew = %v, %v; want the evicted %v", lost, err, leases[0])
	}
}
