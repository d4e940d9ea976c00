package pop3

// Edge limits (the limits option): what one address, one user or one
// user+address may take of the proxy, and blocks after failed logins. The
// state lives in a limits.Store per zone, which the process keeps across
// reloads; this file decides what to count and what the client sees.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
	"github.com/caddy-pop3/caddy-pop3/internal/limits/redisstore"
)

// Limits is the handler's limits option. Every limit is off unless set.
type Limits struct {
	// Handlers that name the same zone share counters and blocks; those
	// that name none share the process's default zone.
	Zone string `json:"zone,omitempty"`
	// Concurrent sessions per client address (IPv6 grouped by
	// ipv6_prefix), counted from accept.
	SessionsPerIP int64 `json:"sessions_per_ip,omitempty"`
	// Concurrent logged-in sessions per mailbox user.
	SessionsPerUser int64 `json:"sessions_per_user,omitempty"`
	// Concurrent logged-in sessions per mailbox user from one address.
	SessionsPerUserIP int64 `json:"sessions_per_user_ip,omitempty"`
	// New connections per address: a bucket of count that refills count
	// per window.
	ConnectionsPerIP *RateLimit `json:"connections_per_ip,omitempty"`
	// Failed logins of one user from one address before that pair is
	// blocked.
	FailuresPerUserIP *FailureLimit `json:"failures_per_user_ip,omitempty"`
	// Failed logins from one address, any user, before the address is
	// blocked.
	FailuresPerIP *FailureLimit `json:"failures_per_ip,omitempty"`
	// Failed logins of one user, from any address, before the user is
	// blocked from every address it has not logged in from before.
	FailuresPerUser *FailureLimit `json:"failures_per_user,omitempty"`
	// IPv6 addresses count by this prefix. Default: 64.
	IPv6Prefix int `json:"ipv6_prefix,omitempty"`
	// Networks (CIDR, or single addresses) no limit applies to, such as a
	// webmail server's.
	Exempt []string `json:"exempt,omitempty"`
	// Before login, the client must send at least bytes in every window
	// the proxy waits for it.
	MinInputRate *InputRate `json:"min_input_rate,omitempty"`
	// Sessions end this long after they start, logged in or not.
	MaxSessionLifetime caddy.Duration `json:"max_session_lifetime,omitempty"`

	exempt []netip.Prefix
	zone   *limitZone
}

// RateLimit is count events per window.
type RateLimit struct {
	Count  int64          `json:"count"`
	Window caddy.Duration `json:"window"`
}

// FailureLimit blocks a key for block once count failures fall in one
// window.
type FailureLimit struct {
	Count  int64          `json:"count"`
	Window caddy.Duration `json:"window"`
	Block  caddy.Duration `json:"block"`
}

// InputRate is bytes per window.
type InputRate struct {
	Bytes  int64          `json:"bytes"`
	Window caddy.Duration `json:"window"`
}

// Limit names, in metrics, logs, events and the admin API.
const (
	limitSessionsPerIP      = "sessions_per_ip"
	limitSessionsPerUser    = "sessions_per_user"
	limitSessionsPerUserIP  = "sessions_per_user_ip"
	limitConnectionsPerIP   = "connections_per_ip"
	limitFailuresPerUserIP  = "failures_per_user_ip"
	limitFailuresPerIP      = "failures_per_ip"
	limitFailuresPerUser    = "failures_per_user"
	limitMinInputRate       = "min_input_rate"
	limitMaxSessionLifetime = "max_session_lifetime"
	// limitStoreUnavailable: the shared store is down and on_store_failure
	// is closed.
	limitStoreUnavailable = "store_unavailable"
)

// knownGoodFor is how long an address a user logged in from stays one that
// failures_per_user does not block for that user.
const knownGoodFor = 30 * 24 * time.Hour

// storeTimeout bounds one limits.Store call.
const storeTimeout = time.Second

// sessionLease is the lease of a session slot. The in-process store
// ignores it; a shared store, where a proxy that dies must not hold its
// slots for ever, needs them renewed before it ends, which is the job of
// whatever provides that store (the handler has no renewal loop).
const sessionLease = 10 * time.Minute

func (l *Limits) validate() error {
	for name, n := range map[string]int64{limitSessionsPerIP: l.SessionsPerIP, limitSessionsPerUser: l.SessionsPerUser, limitSessionsPerUserIP: l.SessionsPerUserIP} {
		if n < 0 {
			return fmt.Errorf("limits: %s must not be negative", name)
		}
	}
	if r := l.ConnectionsPerIP; r != nil && (r.Count < 1 || r.Window <= 0) {
		return fmt.Errorf("limits: %s needs a count of at least 1 and a window", limitConnectionsPerIP)
	}
	for name, f := range map[string]*FailureLimit{limitFailuresPerUserIP: l.FailuresPerUserIP, limitFailuresPerIP: l.FailuresPerIP, limitFailuresPerUser: l.FailuresPerUser} {
		if f != nil && (f.Count < 1 || f.Window <= 0 || f.Block <= 0) {
			return fmt.Errorf("limits: %s needs a count of at least 1, a window and a block time", name)
		}
	}
	if l.IPv6Prefix < 0 || l.IPv6Prefix > 128 {
		return errors.New("limits: ipv6_prefix must be between 1 and 128")
	}
	if r := l.MinInputRate; r != nil && (r.Bytes < 1 || r.Window <= 0) {
		return fmt.Errorf("limits: %s needs at least 1 byte and a window", limitMinInputRate)
	}
	if l.MaxSessionLifetime < 0 {
		return fmt.Errorf("limits: %s must not be negative", limitMaxSessionLifetime)
	}
	l.exempt = l.exempt[:0]
	for _, e := range l.Exempt {
		p, err := parsePrefix(e)
		if err != nil {
			return fmt.Errorf("limits: exempt: %w", err)
		}
		l.exempt = append(l.exempt, p)
	}
	return nil
}

// parsePrefix reads a CIDR network or a single address.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func (l *Limits) isExempt(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range l.exempt {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// limitZone is the state of one zone: the counters and blocks, and the
// user+address pairs that logged in (as blocks of a store of their own,
// which end knownGoodFor after the last good login).
type limitZone struct {
	name  string
	store limits.Store
	known limits.Store
	// lease of a session slot; instance prefixes the holders in a store
	// that other instances share.
	lease    time.Duration
	instance string

	mu       sync.Mutex
	unblocks map[string]*time.Timer // pop3_unblocked at a block's end, by block key
	// events sends the zone's pop3_unblocked: the handler provisioned last
	// that uses the zone, as the events app of the running config.
	events atomic.Pointer[Handler]
}

// zones holds the process's limit zones by name, and by the Redis
// configuration that holds their state when the pop3 app shares it.
type zones struct {
	mu sync.Mutex
	m  map[string]*limitZone
}

// get returns the zone name, in Redis when app has a redis block.
func (z *zones) get(name string, app *App, logger *zap.Logger, metrics *pop3Metrics) *limitZone {
	key := name
	if app != nil && app.client != nil {
		key = app.redisKey + "\x00" + name
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.m == nil {
		z.m = make(map[string]*limitZone)
	}
	zone := z.m[key]
	if zone == nil {
		zone = &limitZone{name: name, store: limits.NewMemory(0), known: limits.NewMemory(0), unblocks: make(map[string]*time.Timer), lease: sessionLease}
		if app != nil && app.client != nil {
			zone.instance, zone.lease = app.Instance, sharedLease
			shared := func(suffix string, local limits.Store) limits.Store {
				return &failoverStore{
					shared: redisstore.New(app.client, redisstore.Options{KeyPrefix: app.Redis.KeyPrefix + "zone:" + name + suffix, Timeout: time.Duration(app.Redis.Timeout)}),
					local:  local, closed: app.OnStoreFailure == StoreFailureClosed, breaker: app.breaker, logger: logger,
					errors: func() { metrics.storeError() },
				}
			}
			zone.store, zone.known = shared(":", zone.store), shared(":known:", zone.known)
		}
		z.m[key] = zone
	}
	return zone
}

func (z *zones) all() []*limitZone {
	z.mu.Lock()
	defer z.mu.Unlock()
	out := make([]*limitZone, 0, len(z.m))
	for _, zone := range z.m {
		out = append(out, zone)
	}
	return out
}

// Keys. User names are compared without case; an address key never holds
// "|", so a user+address key splits at its last one.
func ipKey(addr string) string   { return "ip:" + addr }
func userKey(user string) string { return "user:" + strings.ToLower(user) }
func userIPKey(user, addr string) string {
	return "userip:" + strings.ToLower(user) + "|" + addr
}

// blockSubject splits a block key into its limit, address and user.
func blockSubject(key string) (limit, addr, user string) {
	kind, rest, _ := strings.Cut(key, ":")
	switch kind {
	case "ip":
		return limitFailuresPerIP, rest, ""
	case "user":
		return limitFailuresPerUser, "", rest
	case "userip":
		if i := strings.LastIndexByte(rest, '|'); i >= 0 {
			return limitFailuresPerUserIP, rest[i+1:], rest[:i]
		}
	}
	return "", "", rest
}

// edgeState is what a session holds of its zone: the address it counts
// under and the session slots it took, given back at its end.
type edgeState struct {
	mu       sync.Mutex // held: the lease renewal reads it
	limits   *Limits
	addr     string   // limits.AddressKey of the client
	holder   string   // the session id, which holds the slots
	held     []string // keys of the slots
	lifetime *time.Timer
	guard    *inputGuard
}

// admit applies the limits that act at accept: connections_per_ip, then
// sessions_per_ip, for session id. It returns the session's edge state (nil
// when the client is exempt or there are no limits) or the refusal.
func (h *Handler) admit(cx net.Conn, id string) (*edgeState, *replyError, string) {
	l := h.Limits
	if l == nil {
		return nil, nil, ""
	}
	ip := addrOf(cx.RemoteAddr())
	if !ip.IsValid() || l.isExempt(ip) {
		return nil, nil, ""
	}
	e := &edgeState{limits: l, addr: limits.AddressKey(ip, l.IPv6Prefix), holder: id}
	if l.zone.instance != "" {
		e.holder = l.zone.instance + ":" + id
	}
	if r := l.MinInputRate; r != nil {
		e.guard = &inputGuard{bytes: r.Bytes, window: time.Duration(r.Window)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	t := now()
	if r := l.ConnectionsPerIP; r != nil {
		ok, err := l.zone.store.Allow(ctx, ipKey(e.addr), r.Count, time.Duration(r.Window), t)
		if errors.Is(err, errStoreDown) {
			return nil, errUnavailable, limitStoreUnavailable
		}
		if err == nil && !ok {
			return nil, errTooManyConnections, limitConnectionsPerIP
		}
	}
	if n := l.SessionsPerIP; n > 0 {
		key := ipKey(e.addr)
		ok, err := l.zone.store.Acquire(ctx, key, e.holder, n, t, l.zone.lease)
		if errors.Is(err, errStoreDown) {
			return nil, errUnavailable, limitStoreUnavailable
		}
		if err == nil && !ok {
			return nil, errTooManySessionsFromIP, limitSessionsPerIP
		}
		if ok {
			e.held = append(e.held, key)
		}
	}
	return e, nil, ""
}

// release gives back the session slots the session holds.
func (e *edgeState) release() {
	if e == nil {
		return
	}
	if e.lifetime != nil {
		e.lifetime.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	e.mu.Lock()
	held := e.held
	e.held = nil
	e.mu.Unlock()
	for _, key := range held {
		_ = e.limits.zone.store.Release(ctx, key, e.holder)
	}
}

// leases appends the slots the session holds.
func (e *edgeState) leases(to []limits.Lease) []limits.Lease {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, key := range e.held {
		to = append(to, limits.Lease{Key: key, Holder: e.holder})
	}
	return to
}

// startEdge starts the session's timers: max_session_lifetime, and the
// input guard of min_input_rate.
func (s *session) startEdge() {
	e := s.edge
	if e == nil {
		return
	}
	if d := e.limits.MaxSessionLifetime; d > 0 {
		e.lifetime = time.AfterFunc(time.Duration(d)-now().Sub(s.start), func() {
			s.h.limitReached(s, limitMaxSessionLifetime)
			s.kickFor("Session lifetime exceeded", "lifetime")
		})
	}
}

// limitReached logs and counts a refusal by limit.
func (h *Handler) limitReached(s *session, limit string, fields ...zap.Field) {
	h.proc.metrics.limitRefused(limit)
	if s != nil {
		s.log(zap.InfoLevel, "limit reached", append([]zap.Field{zap.String("limit", limit)}, fields...)...)
	}
}

// blockedBy reports which block, if any, stops user's login from this
// session's address.
func (s *session) blockedBy(user string) (limit string) {
	e := s.edge
	if e == nil {
		return ""
	}
	l := e.limits
	ctx, cancel := context.WithTimeout(s.ctx, storeTimeout)
	defer cancel()
	t := now()
	down := false
	blocked := func(key string) bool {
		_, b, err := l.zone.store.Blocked(ctx, key, t)
		down = down || errors.Is(err, errStoreDown)
		return err == nil && b
	}
	defer func() {
		if down && limit == "" {
			limit = limitStoreUnavailable
		}
	}()
	switch {
	case l.FailuresPerIP != nil && blocked(ipKey(e.addr)):
		return limitFailuresPerIP
	case l.FailuresPerUserIP != nil && blocked(userIPKey(user, e.addr)):
		return limitFailuresPerUserIP
	case l.FailuresPerUser != nil && blocked(userKey(user)):
		if _, good, err := l.zone.known.Blocked(ctx, userIPKey(user, e.addr), t); err == nil && good {
			return "" // the owner's own address
		}
		return limitFailuresPerUser
	}
	return ""
}

// countFailure counts a login refused on its credentials against each
// failures_* limit and blocks what reached its count.
func (s *session) countFailure(user string) {
	e := s.edge
	if e == nil {
		return
	}
	l := e.limits
	ctx, cancel := context.WithTimeout(s.ctx, storeTimeout)
	defer cancel()
	t := now()
	for _, c := range []struct {
		limit string
		f     *FailureLimit
		key   string
	}{
		{limitFailuresPerUserIP, l.FailuresPerUserIP, userIPKey(user, e.addr)},
		{limitFailuresPerIP, l.FailuresPerIP, ipKey(e.addr)},
		{limitFailuresPerUser, l.FailuresPerUser, userKey(user)},
	} {
		if c.f == nil {
			continue
		}
		n, err := l.zone.store.Fail(ctx, c.key, time.Duration(c.f.Window), t)
		if err != nil || n < c.f.Count {
			continue
		}
		until := t.Add(time.Duration(c.f.Block))
		if l.zone.store.Block(ctx, c.key, until, t) != nil {
			continue
		}
		_ = l.zone.store.Reset(ctx, c.key) // a new window after the block
		s.h.blocked(l.zone, c.key, until)
	}
}

// blocked reports a block that started: log, metric, event, and the
// pop3_unblocked event at its end.
func (h *Handler) blocked(zone *limitZone, key string, until time.Time) {
	limit, addr, user := blockSubject(key)
	h.proc.metrics.blockStarted(limit)
	h.logger.Info("blocked", zap.String("limit", limit), zap.String("address", addr), zap.String("user", user),
		zap.Time("until", until), zap.String("zone", zone.name))
	h.emit("pop3_blocked", func() map[string]any {
		return map[string]any{"zone": zone.name, "limit": limit, "address": addr, "user": user, "until": until}
	})
	zone.mu.Lock()
	defer zone.mu.Unlock()
	if t := zone.unblocks[key]; t != nil {
		t.Stop()
	} else if len(zone.unblocks) >= limits.DefaultMaxEntries {
		return // as many as the store keeps: this block ends without an event
	}
	zone.unblocks[key] = time.AfterFunc(until.Sub(now()), func() {
		zone.mu.Lock()
		delete(zone.unblocks, key)
		zone.mu.Unlock()
		zone.unblocked(key, "expired")
	})
}

// unblocked sends pop3_unblocked for a block that ended.
func (z *limitZone) unblocked(key, reason string) {
	h := z.events.Load()
	if h == nil {
		return
	}
	limit, addr, user := blockSubject(key)
	h.emit("pop3_unblocked", func() map[string]any {
		return map[string]any{"zone": z.name, "limit": limit, "address": addr, "user": user, "reason": reason}
	})
}

// unblock lifts a block by the admin API; the expiry event is not sent.
func (z *limitZone) unblock(ctx context.Context, key string) error {
	z.mu.Lock()
	if t := z.unblocks[key]; t != nil {
		t.Stop()
		delete(z.unblocks, key)
	}
	z.mu.Unlock()
	return z.store.Unblock(ctx, key)
}

// loginSucceeded forgets the user+address's failures and remembers the
// address as the user's.
func (s *session) loginSucceeded(user string) {
	e := s.edge
	if e == nil {
		return
	}
	l := e.limits
	if l.FailuresPerUserIP == nil && l.FailuresPerUser == nil {
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, storeTimeout)
	defer cancel()
	key := userIPKey(user, e.addr)
	_ = l.zone.store.Reset(ctx, key)
	if l.FailuresPerUser != nil {
		t := now()
		_ = l.zone.known.Block(ctx, key, t.Add(knownGoodFor), t)
	}
}

// takeUserSessions takes the logged-in session's slots of sessions_per_user
// and sessions_per_user_ip for mailbox; "" or the limit that refused.
func (s *session) takeUserSessions(mailbox string) string {
	e := s.edge
	if e == nil {
		return ""
	}
	l := e.limits
	ctx, cancel := context.WithTimeout(s.ctx, storeTimeout)
	defer cancel()
	t := now()
	var taken []string
	for _, c := range []struct {
		limit string
		max   int64
		key   string
	}{
		{limitSessionsPerUserIP, l.SessionsPerUserIP, userIPKey(mailbox, e.addr)},
		{limitSessionsPerUser, l.SessionsPerUser, userKey(mailbox)},
	} {
		if c.max <= 0 {
			continue
		}
		ok, err := l.zone.store.Acquire(ctx, c.key, e.holder, c.max, t, l.zone.lease)
		if err == nil && !ok || errors.Is(err, errStoreDown) {
			for _, key := range taken { // the client may try again
				_ = l.zone.store.Release(ctx, key, e.holder)
			}
			if err != nil {
				return limitStoreUnavailable
			}
			return c.limit
		}
		if ok {
			taken = append(taken, c.key)
		}
	}
	e.mu.Lock()
	e.held = append(e.held, taken...)
	e.mu.Unlock()
	return ""
}

// inputGuard enforces min_input_rate on the client's input before login:
// from when the proxy starts waiting for a command, each window must bring
// bytes, or the read fails with errInputTooSlow. The time the proxy
// itself takes to answer does not count.
type inputGuard struct {
	net.Conn
	bytes     int64
	window    time.Duration
	got       int64
	windowEnd time.Time // zero: the window starts at the next read
	deadline  time.Time // the session's read deadline
	off       bool      // logged in
}

var errInputTooSlow = errors.New("client input too slow")

// waiting starts a new window: the proxy waits for the next command.
func (g *inputGuard) waiting() { g.got, g.windowEnd = 0, time.Time{} }

func (g *inputGuard) Read(p []byte) (int, error) {
	if g.off {
		return g.Conn.Read(p)
	}
	if t := now(); g.windowEnd.IsZero() || !t.Before(g.windowEnd) {
		// A window that ended while the proxy was busy (dialling for a
		// CRAM-MD5 challenge, asking an auth server) was not the client's.
		g.got, g.windowEnd = 0, t.Add(g.window)
	}
	dl := g.windowEnd
	if !g.deadline.IsZero() && g.deadline.Before(dl) {
		dl = g.deadline
	}
	_ = g.Conn.SetReadDeadline(dl)
	n, err := g.Conn.Read(p)
	g.got += int64(n)
	if g.got >= g.bytes {
		g.got, g.windowEnd = 0, time.Time{}
	}
	var ne net.Error
	if n == 0 && errors.As(err, &ne) && ne.Timeout() && !g.windowEnd.IsZero() && dl.Equal(g.windowEnd) && !now().Before(g.windowEnd) {
		return 0, errInputTooSlow
	}
	return n, err
}
