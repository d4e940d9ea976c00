package pop3

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

// sessionSlots bounds the descriptors that the sessions of all pop3
// handlers in the process hold, by its open-files limit. caddy-l4's accept
// loop ends for good when accept(2) fails with EMFILE (layer4/server.go,
// serve), so a client flood that used up the descriptors would leave the
// port deaf until the next reload. A slot is two descriptors: each session
// takes one (client and upstream sockets), and so does each splice pipe the
// relay uses (see takePipe). A reserve is kept for connections accepted but
// not yet refused, auth_http requests, pipes Go's pool keeps out of reach
// (one or two per P) and the rest of Caddy. A session over the limit gets
// "-ERR [SYS/TEMP]" and is closed at once, which frees its descriptor; a
// stream with no slot for a pipe is copied instead of spliced.
var sessionSlots slotCounter

type slotCounter struct {
	once     sync.Once
	max      int64        // 0: no limit
	used     atomic.Int64 // sessions and charged pipes
	warned   onceAMinute  // the warning that sessions are refused
	override atomic.Int64 // a limit set by tests; 0: none
	pipes    pipeCounter
}

// pipeCounter follows the pipes of splice(2). Go keeps them in a sync.Pool
// (internal/poll.splicePipePool) that nobody can look into: a pipe goes
// back to the pool after each splice and is closed only when two garbage
// collections pass without it being used. So the pipes alive are at most
// the most splices that ran at once since the GC before last (plus the
// pool's per-P slots, which the reserve covers), and that peak is what is
// charged; each GC lowers the charge to the peak of the last two cycles.
type pipeCounter struct {
	mu              sync.Mutex
	inUse           int64 // splices running now
	charged         int64 // pipes counted in used
	peak, priorPeak int64 // most splices at once this GC cycle and the one before
	watching        bool  // the GC watcher runs
}

func (c *slotCounter) limit() int64 {
	if o := c.override.Load(); o > 0 {
		return o
	}
	c.once.Do(func() { c.max = sessionLimit(sockopt.OpenFilesLimit()) })
	return c.max
}

// take reserves a slot for a new session; false: the process is full.
func (c *slotCounter) take() bool {
	limit := c.limit()
	if c.used.Add(1) <= limit || limit == 0 {
		return true
	}
	c.used.Add(-1)
	return false
}

func (c *slotCounter) release() { c.used.Add(-1) }

// takePipe reports whether a splice may run, which may need a new pipe;
// false: no slot is left for one, copy instead. Each true needs a
// releasePipe.
func (c *slotCounter) takePipe() bool {
	p := &c.pipes
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inUse == p.charged {
		if limit := c.limit(); c.used.Add(1) > limit && limit != 0 {
			c.used.Add(-1)
			return false
		}
		p.charged++
		if !p.watching {
			p.watching = true
			watchGC(c.pipesCollected)
		}
	}
	p.inUse++
	p.peak = max(p.peak, p.inUse)
	return true
}

func (c *slotCounter) releasePipe() {
	c.pipes.mu.Lock()
	c.pipes.inUse--
	c.pipes.mu.Unlock()
}

// pipesCollected runs after each GC: the pool drops pipes unused for two
// cycles, so only the peak of the last two stays charged. It reports
// whether the watcher should go on.
func (c *slotCounter) pipesCollected() bool {
	p := &c.pipes
	p.mu.Lock()
	defer p.mu.Unlock()
	if keep := max(p.inUse, p.peak, p.priorPeak); keep < p.charged {
		c.used.Add(keep - p.charged)
		p.charged = keep
	}
	p.priorPeak, p.peak = p.peak, p.inUse
	if p.charged == 0 {
		p.watching = false
	}
	return p.watching
}

// sessions is how many sessions hold a slot.
func (c *slotCounter) sessions() int64 {
	c.pipes.mu.Lock()
	defer c.pipes.mu.Unlock()
	return c.used.Load() - c.pipes.charged
}

// watchGC calls f after each garbage collection for as long as it returns
// true, by a finalizer on an object nothing references.
func watchGC(f func() bool) {
	s := new(gcSentinel)
	runtime.SetFinalizer(s, func(*gcSentinel) {
		if f() {
			watchGC(f)
		}
	})
}

type gcSentinel [16]byte // not a tiny allocation, whose finalizer could wait for its neighbours

// warnFull logs that sessions are being refused, at most once a minute.
func (c *slotCounter) warnFull(logger *zap.Logger) {
	if !c.warned.allow() {
		return
	}
	logger.Warn("refusing sessions: the process is near its open files limit; raise it (e.g. LimitNOFILE in the systemd unit) for more concurrent sessions",
		zap.Int64("max_sessions", c.limit()))
}

// sessionLimit is how many slots of two descriptors fit in nofile; 0 is no
// limit (none known).
func sessionLimit(nofile uint64) int64 {
	if nofile == 0 || nofile >= 1<<40 {
		return 0
	}
	reserve := min(max(nofile/16, 32), 4096)
	if nofile <= reserve+2 {
		return 1
	}
	return int64((nofile - reserve) / 2)
}

// refuseWriteTimeout bounds the -ERR written to a refused client.
const refuseWriteTimeout = time.Second

// onceAMinute lets a warning through at most once a minute, so that a
// flood does not flood the log too.
type onceAMinute struct{ last atomic.Int64 } // unix nanoseconds of the last one

func (o *onceAMinute) allow() bool {
	t, last := now().UnixNano(), o.last.Load()
	return t-last >= int64(time.Minute) && o.last.CompareAndSwap(last, t)
}

// reset lets the next warning through, for tests.
func (o *onceAMinute) reset() { o.last.Store(0) }
