package pop3

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
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
		for _, proc := range testProcesses() {
			if n := proc.slots.sessions(); n != 0 && code == 0 {
				fmt.Fprintf(os.Stderr, "%d session slots never released\n", n)
				code = 1
			}
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
		for _, proc := range testProcesses() {
			for _, s := range proc.sessions.matching(func(*session) bool { return true }) {
				leaked = append(leaked, "session "+s.id+" still registered")
			}
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

var (
	testProcessesMu sync.Mutex
	allTestProcs    = []*processState{theProcess}
)

// newTestProcess is a processState of a test's own, which TestMain and the
// leak checks look at together with theProcess.
func newTestProcess() *processState {
	p := newProcessState()
	testProcessesMu.Lock()
	allTestProcs = append(allTestProcs, p)
	testProcessesMu.Unlock()
	return p
}

// testProcesses is theProcess and every test's own.
func testProcesses() []*processState {
	testProcessesMu.Lock()
	defer testProcessesMu.Unlock()
	return append([]*processState(nil), allTestProcs...)
}
