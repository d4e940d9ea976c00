package pop3

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

func TestSessionLimit(t *testing.T) {
	for _, tc := range []struct {
		nofile uint64
		want   int64
	}{
		{0, 0},               // unknown: no limit
		{1 << 41, 0},         // practically unlimited
		{30, 1},              // tiny: one session still fits
		{64, 16},             // reserve 32
		{1024, 480},          // reserve 64 (1/16)
		{20000, 9375},        // reserve 1250 (1/16)
		{1048576, 522240},    // reserve capped at 4096
		{1 << 30, 536868864}, // reserve capped at 4096
	} {
		if got := sessionLimit(tc.nofile); got != tc.want {
			t.Errorf("sessionLimit(%d) = %d, want %d", tc.nofile, got, tc.want)
		}
	}
}

func TestSlotCounter(t *testing.T) {
	var c slotCounter
	c.override.Store(2)
	if !c.take() || !c.take() {
		t.Fatal("two slots of two refused")
	}
	if c.take() {
		t.Fatal("a third slot of two granted")
	}
	if got := c.used.Load(); got != 2 {
		t.Fatalf("used %d after a refusal, want 2", got)
	}
	c.release()
	if !c.take() {
		t.Fatal("a released slot was not granted again")
	}
}

// waitForNoSessions waits until the sessions of earlier tests have ended,
// in every process state.
func waitForNoSessions(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, proc := range testProcesses() {
		for proc.slots.sessions() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%d sessions of earlier tests still hold slots", proc.slots.sessions())
			}
			time.Sleep(10 * time.Millisecond)
		}
		for proc.slots.used.Load() != 0 { // their pipes, until the GC has dropped them
			if time.Now().After(deadline) {
				t.Fatalf("pipes of earlier tests still hold %d slots", proc.slots.used.Load())
			}
			runtime.GC()
			time.Sleep(time.Millisecond)
		}
	}
}

// TestSessionsOverTheLimitAreRefused: with the process at its session
// limit a new client gets -ERR [SYS/TEMP] at once and its connection
// closes; a slot freed by a session's end serves the next client.
func TestSessionsOverTheLimitAreRefused(t *testing.T) {
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	h.proc.slots.override.Store(1)
	first := startSession(t, h, logs, true)

	refused := handleOn(t, h, logs, true)
	line := refused.readLine()
	if !strings.HasPrefix(line, "-ERR [SYS/TEMP] Too many connections") {
		t.Fatalf("over the limit: got %q, want -ERR [SYS/TEMP] Too many connections", line)
	}
	if err := <-refused.done; err != nil {
		t.Fatalf("Handle of a refused session returned %v, want nil", err)
	}
	_ = refused.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := refused.r.ReadString('\n'); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("refused connection still open: %q %v", rest, err)
	}
	if logs.FilterMessageSnippet("refusing sessions").Len() != 1 {
		t.Error("no warning about refused sessions")
	}

	first.send("QUIT")
	first.expect("+OK")
	if err := <-first.done; err != nil {
		t.Fatal(err)
	}
	next := startSession(t, h, logs, true)
	next.send("QUIT")
	next.expect("+OK")
	<-next.done
	if got := h.proc.slots.sessions(); got != 0 {
		t.Fatalf("%d slots held after every session ended", got)
	}
}

// TestPipesTakeSlots: a splice pipe costs a slot like a session, and stays
// charged after the splice (Go's pool keeps the pipe) until garbage
// collections have dropped it.
func TestPipesTakeSlots(t *testing.T) {
	var c slotCounter
	c.override.Store(4)
	if !c.take() || !c.take() {
		t.Fatal("two sessions of four slots refused")
	}
	if !c.takePipe() || !c.takePipe() {
		t.Fatal("two pipes in the two slots left refused")
	}
	if c.takePipe() {
		t.Fatal("a third pipe granted with no slot left")
	}
	if c.take() {
		t.Fatal("a session granted while pipes hold the last slots")
	}
	c.releasePipe()
	c.releasePipe()
	if !c.takePipe() {
		t.Fatal("a charged pipe, now free, was not granted again")
	}
	c.releasePipe()
	if c.take() {
		t.Fatal("a session granted while the pool may still hold both pipes")
	}
	if got := c.sessions(); got != 2 {
		t.Errorf("sessions() = %d, want 2", got)
	}
	// The pool drops a pipe two collections after its last use; the charge
	// goes a collection later, as the pipe's finalizer may still be due.
	for i := 0; i < 2; i++ {
		c.pipesCollected()
		if c.take() {
			t.Fatalf("a session granted %d collections after the pipes' last use", i+1)
		}
	}
	c.pipesCollected()
	if !c.take() || !c.take() {
		t.Fatal("the slots of collected pipes were not freed")
	}
}

// TestPipeChargeFollowsGC: the charge drops by itself as the GC runs.
func TestPipeChargeFollowsGC(t *testing.T) {
	var c slotCounter
	c.override.Store(1)
	if !c.takePipe() {
		t.Fatal("pipe refused")
	}
	c.releasePipe()
	deadline := time.Now().Add(10 * time.Second)
	for !c.take() {
		if time.Now().After(deadline) {
			t.Fatal("the pipe's slot was not freed after garbage collections")
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}

// TestStreamWithoutPipeSlotIsCopied: at the limit a plain relay copies
// instead of splicing, and the bytes arrive intact.
func TestStreamWithoutPipeSlotIsCopied(t *testing.T) {
	line := strings.Repeat("x", 998) + "\r\n"
	body := "Subject: big\r\n\r\n" + strings.Repeat(line, 8<<20/len(line))
	_, addr := fakeUpstream(t, func(u *pop3test.Upstream) { u.Messages = []string{body} })
	h, logs := newTestHandler(t, addr, nil)
	h.proc.slots.override.Store(1)
	ts := startSession(t, h, logs, true)
	ts.send("USER alice", "PASS secret-pw", "RETR 1")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.expect("+OK")
	got := ts.multiline()
	if want := strings.Split(strings.TrimSuffix(body, "\r\n"), "\r\n"); !slices.Equal(got, want) {
		t.Fatalf("RETR: %d lines, want %d", len(got), len(want))
	}
	h.proc.slots.pipes.mu.Lock()
	charged := h.proc.slots.pipes.charged
	h.proc.slots.pipes.mu.Unlock()
	if charged != 0 {
		t.Errorf("%d pipes charged with no slot for one", charged)
	}
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
}

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
