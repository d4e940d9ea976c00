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
	"strconv"
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

// peer is the state of one upstream address (or of one address template,
// whose sessions max_connections counts together).
type peer struct {
	address   string
	active    atomic.Int64 // sessions connected to it, logged in or not
	fails     failures     // passive failures, each config counting those within its fail_duration
	unhealthy atomic.Bool  // set by the active health check
	passes    atomic.Int64 // consecutive active checks passed
	failsRun  atomic.Int64 // consecutive active checks failed
	checkers  atomic.Int64 // active health checkers running for it, in every config
}

// Destruct implements caddy.Destructor.
func (*peer) Destruct() error { return nil }

// poolUpstream is one configured upstream, ready to dial.
type poolUpstream struct {
	cfg       *Upstream
	template  bool        // the address holds placeholders, resolved per login
	hostTmpl  string      // template: the host part, placeholders and all
	port      string      // template: the port, which never comes from a placeholder
	tlsConfig *tls.Config // nil: plaintext; ServerName set for a static address
	peer      *peer       // a template's counts only connections: its addresses vary
	weight    int
}

// pool chooses an upstream for each session and connects to it.
type pool struct {
	proc        *processState // peers, CAPA answers, metrics
	upstreams   []*poolUpstream
	policy      string
	tryDuration time.Duration
	maxFails    int64
	failFor     time.Duration
	rr          atomic.Uint64
	logger      *zap.Logger

	dialer        upstreamDialer
	dialTimeout   time.Duration // bounds one attempt's dial and greeting
	proxyProtocol string        // "", "v1" or "v2"
	xclient       bool

	// tlsOnly: every configured upstream uses TLS, so an auth server's
	// address that matches none of them is not sent a password in plaintext.
	tlsOnly bool
	named   *namedIndex // with auth_http: the configured upstreams by IP address
}

// poolRequest is what a policy may choose by.
type poolRequest struct {
	user     string // "" before login
	clientIP netip.Addr
	repl     *caddy.Replacer // resolves address placeholders; nil: none
}

// available reports whether u may take one more session now.
func (p *pool) available(u *poolUpstream) bool {
	if u.peer.unhealthy.Load() {
		return false
	}
	if p.maxFails > 0 && u.peer.fails.since(now().Add(-p.failFor)) >= p.maxFails {
		return false
	}
	return u.cfg.MaxConnections <= 0 || u.peer.active.Load() < int64(u.cfg.MaxConnections)
}

// reserve counts a session on u unless it is full; the caller releases.
func (u *poolUpstream) reserve() bool {
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

func (u *poolUpstream) release() { u.peer.active.Add(-1) }

// order returns the upstreams in the order the policy prefers them.
func (p *pool) order(req poolRequest) []*poolUpstream {
	us := append([]*poolUpstream(nil), p.upstreams...)
	if len(us) < 2 {
		return us // nothing to choose: no hashing or shuffling per login
	}
	switch p.policy {
	case PolicyFirst:
	case PolicyRoundRobin:
		n := int((p.rr.Add(1) - 1) % uint64(len(us))) // in uint64: an int wraps negative on 32-bit
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

func activeOf(u *poolUpstream) int64 { return u.peer.active.Load() }

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
		if tried > 0 && (now().Sub(start) >= p.tryDuration || ctx.Err() != nil) {
			break // out of time, or the session is ending
		}
		if !p.available(u) {
			continue
		}
		address := u.cfg.Address
		if u.template {
			var err error
			if address, err = resolveAddress(u.hostTmpl, u.port, req.repl); err != nil {
				lastErr = fmt.Errorf("upstream %s: %w", u.cfg.Address, err)
				continue
			}
		}
		if !u.reserve() {
			continue
		}
		tried++
		c, err := p.attempt(ctx, u, address, client, deadline)
		if err == nil {
			return c, nil
		}
		lastErr = err
	}
	if lastErr == nil {
		lastErr = errNoUpstream
	}
	return nil, fmt.Errorf("%w: %w", errNoUpstream, lastErr)
}

// attempt connects to address for u, which the caller reserved: on success
// the connection releases it when closed, on failure it is released and
// the failure counted unless the session ended.
func (p *pool) attempt(ctx context.Context, u *poolUpstream, address string, client dialClient, deadline time.Time) (*upstreamClient, error) {
	// dial_timeout bounds the dial and greeting of one attempt, so that a
	// silent upstream leaves time for the next and is counted as failed.
	attemptDeadline := now().Add(p.dialTimeout)
	if deadline.Before(attemptDeadline) {
		attemptDeadline = deadline
	}
	c, err := connectUpstream(ctx, p.dialer, address, p.optionsOf(u), client, attemptDeadline)
	if err != nil {
		u.release()
		// The session's end (login_timeout, its context's deadline) may cut
		// an attempt short, and a client can time its login so: that is no
		// failure of the upstream, which would otherwise be taken out of
		// service. The context's timer may not have fired yet.
		if end, ok := ctx.Deadline(); ctx.Err() != nil || ok && !now().Before(end) {
			return nil, err // the session ended, not the upstream: no failure to count
		}
		p.countFailure(u)
		p.proc.metrics.dialError(u.cfg.Address)
		p.logger.Warn("upstream unavailable", zap.String("upstream", address), zap.Error(err))
		return nil, err
	}
	c.onClose = u.release
	c.setDeadline(deadline)
	p.warnXCLIENT(c)
	return c, nil
}

func (p *pool) warnXCLIENT(c *upstreamClient) {
	if c.xclientRefused != "" {
		p.logger.Warn("upstream refused XCLIENT; it sees the proxy's address", zap.String("upstream", c.address), zap.String("reply", sanitizeReplyText(c.xclientRefused)))
	}
}

// optionsOf returns how a session reaches u.
func (p *pool) optionsOf(u *poolUpstream) upstreamOptions {
	return upstreamOptions{
		tls:           u.tlsConfig,
		startTLS:      u.cfg.StartTLS,
		proxyProtocol: p.proxyProtocol,
		xclient:       p.xclient,
		capas:         p.proc.capas,
	}
}

// resolveAddress fills the placeholders of a host template such as
// pop.{pop3.domain}. Each value, whoever chose it (a user name, an SNI),
// must be host-name labels, and so must the host it makes, which must not
// be an IP address either; the port is the template's. So a client picks
// at most a host name, never an address, a port or another syntax.
func resolveAddress(hostTmpl, port string, repl *caddy.Replacer) (string, error) {
	if repl == nil {
		return "", errors.New("address has placeholders but nothing to fill them")
	}
	host, err := repl.ReplaceFunc(hostTmpl, func(key string, val any) (any, error) {
		v := strings.ToLower(caddy.ToString(val))
		if !hostLabels(v) {
			return nil, fmt.Errorf("placeholder {%s} is %q, not a host name", key, truncate(v, 64))
		}
		return v, nil
	})
	if err != nil {
		return "", err
	}
	if !hostLabels(host) || !hostName(host) {
		return "", fmt.Errorf("host %q is no host name", truncate(host, 300))
	}
	return net.JoinHostPort(host, port), nil
}

// hostLabels reports whether s is dot-separated DNS labels: letters, digits
// and inner hyphens, at most 63 bytes each, 253 in all.
func hostLabels(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// hostName reports whether labels name a host rather than an address: the
// last label starts with a letter (no top-level domain is numeric), which
// also refuses the forms "10.0.0.5", "2130706433" and "0x7f.1" that C
// resolvers take for IPv4 addresses.
func hostName(labels string) bool {
	last := labels[strings.LastIndexByte(labels, '.')+1:]
	c := last[0] | 0x20
	return c >= 'a' && c <= 'z'
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// splitTemplate parses an address template into its host part and its port
// (defaultPort when it has none). The port must be digits: a placeholder
// there would let a client choose it.
func splitTemplate(addr, defaultPort string) (hostTmpl, port string, err error) {
	depth, colon, colons := 0, -1, 0
	for i := 0; i < len(addr); i++ {
		switch addr[i] {
		case '{':
			depth++
		case '}':
			depth--
		case ':':
			if depth == 0 {
				colon = i
				colons++
			}
		}
	}
	hostTmpl, port = addr, defaultPort
	if colons > 1 {
		return "", "", fmt.Errorf("address %q: an IPv6 address has no place for placeholders", addr)
	}
	if colon >= 0 {
		hostTmpl, port = addr[:colon], addr[colon+1:]
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || strings.TrimLeft(port, "0123456789") != "" {
			return "", "", fmt.Errorf("address %q: the port must be a number (placeholders may fill only the host)", addr)
		}
	}
	if hostTmpl == "" || !hasPlaceholder(hostTmpl) {
		return "", "", fmt.Errorf("address %q: placeholders may fill only the host", addr)
	}
	return hostTmpl, port, nil
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

// poolConfig is what the pool takes from the handler's options.
type poolConfig struct {
	upstreams     []*Upstream
	policy        string
	tryDuration   time.Duration
	failFor       time.Duration // fail_duration
	maxFails      int
	dialer        upstreamDialer
	dialTimeout   time.Duration
	proxyProtocol string
	xclient       bool
	named         bool // an auth server names each login's upstream by address
}

// newPool prepares the upstreams: TLS client configs, and state shared
// across reloads for every address (and template). ctx provides what TLS
// client configs load (trust pools, certificates).
func newPool(ctx caddy.Context, proc *processState, cfg poolConfig, logger *zap.Logger) (_ *pool, err error) {
	p := &pool{
		proc:          proc,
		policy:        cfg.policy,
		tryDuration:   cfg.tryDuration,
		failFor:       cfg.failFor,
		logger:        logger,
		tlsOnly:       len(cfg.upstreams) > 0,
		dialer:        cfg.dialer,
		dialTimeout:   cfg.dialTimeout,
		proxyProtocol: cfg.proxyProtocol,
		xclient:       cfg.xclient,
	}
	defer func() {
		if err != nil {
			p.release() // the references taken so far
		}
	}()
	if p.failFor > 0 {
		p.maxFails = int64(max(cfg.maxFails, 1))
	}
	for i, u := range cfg.upstreams {
		pu := &poolUpstream{cfg: u, template: hasPlaceholder(u.Address), weight: max(u.Weight, 1)}
		if pu.template {
			port := "110"
			if u.TLS != nil && !u.StartTLS {
				port = "995"
			}
			if pu.hostTmpl, pu.port, err = splitTemplate(u.Address, port); err != nil {
				return nil, fmt.Errorf("upstream %d: %w", i, err)
			}
		}
		if u.TLS != nil {
			tlsCfg, err := u.TLS.MakeTLSClientConfig(ctx)
			if err != nil {
				return nil, fmt.Errorf("upstream %d: tls: %w", i, err)
			}
			if tlsCfg == nil {
				// Caddy returns nil for empty settings; a bare `tls` or
				// `starttls` still means TLS, verified against system roots.
				tlsCfg = new(tls.Config)
			}
			if tlsCfg.ServerName == "" && !tlsCfg.InsecureSkipVerify && !pu.template {
				// The configured name, also when an auth server names the
				// upstream by its IP address.
				tlsCfg.ServerName, _, _ = net.SplitHostPort(u.Address)
			}
			pu.tlsConfig = tlsCfg
		} else {
			p.tlsOnly = false
		}
		v, _, err := p.proc.peers.LoadOrNew(u.Address, func() (caddy.Destructor, error) {
			return &peer{address: u.Address}, nil
		})
		if err != nil {
			return nil, err
		}
		pu.peer = v.(*peer)
		p.upstreams = append(p.upstreams, pu)
	}
	if cfg.named {
		p.named = newNamedIndex(p)
	}
	return p, nil
}

// release drops this config's hold on the shared upstream state.
func (p *pool) release() {
	for _, u := range p.upstreams {
		_, _ = p.proc.peers.Delete(u.peer.address)
	}
}

// connectWithTLS connects to an address an authenticator named for a user
// together with TLS settings of its own (a passwd-file's ssl= or
// starttls=); the configured upstreams' settings do not apply.
func (p *pool) connectWithTLS(ctx context.Context, address string, cfg *tls.Config, startTLS bool, client dialClient, deadline time.Time) (*upstreamClient, error) {
	c, err := connectUpstream(ctx, p.dialer, address, upstreamOptions{tls: cfg, startTLS: startTLS, proxyProtocol: p.proxyProtocol, xclient: p.xclient, capas: p.proc.capas}, client, deadline)
	if err == nil {
		p.warnXCLIENT(c)
	}
	return c, err
}

// connectNamed connects to the address (IP:port) an auth server named. The
// configured upstream at that address, its host name resolved, lends its
// TLS or STLS (verified against its name), max_connections and health. An
// address that is no configured upstream is dialled in plaintext, as NGINX
// does, unless every configured upstream uses TLS, or one with TLS has no
// address known: a password never goes out in plaintext because the auth
// server and the config disagree, or DNS failed.
func (p *pool) connectNamed(ctx context.Context, address string, client dialClient, deadline time.Time) (*upstreamClient, error) {
	u, sure := p.named.lookup(ctx, address, deadline)
	if u == nil {
		switch {
		case p.tlsOnly:
			return nil, fmt.Errorf("%w: the auth server named %s, which is no configured upstream, and every configured upstream uses TLS", errNoUpstream, address)
		case !sure:
			// It may be an upstream with TLS whose name does not resolve now.
			return nil, fmt.Errorf("%w: the auth server named %s, and not every configured upstream with TLS could be resolved to compare", errNoUpstream, address)
		}
		c, err := connectUpstream(ctx, p.dialer, address, upstreamOptions{proxyProtocol: p.proxyProtocol, xclient: p.xclient, capas: p.proc.capas}, client, deadline)
		if err == nil {
			p.warnXCLIENT(c)
		}
		return c, err
	}
	if !p.available(u) || !u.reserve() {
		return nil, fmt.Errorf("%w: upstream %s (%s) is down or full", errNoUpstream, u.cfg.Address, address)
	}
	return p.attempt(ctx, u, address, client, deadline)
}

// namedIndex finds the configured upstream behind an IP address and port
// that an auth server names. Host names are resolved again when the entry
// found is older than namedTTL (in the background: the login goes on with
// it), and when no entry is found, at most every namedRetry.
type namedIndex struct {
	p           *pool
	static      bool                                                                  // every configured host is an IP address: nothing to resolve
	resolveHost func(ctx context.Context, network, host string) ([]netip.Addr, error) // processState.lookupHost when built
	mu          sync.Mutex
	byAddr      map[netip.AddrPort]*poolUpstream // replaced, never changed
	complete    bool                             // byAddr holds an address of every upstream with TLS
	at          time.Time                        // when byAddr was resolved; zero: never
	running     chan struct{}                    // closed when the running lookup ends; nil: none
}

const (
	namedTTL   = time.Minute
	namedRetry = 5 * time.Second
)

func newNamedIndex(p *pool) *namedIndex {
	ix := &namedIndex{p: p, static: true, resolveHost: p.proc.lookupHost, byAddr: map[netip.AddrPort]*poolUpstream{}}
	for _, u := range p.upstreams {
		if u.template {
			continue
		}
		if ap, err := netip.ParseAddrPort(u.cfg.Address); err == nil {
			ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
			if _, dup := ix.byAddr[ap]; !dup {
				ix.byAddr[ap] = u
			}
		} else {
			ix.static = false
		}
	}
	ix.complete = ix.static
	if !ix.static {
		ix.mu.Lock()
		ix.refreshLocked() // so that the first login finds the names resolved
		ix.mu.Unlock()
	}
	return ix
}

// lookup returns the configured upstream at address, or nil; sure is
// whether a nil can be trusted: every upstream with TLS has an address.
func (ix *namedIndex) lookup(ctx context.Context, address string, deadline time.Time) (u *poolUpstream, sure bool) {
	ap, err := netip.ParseAddrPort(address)
	if ix == nil || err != nil {
		return nil, true
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	ix.mu.Lock()
	u, sure = ix.byAddr[ap], ix.complete
	age := now().Sub(ix.at)
	if ix.static || (u != nil && age < namedTTL) || (u == nil && !ix.at.IsZero() && age < namedRetry) {
		ix.mu.Unlock()
		return u, sure
	}
	done := ix.refreshLocked()
	ix.mu.Unlock()
	if u != nil {
		return u, true
	}
	wait := time.NewTimer(time.Until(deadline))
	defer wait.Stop()
	select {
	case <-done:
	case <-ctx.Done():
		return nil, false
	case <-wait.C:
		return nil, false
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	return ix.byAddr[ap], ix.complete
}

// refreshLocked starts resolving the configured host names unless that is
// running already, and returns what closes when it ends.
func (ix *namedIndex) refreshLocked() chan struct{} {
	if ix.running != nil {
		return ix.running
	}
	done := make(chan struct{})
	ix.running = done
	old := ix.byAddr
	go func() {
		m := ix.resolve(old)
		found := make(map[*poolUpstream]bool, len(m))
		for _, u := range m {
			found[u] = true
		}
		complete := true
		for _, u := range ix.p.upstreams {
			complete = complete && (u.tlsConfig == nil || u.template || found[u])
		}
		ix.mu.Lock()
		ix.byAddr, ix.complete, ix.at, ix.running = m, complete, now(), nil
		ix.mu.Unlock()
		close(done)
	}()
	return done
}

// resolve maps every address of every static upstream to it. A name that
// does not resolve now keeps the addresses it had.
func (ix *namedIndex) resolve(old map[netip.AddrPort]*poolUpstream) map[netip.AddrPort]*poolUpstream {
	ctx, cancel := context.WithTimeout(context.Background(), ix.p.dialTimeout)
	defer cancel()
	m := make(map[netip.AddrPort]*poolUpstream, len(old))
	add := func(ap netip.AddrPort, u *poolUpstream) {
		if _, dup := m[ap]; !dup {
			m[ap] = u
		}
	}
	for _, u := range ix.p.upstreams {
		if u.template {
			continue
		}
		host, portText, _ := net.SplitHostPort(u.cfg.Address)
		port, _ := strconv.ParseUint(portText, 10, 16)
		if ip, err := netip.ParseAddr(host); err == nil {
			add(netip.AddrPortFrom(ip.Unmap(), uint16(port)), u)
			continue
		}
		ips, err := ix.resolveHost(ctx, "ip", host)
		if err != nil {
			ix.p.logger.Warn("resolving an upstream to match the auth server's addresses", zap.String("upstream", u.cfg.Address), zap.Error(err))
			for ap, v := range old {
				if v == u {
					add(ap, u)
				}
			}
			continue
		}
		for _, ip := range ips {
			add(netip.AddrPortFrom(ip.Unmap(), uint16(port)), u)
		}
	}
	return m
}
