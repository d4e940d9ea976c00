package pop3

import (
	"net/netip"
	"sync"
	"time"
)

// Per-client-IP login penalty, like Dovecot's auth penalty: each recent
// failure doubles the delay before the next -ERR, up to 16 times the base
// delay and at most penaltyMax, so a password-guessing client slows down
// without slowing anyone else. The table is package-level so that it
// survives config reloads.
const (
	penaltyFactor  = 16
	penaltyMax     = 15 * time.Second // Dovecot's AUTH_PENALTY_MAX_SECS
	penaltyForget  = time.Hour        // failures older than this no longer count
	penaltyMaxKeys = 1 << 16          // bounds memory under a spray of addresses
)

type penaltyEntry struct {
	failures int
	last     time.Time
}

type penaltyTable struct {
	mu  sync.Mutex
	m   map[netip.Addr]*penaltyEntry
	now func() time.Time
}

func newPenaltyTable() *penaltyTable {
	return &penaltyTable{m: make(map[netip.Addr]*penaltyEntry), now: time.Now}
}

var penalties = newPenaltyTable()

// fail records a failed login from ip and returns the delay to apply:
// base for the first failure, doubling for each recent one.
func (p *penaltyTable) fail(ip netip.Addr, base time.Duration) time.Duration {
	if !ip.IsValid() || base <= 0 {
		return base
	}
	t := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.m[ip]
	if e == nil || t.Sub(e.last) > penaltyForget {
		if len(p.m) >= penaltyMaxKeys {
			p.evict(t)
		}
		e = &penaltyEntry{}
		p.m[ip] = e
	}
	e.failures++
	e.last = t
	limit := max(base, min(base*penaltyFactor, penaltyMax))
	d := base
	for i := 1; i < e.failures && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}

// succeed forgets the failures of ip, as Dovecot does after a good login.
func (p *penaltyTable) succeed(ip netip.Addr) {
	p.mu.Lock()
	delete(p.m, ip)
	p.mu.Unlock()
}

// evict drops forgotten entries, or all of them if none is old enough.
func (p *penaltyTable) evict(t time.Time) {
	for ip, e := range p.m {
		if t.Sub(e.last) > penaltyForget {
			delete(p.m, ip)
		}
	}
	if len(p.m) >= penaltyMaxKeys {
		clear(p.m)
	}
}
