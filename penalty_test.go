package pop3

import (
	"net/netip"
	"testing"
	"time"
)

func TestPenaltyDoublesPerIP(t *testing.T) {
	p := newPenaltyTable()
	guesser, other := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	var got []time.Duration
	for i := 0; i < 7; i++ {
		got = append(got, p.fail(guesser, time.Second))
	}
	want := []time.Duration{1, 2, 4, 8, 15, 15, 15}
	for i := range want {
		if got[i] != want[i]*time.Second {
			t.Fatalf("delays %v, want %v seconds", got, want)
		}
	}
	if d := p.fail(other, time.Second); d != time.Second {
		t.Errorf("another client got %v", d)
	}
	p.succeed(guesser)
	if d := p.fail(guesser, time.Second); d != time.Second {
		t.Errorf("after a good login: %v", d)
	}
	for i := 0; i < 10; i++ {
		p.fail(other, time.Millisecond)
	}
	if d := p.fail(other, time.Millisecond); d != 16*time.Millisecond {
		t.Errorf("a small base delay grows to %v, want 16 times", d)
	}
	if d := p.fail(netip.Addr{}, 2*time.Second); d != 2*time.Second {
		t.Errorf("unknown address: %v", d)
	}
}

func TestPenaltyForgetsOldFailures(t *testing.T) {
	p := newPenaltyTable()
	ip := netip.MustParseAddr("192.0.2.9")
	base := time.Unix(1_700_000_000, 0)
	p.now = func() time.Time { return base }
	p.fail(ip, time.Second)
	p.fail(ip, time.Second)
	p.now = func() time.Time { return base.Add(2 * penaltyForget) }
	if d := p.fail(ip, time.Second); d != time.Second {
		t.Errorf("old failures still count: %v", d)
	}
}
