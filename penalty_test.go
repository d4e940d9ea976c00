package pop3

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// forget drops ip's entry, whoever failed there.
func (p *penaltyTable) forget(ip netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e := p.m[penaltyKey(ip)]; e != nil {
		p.drop(e)
	}
}

func TestPenaltyDoublesPerIP(t *testing.T) {
	p := newPenaltyTable()
	guesser, other := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	var got []time.Duration
	for i := 0; i < 7; i++ {
		got = append(got, p.fail(guesser, "alice", time.Second))
	}
	want := []time.Duration{1, 2, 4, 8, 15, 15, 15}
	for i := range want {
		if got[i] != want[i]*time.Second {
			t.Fatalf("delays %v, want %v seconds", got, want)
		}
	}
	if d := p.fail(other, "alice", time.Second); d != time.Second {
		t.Errorf("another client got %v", d)
	}
	p.succeed(guesser, "alice")
	if d := p.fail(guesser, "alice", time.Second); d != time.Second {
		t.Errorf("after a good login: %v", d)
	}
	for i := 0; i < 10; i++ {
		p.fail(other, "bob", time.Millisecond)
	}
	if d := p.fail(other, "bob", time.Millisecond); d != 16*time.Millisecond {
		t.Errorf("a small base delay grows to %v, want 16 times", d)
	}
	if d := p.fail(netip.Addr{}, "alice", 2*time.Second); d != 2*time.Second {
		t.Errorf("unknown address: %v", d)
	}
}

func TestPenaltyForgetsOldFailures(t *testing.T) {
	p := newPenaltyTable()
	ip := netip.MustParseAddr("192.0.2.9")
	base := time.Unix(1_700_000_000, 0)
	p.now = func() time.Time { return base }
	p.fail(ip, "alice", time.Second)
	p.fail(ip, "alice", time.Second)
	p.now = func() time.Time { return base.Add(2 * penaltyForget) }
	if d := p.fail(ip, "alice", time.Second); d != time.Second {
		t.Errorf("old failures still count: %v", d)
	}
}

// TestPenaltyIPv6By64: addresses of one /64 share a penalty; the next /64
// does not; an IPv4-mapped address counts as the IPv4 address.
func TestPenaltyIPv6By64(t *testing.T) {
	p := newPenaltyTable()
	p.fail(netip.MustParseAddr("2001:db8:1:2::1"), "alice", time.Second)
	if d := p.fail(netip.MustParseAddr("2001:db8:1:2:ffff:ffff:ffff:fffe"), "alice", time.Second); d != 2*time.Second {
		t.Errorf("second failure in the same /64: %v, want 2s", d)
	}
	if d := p.fail(netip.MustParseAddr("2001:db8:1:3::1"), "alice", time.Second); d != time.Second {
		t.Errorf("first failure in the next /64: %v, want 1s", d)
	}
	p.fail(netip.MustParseAddr("192.0.2.7"), "alice", time.Second)
	if d := p.fail(netip.MustParseAddr("::ffff:192.0.2.7"), "alice", time.Second); d != 2*time.Second {
		t.Errorf("IPv4-mapped: %v, want 2s", d)
	}
}

// TestPenaltyGoodLoginClearsOnlyThatUser: behind a NAT, a good login
// forgets the failures of that user, not those of someone guessing others.
func TestPenaltyGoodLoginClearsOnlyThatUser(t *testing.T) {
	p := newPenaltyTable()
	nat := netip.MustParseAddr("198.51.100.1")
	for _, u := range []string{"victim", "victim", "victim", "bob"} {
		p.fail(nat, u, time.Second)
	}
	p.succeed(nat, "bob")
	if d := p.fail(nat, "victim", time.Second); d != 8*time.Second {
		t.Errorf("guesser's fourth failure after another user's good login: %v, want 8s", d)
	}
	p.succeed(nat, "victim")
	if d := p.fail(nat, "carol", time.Second); d != time.Second {
		t.Errorf("after every failing user logged in: %v, want 1s", d)
	}
	// Failures of users beyond the few an entry tells apart still count.
	q := newPenaltyTable()
	for i := 0; i < penaltyUsers+2; i++ {
		q.fail(nat, fmt.Sprint("user", i), time.Second)
	}
	for i := 0; i < penaltyUsers+2; i++ {
		q.succeed(nat, fmt.Sprint("user", i))
	}
	if d := q.fail(nat, "x", time.Second); d != 4*time.Second {
		t.Errorf("with failures of forgotten users: %v, want 4s (2 earlier failures kept)", d)
	}
}

// TestPenaltyEvictsOldest: at the size limit the least recently failing
// address goes, not the whole table.
func TestPenaltyEvictsOldest(t *testing.T) {
	p := newPenaltyTable()
	base := time.Unix(1_700_000_000, 0)
	tick := 0
	p.now = func() time.Time { tick++; return base.Add(time.Duration(tick) * time.Millisecond) }
	guesser := netip.MustParseAddr("203.0.113.1")
	p.fail(guesser, "alice", time.Second)
	p.fail(guesser, "alice", time.Second)
	first := netip.AddrFrom4([4]byte{10, 0, 0, 0})
	p.fail(first, "alice", time.Second) // older than the guesser's next failure
	p.fail(guesser, "alice", time.Second)
	for i := 1; len(p.m) < penaltyMaxKeys; i++ {
		p.fail(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), "alice", time.Second)
	}
	p.fail(netip.MustParseAddr("10.255.0.0"), "alice", time.Second) // one over
	if len(p.m) != penaltyMaxKeys {
		t.Fatalf("%d entries, want %d", len(p.m), penaltyMaxKeys)
	}
	if _, ok := p.m[first]; ok {
		t.Error("the oldest entry survived")
	}
	if d := p.fail(guesser, "alice", time.Second); d != 8*time.Second {
		t.Errorf("the guesser's fourth failure after the spray: %v, want 8s", d)
	}
}
