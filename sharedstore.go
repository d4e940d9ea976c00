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

type redisClient struct{ redis.UniversalClient }

func (c redisClient) Destruct() error { return c.Close() }

// connectRedis returns the client for the app's redis block and the key
// it is kept under in redisClients.
func (a *App) connectRedis(ctx caddy.Context) (redis.UniversalClient, string, error) {
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
		return redisClient{redis.NewUniversalClient(opts)}, nil
	})
	if err != nil {
		return nil, "", err
	}
	return v.(redisClient).UniversalClient, key, nil
}

// errStoreDown refuses what needs the shared state while Redis cannot
// answer and on_store_failure is closed.
var errStoreDown = errors.New("limits store unavailable")

// failoverStore is a zone's store with Redis: each call goes to Redis and,
// when Redis fails, to the instance's own memory (open) or fails with
// errStoreDown (closed). A WARN at most once a minute and a metric tell the
// operator; go-redis reconnects by itself.
type failoverStore struct {
	shared limits.Store
	local  limits.Store
	closed bool
	warned *onceAMinute
	logger *zap.Logger
	errors func()
}

func (f *failoverStore) failed(err error) error {
	if f.errors != nil {
		f.errors()
	}
	if f.warned.allow() {
		f.logger.Warn("limits store (redis) unavailable: deciding with this instance's own state until it answers", zap.Error(err), zap.Bool("closed", f.closed))
	}
	if f.closed {
		return errStoreDown
	}
	return nil
}

func (f *failoverStore) Acquire(ctx context.Context, key, holder string, max int64, now time.Time, lease time.Duration) (bool, error) {
	ok, err := f.shared.Acquire(ctx, key, holder, max, now, lease)
	if err == nil {
		return ok, nil
	}
	if err := f.failed(err); err != nil {
		return false, err
	}
	return f.local.Acquire(ctx, key, holder, max, now, lease)
}

func (f *failoverStore) Release(ctx context.Context, key, holder string) error {
	_ = f.local.Release(ctx, key, holder) // taken there if Redis was down at Acquire
	if err := f.shared.Release(ctx, key, holder); err != nil {
		return f.failed(err)
	}
	return nil
}

func (f *failoverStore) Renew(ctx context.Context, leases []limits.Lease, now time.Time, lease time.Duration) ([]limits.Lease, error) {
	lost, err := f.shared.Renew(ctx, leases, now, lease)
	if err != nil {
		return nil, f.failed(err)
	}
	return lost, nil
}

func (f *failoverStore) Allow(ctx context.Context, key string, rate int64, window time.Duration, now time.Time) (bool, error) {
	ok, err := f.shared.Allow(ctx, key, rate, window, now)
	if err == nil {
		return ok, nil
	}
	if err := f.failed(err); err != nil {
		return false, err
	}
	return f.local.Allow(ctx, key, rate, window, now)
}

func (f *failoverStore) Fail(ctx context.Context, key string, window time.Duration, now time.Time) (int64, error) {
	n, err := f.shared.Fail(ctx, key, window, now)
	if err == nil {
		return n, nil
	}
	if err := f.failed(err); err != nil {
		return 0, err
	}
	return f.local.Fail(ctx, key, window, now)
}

func (f *failoverStore) Reset(ctx context.Context, key string) error {
	_ = f.local.Reset(ctx, key)
	if err := f.shared.Reset(ctx, key); err != nil {
		return f.failed(err)
	}
	return nil
}

func (f *failoverStore) Block(ctx context.Context, key string, until, now time.Time) error {
	if err := f.shared.Block(ctx, key, until, now); err != nil {
		if err := f.failed(err); err != nil {
			return err
		}
		return f.local.Block(ctx, key, until, now)
	}
	return nil
}

func (f *failoverStore) Blocked(ctx context.Context, key string, now time.Time) (time.Time, bool, error) {
	until, blocked, err := f.shared.Blocked(ctx, key, now)
	if err == nil {
		if !blocked { // a block set while Redis was down holds here
			if u, b, _ := f.local.Blocked(ctx, key, now); b {
				return u, true, nil
			}
		}
		return until, blocked, nil
	}
	if err := f.failed(err); err != nil {
		return time.Time{}, false, err
	}
	return f.local.Blocked(ctx, key, now)
}

func (f *failoverStore) Unblock(ctx context.Context, key string) error {
	_ = f.local.Unblock(ctx, key)
	if err := f.shared.Unblock(ctx, key); err != nil {
		return f.failed(err)
	}
	return nil
}

func (f *failoverStore) Blocks(ctx context.Context, now time.Time) ([]limits.Block, error) {
	shared, err := f.shared.Blocks(ctx, now)
	if err != nil {
		if err := f.failed(err); err != nil {
			return nil, err
		}
	}
	local, _ := f.local.Blocks(ctx, now)
	seen := make(map[string]bool, len(shared))
	for _, b := range shared {
		seen[b.Key] = true
	}
	for _, b := range local {
		if !seen[b.Key] {
			shared = append(shared, b)
		}
	}
	return shared, nil
}

var _ limits.Store = (*failoverStore)(nil)
