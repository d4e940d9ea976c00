package pop3

// The limits' state shared through Redis (the pop3 app's redis block): a
// Redis client per configuration, kept across reloads that do not change
// it; a store per zone that falls back to the instance's own memory while
// Redis cannot answer (on_store_failure open) or refuses (closed); and the
// renewal of the session slots' leases.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
)

// sharedLease is a session slot's lease in Redis: an instance that dies
// frees its sessions' slots this long after its last renewal, which runs
// every sharedLease/3.
const sharedLease = time.Minute

// redisClients are the process's Redis clients by configuration: a
// reload with the same redis block keeps the connections, and sessions of
// the replaced config still release their slots through them.
var redisClients = caddy.NewUsagePool()

type redisClient struct {
	redis.UniversalClient
	breaker *storeBreaker
}

func (c redisClient) Destruct() error { return c.Close() }

// connectRedis returns the client for the app's redis block and the key
// it is kept under in redisClients.
func (a *App) connectRedis(ctx caddy.Context) (redisClient, string, error) {
	r := a.Redis
	raw, _ := json.Marshal(r) // with the password resolved: the key never leaves the process
	key := string(raw)
	v, _, err := redisClients.LoadOrNew(key, func() (caddy.Destructor, error) {
		opts := &redis.UniversalOptions{
			Addrs:                 r.Addresses,
			Username:              r.Username,
			Password:              r.Password,
			DB:                    r.DB,
			MasterName:            r.Sentinel,
			ContextTimeoutEnabled: true,
			DialTimeout:           time.Second,
			MaxRetries:            1,
		}
		if r.TLS != nil {
			cfg, err := r.TLS.MakeTLSClientConfig(ctx)
			if err != nil {
				return nil, fmt.Errorf("pop3: redis: tls: %w", err)
			}
			opts.TLSConfig = cfg
		}
		return redisClient{redis.NewUniversalClient(opts), new(storeBreaker)}, nil
	})
	if err != nil {
		return redisClient{}, "", err
	}
	return v.(redisClient), key, nil
}

// errStoreDown refuses what needs the shared state while Redis cannot
// answer and on_store_failure is closed.
var errStoreDown = errors.New("limits store unavailable")

// storeRetryAfter is how long a failed Redis is left alone: calls in that
// time decide at once without it, so that a hung Redis costs a login at
// most one timeout, and only the first login after each pause.
const storeRetryAfter = 2 * time.Second

// storeBreaker is the state of one Redis client that every zone's stores
// share: when it failed last.
type storeBreaker struct {
	downUntil atomic.Int64 // unix nanoseconds
	warned    onceAMinute
}

// failoverStore is a zone's store with Redis: each call goes to Redis and,
// when Redis fails or failed within storeRetryAfter, to the instance's own
// memory (open) or fails with errStoreDown (closed). A WARN at most once a
// minute and a metric tell the operator; go-redis reconnects by itself.
type failoverStore struct {
	shared  limits.Store
	local   limits.Store
	closed  bool
	breaker *storeBreaker
	logger  *zap.Logger
	errors  func()
}

// viaShared runs call on Redis unless the breaker is open. It reports
// whether the answer stands; if not, the caller decides locally unless err
// (errStoreDown, when closed) says to refuse.
func (f *failoverStore) viaShared(call func() error) (done bool, err error) {
	if now().UnixNano() >= f.breaker.downUntil.Load() {
		cerr := call()
		if cerr == nil {
			return true, nil
		}
		f.breaker.downUntil.Store(now().Add(storeRetryAfter).UnixNano())
		if f.errors != nil {
			f.errors()
		}
		if f.breaker.warned.allow() {
			f.logger.Warn("limits store (redis) unavailable: deciding with this instance's own state until it answers",
				zap.Error(cerr), zap.String("on_store_failure", map[bool]string{false: StoreFailureOpen, true: StoreFailureClosed}[f.closed]))
		}
	}
	if f.closed {
		return false, errStoreDown
	}
	return false, nil
}

func (f *failoverStore) Acquire(ctx context.Context, key, holder string, max int64, now time.Time, lease time.Duration) (ok bool, err error) {
	if done, err := f.viaShared(func() (err error) { ok, err = f.shared.Acquire(ctx, key, holder, max, now, lease); return }); done || err != nil {
		return ok, err
	}
	return f.local.Acquire(ctx, key, holder, max, now, lease)
}

func (f *failoverStore) Release(ctx context.Context, key, holder string) error {
	_ = f.local.Release(ctx, key, holder) // taken there if Redis was down at Acquire
	_, err := f.viaShared(func() error { return f.shared.Release(ctx, key, holder) })
	return err
}

func (f *failoverStore) Renew(ctx context.Context, leases []limits.Lease, now time.Time, lease time.Duration) (lost []limits.Lease, err error) {
	_, err = f.viaShared(func() (err error) { lost, err = f.shared.Renew(ctx, leases, now, lease); return })
	return lost, err
}

func (f *failoverStore) Allow(ctx context.Context, key string, rate int64, window time.Duration, now time.Time) (ok bool, err error) {
	if done, err := f.viaShared(func() (err error) { ok, err = f.shared.Allow(ctx, key, rate, window, now); return }); done || err != nil {
		return ok, err
	}
	return f.local.Allow(ctx, key, rate, window, now)
}

func (f *failoverStore) Fail(ctx context.Context, key string, window time.Duration, now time.Time) (n int64, err error) {
	if done, err := f.viaShared(func() (err error) { n, err = f.shared.Fail(ctx, key, window, now); return }); done || err != nil {
		return n, err
	}
	return f.local.Fail(ctx, key, window, now)
}

func (f *failoverStore) Reset(ctx context.Context, key string) error {
	_ = f.local.Reset(ctx, key)
	_, err := f.viaShared(func() error { return f.shared.Reset(ctx, key) })
	return err
}

func (f *failoverStore) Block(ctx context.Context, key string, until, now time.Time) error {
	if done, err := f.viaShared(func() error { return f.shared.Block(ctx, key, until, now) }); done || err != nil {
		return err
	}
	return f.local.Block(ctx, key, until, now)
}

func (f *failoverStore) Blocked(ctx context.Context, key string, now time.Time) (until time.Time, blocked bool, err error) {
	done, err := f.viaShared(func() (err error) { until, blocked, err = f.shared.Blocked(ctx, key, now); return })
	if err != nil {
		return time.Time{}, false, err
	}
	if done && blocked {
		return until, true, nil
	}
	// Not blocked in Redis, or Redis is down: a block set here while it
	// was down still holds.
	return f.local.Blocked(ctx, key, now)
}

func (f *failoverStore) Unblock(ctx context.Context, key string) error {
	_ = f.local.Unblock(ctx, key)
	_, err := f.viaShared(func() error { return f.shared.Unblock(ctx, key) })
	return err
}

func (f *failoverStore) Blocks(ctx context.Context, now time.Time) (blocks []limits.Block, err error) {
	if _, err := f.viaShared(func() (err error) { blocks, err = f.shared.Blocks(ctx, now); return }); err != nil {
		return nil, err
	}
	local, _ := f.local.Blocks(ctx, now)
	seen := make(map[string]bool, len(blocks))
	for _, b := range blocks {
		seen[b.Key] = true
	}
	for _, b := range local {
		if !seen[b.Key] {
			blocks = append(blocks, b)
		}
	}
	return blocks, nil
}

var _ limits.Store = (*failoverStore)(nil)
