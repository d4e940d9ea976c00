package pop3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Load-balancing policies (lb_policy).
const (
	PolicyRoundRobin = "round_robin"
	PolicyLeastConn  = "least_conn"
	PolicyRandom     = "random"
	PolicyFirst      = "first"
	PolicyIPHash     = "ip_hash"
	PolicyUserHash   = "user_hash"
)

var knownPolicies = []string{PolicyRoundRobin, PolicyLeastConn, PolicyRandom, PolicyFirst, PolicyIPHash, PolicyUserHash}

// errNoUpstream: every upstream is down, unhealthy or full.
var errNoUpstream = errors.New("no upstream available")

// peers holds per-address state (connections, failures, health) shared by
// every handler and kept across config reloads, as caddy-l4's proxy does.
var peers = caddy.NewUsagePool()

// peer is the state of one upstream address.
type peer struct {
	address   string
	active    atomic.Int64 // sessions connected to it, logged in or not
	fails     atomic.Int64 // passive failures within fail_duration
	unhealthy atomic.Bool  // set by the active health check
	passes    atomic.Int64 // consecutive active checks passed
	failsRun  atomic.Int64 // consecutive active checks failed
}

// Destruct implements caddy.Destructor.
func (*peer) Destruct() error { return nil }

// poolUpstream is one configured upstream, ready to dial.
type poolUpstream struct {
	cfg       *Upstream
	template  bool        // the address holds placeholders, resolved per login
	tlsConfig *tls.Config // nil: plaintext
	peer      *peer       // nil for templates: no address to keep state for
	weight    int
}

// pool chooses an upstream for each session and connects to it.
type pool struct {
	h           *Handler
	upstreams   []*poolUpstream
	policy      string
	tryDuration time.Duration
	maxFails    int64
	failFor     time.Duration
	rr          atomic.Uint64
	logger      *zap.Logger
}

// poolRequest is what a policy may choose by.
type poolRequest struct {
	user     string // "" before login
	clientIP netip.Addr
	repl     *caddy.Replacer // resolves address placeholders; nil: none
}

// available reports whether u may take one more session now.
func (p *pool) available(u *poolUpstream) bool {
	if u.peer == nil {
		return true
	}
	if u.peer.unhealthy.Load() {
		return false
	}
	if p.maxFails > 0 && u.peer.fails.Load() >= p.maxFails {
		return false
	}
	return u.cfg.MaxConnections <= 0 || u.peer.active.Load() < int64(u.cfg.MaxConnections)
}

// reserve counts a session on u unless it is full; the caller releases.
func (u *poolUpstream) reserve() bool {
	if u.peer == nil {
		return true
	}
	for {
		n := u.peer.active.Load()
		if u.cfg.MaxConnections > 0 && n >= int64(u.cfg.MaxConnections) {
			return false
		}
		if u.peer.active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (u *poolUpstream) release() {
	if u.peer != nil {
		u.peer.active.Add(-1)
	}
}

// countFailure is the passive health check: a failure counts for
// fail_duration.
func (p *pool) countFailure(u *poolUpstream) {
	if u.peer == nil || p.failFor <= 0 {
		return
	}
	u.peer.fails.Add(1)
	time.AfterFunc(p.failFor, func() { u.peer.fails.Add(-1) })
}

// order returns the upstreams in the order the policy prefers them.
func (p *pool) order(req poolRequest) []*poolUpstream {
	us := append([]*poolUpstream(nil), p.upstreams...)
	if len(us) < 2 {
		return us // nothing to choose: no hashing or shuffling per login
	}
	switch p.policy {
	case PolicyFirst:
	case PolicyRoundRobin:
		n := int(p.rr.Add(1)-1) % len(us)
		us = append(us[n:], us[:n]...)
	case PolicyRandom:
		weightedShuffle(us)
	case PolicyLeastConn:
		rand.Shuffle(len(us), func(i, j int) { us[i], us[j] = us[j], us[i] })
		sort.SliceStable(us, func(i, j int) bool { return activeOf(us[i]) < activeOf(us[j]) })
	case PolicyIPHash:
		rendezvous(us, req.clientIP.String())
	case PolicyUserHash:
		rendezvous(us, normalizeUser(req.user))
	}
	return us
}

func activeOf(u *poolUpstream) int64 {
	if u.peer == nil {
		return 0
	}
	return u.peer.active.Load()
}

// normalizeUser makes "Alice@Example.COM " and "alice@example.com" the same
// mailbox for user_hash.
func normalizeUser(user string) string { return strings.ToLower(strings.TrimSpace(user)) }

// rendezvous sorts by weighted highest-random-weight score for key: each
// key always prefers the same upstream, and when one leaves only its keys
// move (to their second choice).
func rendezvous(us []*poolUpstream, key string) {
	scores := make(map[*poolUpstream]float64, len(us))
	for _, u := range us {
		h := fnv.New64a()
		h.Write([]byte(key))
		h.Write([]byte{0})
		h.Write([]byte(u.cfg.Address))
		x := splitmix64(h.Sum64())
		unit := (float64(x>>11) + 0.5) / (1 << 53) // in (0, 1)
		scores[u] = float64(u.weight) / -math.Log(unit)
	}
	sort.SliceStable(us, func(i, j int) bool { return scores[us[i]] > scores[us[j]] })
}

// splitmix64 spreads FNV's output over all 64 bits.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// weightedShuffle orders by weight-biased random draws.
func weightedShuffle(us []*poolUpstream) {
	keys := make(map[*poolUpstream]float64, len(us))
	for _, u := range us {
		keys[u] = math.Pow(rand.Float64(), 1/float64(u.weight))
	}
	sort.SliceStable(us, func(i, j int) bool { return keys[us[i]] > keys[us[j]] })
}

// connect tries upstreams in the policy's order until one greets, moving on
// after a failure for up to lb_try_duration. Nothing is retried after the
// login: that happens on the returned connection.
func (p *pool) connect(ctx context.Context, req poolRequest, client dialClient, deadline time.Time) (*upstreamClient, error) {
	start := now()
	var lastErr error
	tried := 0
	for _, u := range p.order(req) {
		if tried > 0 && now().Sub(start) >= p.tryDuration {
			break
		}
		if !p.available(u) {
			continue
		}
		address := u.cfg.Address
		if u.template {
			var err error
			if address, err = resolveAddress(address, req.repl); err != nil {
				lastErr = err
				continue
			}
		}
		if !u.reserve() {
			continue
		}
		tried++
		// dial_timeout bounds the dial and greeting of one attempt, so
		// that a silent upstream leaves time for the next.
		attemptDeadline := now().Add(time.Duration(p.h.DialTimeout))
		if deadline.Before(attemptDeadline) {
			attemptDeadline = deadline
		}
		c, err := p.h.connectUpstream(ctx, address, upstreamOptions{
			tls:           u.tlsConfig,
			startTLS:      u.cfg.StartTLS,
			proxyProtocol: p.h.ProxyProtocol,
			xclient:       p.h.XClient,
		}, client, attemptDeadline)
		if err == nil {
			c.setDeadline(deadline)
			c.onClose = u.release
			if c.xclientRefused != "" {
				p.logger.Warn("upstream refused XCLIENT; it sees the proxy's address", zap.String("upstream", address), zap.String("reply", sanitizeReplyText(c.xclientRefused)))
			}
			return c, nil
		}
		u.release()
		if ctx.Err() != nil {
			return nil, ctx.Err() // the session was kicked: no fault of the upstream
		}
		p.countFailure(u)
		metrics.dialError(u.cfg.Address)
		p.logger.Warn("upstream unavailable", zap.String("upstream", address), zap.Error(err))
		lastErr = err
	}
	if lastErr == nil {
		lastErr = errNoUpstream
	}
	return nil, fmt.Errorf("%w: %w", errNoUpstream, lastErr)
}

// resolveAddress fills placeholders such as {pop3.domain}. An address that
// resolves to no host is an error.
func resolveAddress(template string, repl *caddy.Replacer) (string, error) {
	if repl == nil {
		return "", fmt.Errorf("address %q has placeholders but nothing to fill them", template)
	}
	addr := repl.ReplaceKnown(template, "")
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		addr, err = normalizeUpstreamAddress(addr)
		if err != nil {
			return "", err
		}
		host, _, _ = net.SplitHostPort(addr)
	}
	if host == "" || strings.HasPrefix(host, ".") || strings.Contains(host, "..") || strings.ContainsAny(addr, "{}") {
		return "", fmt.Errorf("address %q resolved to %q, which has no host", template, addr)
	}
	return addr, nil
}

// hostnameSafe keeps a client-supplied value usable only as hostname labels,
// so that a crafted user name cannot point the proxy at another host or port.
func hostnameSafe(s string) string {
	s = strings.ToLower(s)
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.') {
			return ""
		}
	}
	return strings.Trim(s, ".")
}

// healthChecker runs the active POP3 health check of the static upstreams
// until the handler's config is unloaded.
func (p *pool) healthChecker(ctx context.Context, interval, timeout time.Duration, passes, fails int64) {
	defer func() {
		if r := recover(); r != nil {
			p.logger.Error("health checker panicked", zap.Any("panic", r))
		}
	}()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		var wg sync.WaitGroup
		for _, u := range p.upstreams {
			if u.peer == nil {
				continue
			}
			wg.Add(1)
			go func(u *poolUpstream) {
				defer wg.Done()
				p.checkOne(ctx, u, timeout, passes, fails)
			}(u)
		}
		wg.Wait()
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// checkOne speaks POP3 to u: connect (with TLS or STLS as configured),
// expect +OK, QUIT.
func (p *pool) checkOne(ctx context.Context, u *poolUpstream, timeout time.Duration, passes, fails int64) {
	c, err := p.h.connectUpstream(ctx, u.cfg.Address, upstreamOptions{
		tls:      u.tlsConfig,
		startTLS: u.cfg.StartTLS,
		skipCAPA: true,
	}, dialClient{}, now().Add(timeout))
	if err == nil {
		c.quit()
		metrics.health(u.cfg.Address, true)
		u.peer.failsRun.Store(0)
		if u.peer.passes.Add(1) >= passes && u.peer.unhealthy.CompareAndSwap(true, false) {
			p.logger.Info("upstream healthy", zap.String("upstream", u.cfg.Address))
		}
		return
	}
	u.peer.passes.Store(0)
	metrics.health(u.cfg.Address, false)
	if u.peer.failsRun.Add(1) >= fails && u.peer.unhealthy.CompareAndSwap(false, true) {
		p.logger.Warn("upstream unhealthy", zap.String("upstream", u.cfg.Address), zap.Error(err))
	}
}

// buildPool prepares the upstreams: TLS client configs, and state shared
// across reloads for every address without placeholders.
func (h *Handler) buildPool() (*pool, error) {
	p := &pool{
		h:           h,
		policy:      h.LBPolicy,
		tryDuration: time.Duration(h.LBTryDuration),
		failFor:     time.Duration(h.FailDuration),
		logger:      h.logger,
	}
	if p.failFor > 0 {
		p.maxFails = int64(max(h.MaxFails, 1))
	}
	for i, u := range h.Upstream {
		pu := &poolUpstream{cfg: u, template: hasPlaceholder(u.Address), weight: max(u.Weight, 1)}
		if u.TLS != nil {
			cfg, err := u.TLS.MakeTLSClientConfig(h.ctx)
			if err != nil {
				return nil, fmt.Errorf("upstream %d: tls: %w", i, err)
			}
			if cfg == nil {
				// Caddy returns nil for empty settings; a bare `tls` or
				// `starttls` still means TLS, verified against system roots.
				cfg = new(tls.Config)
			}
			pu.tlsConfig = cfg
		}
		if !pu.template {
			v, _, err := peers.LoadOrNew(u.Address, func() (caddy.Destructor, error) {
				return &peer{address: u.Address}, nil
			})
			if err != nil {
				return nil, err
			}
			pu.peer = v.(*peer)
		}
		p.upstreams = append(p.upstreams, pu)
	}
	return p, nil
}

// release drops this config's hold on the shared upstream state.
func (p *pool) release() {
	for _, u := range p.upstreams {
		if u.peer != nil {
			_, _ = peers.Delete(u.peer.address)
		}
	}
}

// optionsFor returns how to reach address: the settings of the configured
// upstream with that address, if any (an auth server may name one).
func (p *pool) optionsFor(address string) upstreamOptions {
	o := upstreamOptions{proxyProtocol: p.h.ProxyProtocol, xclient: p.h.XClient}
	for _, u := range p.upstreams {
		if u.cfg.Address == address {
			o.tls, o.startTLS = u.tlsConfig, u.cfg.StartTLS
		}
	}
	return o
}
