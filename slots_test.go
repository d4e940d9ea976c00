package pop3

import (
	"strings"
	"testing"
	"time"
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

// waitForNoSessions waits until the sessions of earlier tests have ended.
func waitForNoSessions(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for sessionSlots.used.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions of earlier tests still hold slots", sessionSlots.used.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSessionsOverTheLimitAreRefused: with the process at its session
// limit a new client gets -ERR [SYS/TEMP] at once and its connection
// closes; a slot freed by a session's end serves the next client.
func TestSessionsOverTheLimitAreRefused(t *testing.T) {
	waitForNoSessions(t)
	sessionSlots.override.Store(1)
	sessionSlots.warned.Store(0) // the warning is rate-limited process-wide
	t.Cleanup(func() { sessionSlots.override.Store(0) })

	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
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
	if got := sessionSlots.used.Load(); got != 0 {
		t.Fatalf("%d slots held after every session ended", got)
	}
}
