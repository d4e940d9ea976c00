package pop3

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// processBaseline is what this process holds at one moment: its open
// descriptors (by readlink of /proc/self/fd, empty where there is no /proc),
// its goroutines, and the parked sessions and parked directions.
type processBaseline struct {
	fds        map[string]string // fd number → what it points at
	goroutines int
	parked     float64 // the parked_sessions gauge
	waiting    int     // directions in the parker
}

func takeProcessBaseline() processBaseline {
	return processBaseline{
		fds:        openFDs("/proc/self/fd"),
		goroutines: runtime.NumGoroutine(),
		parked:     parkedGauges(),
		waiting:    parker.Waiting(),
	}
}

// openFDs lists dir (a /proc/PID/fd) as fd → readlink target.
func openFDs(dir string) map[string]string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	fds := make(map[string]string, len(entries))
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed while we looked: the fd ReadDir itself used
		}
		fds[e.Name()] = target
	}
	return fds
}

// expectBaseline waits up to d for the process to be back at base: no more
// descriptors or goroutines than base plus tolerance, and exactly as many
// parked sessions and directions. It fails with what is left over.
func expectBaseline(t *testing.T, base processBaseline, tolerance int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		now := takeProcessBaseline()
		diff := base.diff(now, tolerance)
		if diff == "" {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("not back to the baseline after %v:\n%s\ngoroutines:\n%s", d, diff, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// diff describes how now exceeds b, or is "".
func (b processBaseline) diff(now processBaseline, tolerance int) string {
	var out []string
	if b.fds != nil && len(now.fds) > len(b.fds)+tolerance {
		out = append(out, fmt.Sprintf("%d descriptors open, baseline %d:\n%s", len(now.fds), len(b.fds), fdDiff(b.fds, now.fds)))
	}
	if now.goroutines > b.goroutines+tolerance {
		out = append(out, fmt.Sprintf("%d goroutines, baseline %d", now.goroutines, b.goroutines))
	}
	if now.parked != b.parked {
		out = append(out, fmt.Sprintf("parked_sessions %v, baseline %v", now.parked, b.parked))
	}
	if now.waiting != b.waiting {
		out = append(out, fmt.Sprintf("%d directions in the parker, baseline %d", now.waiting, b.waiting))
	}
	return strings.Join(out, "\n")
}

// fdDiff lists the descriptors that are new or point elsewhere in now.
func fdDiff(base, now map[string]string) string {
	var lines []string
	for fd, target := range now {
		if base[fd] != target {
			lines = append(lines, fmt.Sprintf("  + fd %s -> %s", fd, target))
		}
	}
	for fd, target := range base {
		if _, ok := now[fd]; !ok {
			lines = append(lines, fmt.Sprintf("  - fd %s -> %s", fd, target))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// parkedGauges adds the parked_sessions gauges of theProcess and of every
// test's own process state: the sessions parked in this process.
func parkedGauges() float64 {
	var sum float64
	for _, proc := range testProcesses() {
		sum += testutil.ToFloat64(proc.metrics.parkedSessions)
	}
	return sum
}
