package pop3

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// sessionSlots bounds the sessions of all pop3 handlers in the process by
// its open-files limit. caddy-l4's accept loop ends for good when accept(2)
// fails with EMFILE (layer4/server.go, serve), so a client flood that used
// up the descriptors would leave the port deaf until the next reload. Each
// session holds two descriptors (client and upstream); a reserve is kept
// for connections accepted but not yet refused, splice pipes, auth_http
// requests and the rest of Caddy. A session over the limit gets
// "-ERR [SYS/TEMP]" and is closed at once, which frees its descriptor.
var sessionSlots slotCounter

type slotCounter struct {
	once     sync.Once
	max      int64 // 0: no limit
	used     atomic.Int64
	warned   atomic.Int64 // unix seconds of the last warning, to rate-limit it
	override atomic.Int64 // a limit set by tests; 0: none
}

func (c *slotCounter) limit() int64 {
	if o := c.override.Load(); o > 0 {
		return o
	}
	c.once.Do(func() { c.max = sessionLimit(openFilesLimit()) })
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

// warnFull logs that sessions are being refused, at most once a minute.
func (c *slotCounter) warnFull(logger *zap.Logger) {
	nowSec := now().Unix()
	last := c.warned.Load()
	if nowSec-last < 60 || !c.warned.CompareAndSwap(last, nowSec) {
		return
	}
	logger.Warn("refusing sessions: the process is near its open files limit; raise it (e.g. LimitNOFILE in the systemd unit) for more concurrent sessions",
		zap.Int64("max_sessions", c.limit()))
}

// sessionLimit is how many sessions fit in nofile descriptors; 0 is no
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
