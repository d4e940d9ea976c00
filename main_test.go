package pop3

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run if a session or relay goroutine outlives the
// tests, or a session (parked ones included) stays registered: every
// session must end.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leak := waitForSessionGoroutines(15 * time.Second); leak != "" {
			fmt.Fprintf(os.Stderr, "leaked session goroutines:\n%s\n", leak)
			code = 1
		}
		if n := sessionSlots.sessions(); n != 0 && code == 0 {
			fmt.Fprintf(os.Stderr, "%d session slots never released\n", n)
			code = 1
		}
	}
	os.Exit(code)
}

func waitForSessionGoroutines(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		var leaked []string
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "caddy-pop3.(*session)") || strings.Contains(g, "caddy-pop3.(*relay)") {
				leaked = append(leaked, g)
			}
		}
		// A parked relay has no goroutine: it must have ended all the same.
		for _, s := range liveSessions.matching(func(*session) bool { return true }) {
			leaked = append(leaked, "session "+s.id+" still registered")
		}
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
