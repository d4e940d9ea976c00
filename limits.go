package pop3

// What clients may take of the process: session slots (descriptors, by the
// open files limit) and the login penalty (the delay after failed logins).

import (
	"hash/maphash"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

// slotCounter bounds the descriptors that the sessions of all pop3 handlers
// in the process hold, by its open-files limit. caddy-l4's accept
// loop ends for good when accept(2) fails with EMFILE (layer4/server.go,
// serve), so a client flood that used up the descriptors would leave the
// port deaf until the next reload. A slot is two descriptors: each session
// takes one (client and upstream sockets), and so does each splice pipe the
// relay uses (see takePipe). A reserve is kept for connections accepted but
// not yet refused, auth_http requests, pipes Go's pool keeps out of reach
// (one or two per P) and the rest of Caddy. A session over the limit gets
// "-ERR [SYS/TEMP]" and is closed at once, which frees its descriptor; a
// stream with no slot for a pipe is copied instead of spliced.
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

// Per-client login penalty, like Dovecot's auth penalty: each recent
// failure doubles the delay before the next -ERR, up to 16 times the base
// delay and at most penaltyMax, so a password-guessing client slows down
// without slowing anyone else. Clients are keyed by IPv4 address or IPv6
// /64, the block one subscriber usually gets. A good login forgets only the
// failures of that user from the address: behind a NAT, one user's login
// does not reset the count of someone guessing others' passwords, and
// nobody's good login is ever delayed. The table is package-level so that
// it survives config reloads.
const (
	penaltyFactor  = 16
	penaltyMax     = 15 * time.Second // Dovecot's AUTH_PENALTY_MAX_SECS
	penaltyForget  = time.Hour        // failures older than this no longer count
	penaltyMaxKeys = 1 << 16          // bounds memory under a spray of addresses
	penaltyUsers   = 4                // users whose failures each entry tells apart
)

type penaltyEntry struct {
	key        netip.Addr
	failures   int // all recent failures from the address
	last       time.Time
	users      [penaltyUsers]userFailures // the most recent failing users; older ones stay counted
	prev, next *penaltyEntry              // in order of last failure, newest first
}

// userFailures counts one user's failures by a hash of the name, so that
// the table holds no client-chosen strings.
type userFailures struct {
	user uint64
	n    int
}

type penaltyTable struct {
	mu     sync.Mutex
	m      map[netip.Addr]*penaltyEntry
	newest *penaltyEntry
	oldest *penaltyEntry
	seed   maphash.Seed
	now    func() time.Time
}

func newPenaltyTable() *penaltyTable {
	return &penaltyTable{m: make(map[netip.Addr]*penaltyEntry), seed: maphash.MakeSeed(), now: time.Now}
}

var penalties = newPenaltyTable()

// penaltyKey is the address the penalty counts for: IPv6 by /64.
func penaltyKey(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// fail records a failed login of user from ip and returns the delay to
// apply: base for the first failure, doubling for each recent one.
func (p *penaltyTable) fail(ip netip.Addr, user string, base time.Duration) time.Duration {
	if !ip.IsValid() || base <= 0 {
		return base
	}
	key, h := penaltyKey(ip), maphash.String(p.seed, user)
	t := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.m[key]
	if e != nil && t.Sub(e.last) > penaltyForget {
		p.drop(e)
		e = nil
	}
	if e == nil {
		for len(p.m) >= penaltyMaxKeys {
			p.drop(p.oldest)
		}
		e = &penaltyEntry{key: key}
		p.m[key] = e
	} else {
		p.unlink(e)
	}
	e.failures++
	e.last = t
	p.pushNewest(e)
	e.countUser(h)

	return penaltyDelay(int64(e.failures), base)
}

// penaltyDelay is the delay after failures recent failures: base for the
// first, doubling for each further one, up to penaltyFactor times base and
// at most penaltyMax.
func penaltyDelay(failures int64, base time.Duration) time.Duration {
	limit := max(base, min(base*penaltyFactor, penaltyMax))
	d := base
	for i := int64(1); i < failures && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}

// countUser adds a failure of user h; the least recent of a full list
// gives way, its failures still counted for the address.
func (e *penaltyEntry) countUser(h uint64) {
	i := 0
	for i < penaltyUsers-1 && e.users[i].n > 0 && e.users[i].user != h {
		i++
	}
	u := e.users[i]
	if u.user != h || u.n == 0 {
		u = userFailures{user: h}
	}
	u.n++
	copy(e.users[1:i+1], e.users[:i]) // most recent first
	e.users[0] = u
}

// succeed forgets user's failures from ip after a good login.
func (p *penaltyTable) succeed(ip netip.Addr, user string) {
	if !ip.IsValid() {
		return
	}
	key, h := penaltyKey(ip), maphash.String(p.seed, user)
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.m[key]
	if e == nil {
		return
	}
	for i, u := range e.users {
		if u.n > 0 && u.user == h {
			e.failures -= u.n
			copy(e.users[i:], e.users[i+1:])
			e.users[penaltyUsers-1] = userFailures{}
			break
		}
	}
	if e.failures <= 0 {
		p.drop(e)
	}
}

func (p *penaltyTable) drop(e *penaltyEntry) {
	p.unlink(e)
	delete(p.m, e.key)
}

func (p *penaltyTable) unlink(e *penaltyEntry) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		p.newest = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		p.oldest = e.prev
	}
	e.prev, e.next = nil, nil
}

func (p *penaltyTable) pushNewest(e *penaltyEntry) {
	e.next = p.newest
	if p.newest != nil {
		p.newest.prev = e
	}
	p.newest = e
	if p.oldest == nil {
		p.oldest = e
	}
}
