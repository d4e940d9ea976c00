package pop3

// Upstream health: the passive check (failures within fail_duration) and
// the active POP3 check (health_interval), both kept per address in the
// UsagePool's peer so that they outlive a reload.

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// checkerStopped forgets what active checks found once none runs: a config
// without health_interval must not inherit an "unhealthy" nothing clears.
func (pe *peer) checkerStopped() {
	if pe.checkers.Add(-1) == 0 {
		pe.unhealthy.Store(false)
		pe.passes.Store(0)
		pe.failsRun.Store(0)
	}
}

// countFailure is the passive health check: a failure counts for
// fail_duration. Not for a template: a client could pick an address that
// fails and take the template down for everyone.
func (p *pool) countFailure(u *poolUpstream) {
	if u.template || p.failFor <= 0 {
		return
	}
	u.peer.fails.add(now())
}

// maxFailsLimit bounds max_fails: the failures a peer remembers.
const maxFailsLimit = 64

// failures remembers when the latest passive failures happened, so that
// each config counts those within its own fail_duration: a reload that
// shortens it takes effect at once, and no timer outlives a config.
type failures struct {
	latest atomic.Int64 // monotonic time of the latest failure; 0: none
	mu     sync.Mutex
	at     [maxFailsLimit]int64 // a ring of monotonic times; 0: empty
	next   int
}

// monotonic makes t a number that wall clock steps do not move; never 0
// for a time after the process started.
func monotonic(t time.Time) int64 { return int64(t.Sub(processStart)) + 1 }

var processStart = time.Now()

func (f *failures) add(t time.Time) {
	m := monotonic(t)
	f.mu.Lock()
	f.at[f.next] = m
	f.next = (f.next + 1) % len(f.at)
	f.mu.Unlock()
	f.latest.Store(m)
}

// since counts the failures at or after t; without one since then it
// takes no lock, as for every upstream of every login.
func (f *failures) since(t time.Time) int64 {
	m := monotonic(t)
	if latest := f.latest.Load(); latest == 0 || latest < m {
		return 0
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var n int64
	for _, a := range f.at {
		if a != 0 && a >= m {
			n++
		}
	}
	return n
}

// startHealthChecker runs the active POP3 health check of the static
// upstreams until ctx, the handler's config, is done. It counts itself on
// each peer before it returns, so that the checker of the config it
// replaces, stopping later, does not clear the state this one keeps.
func (p *pool) startHealthChecker(ctx context.Context, interval, timeout time.Duration, passes, fails int64) {
	var checked []*peer
	for _, u := range p.upstreams {
		if !u.template {
			u.peer.checkers.Add(1)
			checked = append(checked, u.peer)
		}
	}
	go func() {
		defer func() {
			for _, pe := range checked {
				pe.checkerStopped()
			}
		}()
		p.healthChecker(ctx, interval, timeout, passes, fails)
	}()
}

// healthChecker checks every static upstream now and then every interval,
// until ctx is done.
func (p *pool) healthChecker(ctx context.Context, interval, timeout time.Duration, passes, fails int64) {
	defer p.recoverChecker()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		var wg sync.WaitGroup
		for _, u := range p.upstreams {
			if u.template {
				continue
			}
			wg.Add(1)
			go func(u *poolUpstream) {
				defer wg.Done()
				defer p.recoverChecker() // a panic here would end the process
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

func (p *pool) recoverChecker() {
	if r := recover(); r != nil {
		p.logger.Error("health checker panicked", zap.Any("panic", r))
	}
}

// checkOne speaks POP3 to u: connect (with the PROXY header, TLS or STLS as
// configured), expect +OK, QUIT. A check that ctx ended (a reload, a stop)
// proves nothing and counts neither way.
func (p *pool) checkOne(ctx context.Context, u *poolUpstream, timeout time.Duration, passes, fails int64) {
	c, err := connectUpstream(ctx, p.dialer, u.cfg.Address, upstreamOptions{
		tls:           u.tlsConfig,
		startTLS:      u.cfg.StartTLS,
		proxyProtocol: p.proxyProtocol, // a LOCAL header: a haproxy listener greets nobody without one
		skipCAPA:      true,
	}, dialClient{}, now().Add(timeout))
	if ctx.Err() != nil {
		if err == nil {
			c.close()
		}
		return
	}
	if err == nil {
		c.quit()
		p.proc.metrics.health(u.cfg.Address, true)
		u.peer.failsRun.Store(0)
		if u.peer.passes.Add(1) >= passes && u.peer.unhealthy.CompareAndSwap(true, false) {
			p.logger.Info("upstream healthy", zap.String("upstream", u.cfg.Address))
		}
		return
	}
	u.peer.passes.Store(0)
	p.proc.metrics.health(u.cfg.Address, false)
	if u.peer.failsRun.Add(1) >= fails && u.peer.unhealthy.CompareAndSwap(false, true) {
		p.logger.Warn("upstream unhealthy", zap.String("upstream", u.cfg.Address), zap.Error(err))
	}
}
