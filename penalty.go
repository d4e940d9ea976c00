package pop3

import (
	"hash/maphash"
	"net/netip"
	"sync"
	"time"
)

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

	limit := max(base, min(base*penaltyFactor, penaltyMax))
	d := base
	for i := 1; i < e.failures && d < limit; i++ {
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
