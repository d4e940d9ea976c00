// Package redisstore is a [limits.Store] in Redis (or Valkey), so that
// several proxies share their limits: a brute force spread over them counts
// once, and a per-user session limit holds across them.
//
// Every method is one Lua script or one command on one key, so it is atomic
// and, in Redis Cluster, stays within one hash slot. All state expires by
// Redis TTLs (PEXPIRE, SET PX): nothing needs sweeping. Times come from the
// caller's now, not from Redis TIME, and are kept in Unix microseconds
// (exact in Lua's numbers up to the year 2255); a TTL is relative (the
// end a caller computed minus its now, plus a few seconds of grace), so
// Redis's own clock does not matter, but the proxies' clocks must agree
// (NTP) to well within the shortest window, lease and block, since one
// proxy's now decides what another one wrote.
//
// Keys are the configured prefix, a kind and the caller's key:
//
//	<prefix>session:<key>   sorted set: members are holders, scores lease ends
//	<prefix>bucket:<key>    string: when the bucket is full again
//	<prefix>failures:<key>  hash: n (the count) and end (the window's end)
//	<prefix>block:<key>     string: when the block ends
//
// A user name appears in a key only as the caller put it there; nothing
// else about a login (never a password) is stored.
package redisstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
)

// Defaults of [Options].
const (
	DefaultKeyPrefix = "caddy-pop3:"
	DefaultTimeout   = 200 * time.Millisecond
	DefaultMaxBlocks = 10_000
)

// Options configure a [Store]. The zero value means the defaults.
type Options struct {
	// KeyPrefix starts every key, so that several proxies' zones, or other
	// applications, can share one Redis. Default: "caddy-pop3:".
	KeyPrefix string
	// Timeout bounds each call, reconnecting and retries included. The
	// client must be made with ContextTimeoutEnabled, or with dial, read
	// and write timeouts no longer than this, for a hung server to be
	// noticed in time. Default: 200ms.
	Timeout time.Duration
	// MaxBlocks caps the entries Blocks returns. Default: 10,000.
	MaxBlocks int
}

// Store is a [limits.Store] on a go-redis client: a single server, Sentinel
// (a failover client) or Cluster, as [redis.NewUniversalClient] makes it
// from its addresses and MasterName. The caller owns the client and closes
// it.
type Store struct {
	c         redis.UniversalClient
	prefix    string
	timeout   time.Duration
	maxBlocks int
}

// New returns a Store on c.
func New(c redis.UniversalClient, o Options) *Store {
	s := &Store{c: c, prefix: o.KeyPrefix, timeout: o.Timeout, maxBlocks: o.MaxBlocks}
	if s.prefix == "" {
		s.prefix = DefaultKeyPrefix
	}
	if s.timeout <= 0 {
		s.timeout = DefaultTimeout
	}
	if s.maxBlocks <= 0 {
		s.maxBlocks = DefaultMaxBlocks
	}
	return s
}

func (s *Store) key(kind, key string) string { return s.prefix + kind + ":" + key }

// micros is t in Unix microseconds, as a script argument.
func micros(t time.Time) string { return strconv.FormatInt(t.UnixMicro(), 10) }

// ttlGrace is how long a key outlives the end of its state. The stored end
// (a lease's, a window's, a block's, a full bucket's) decides, so a key
// that lives on does no harm, while one that vanished early would lose
// state that a proxy whose clock is a little behind, or a caller that
// stalled, still counts on.
const ttlGrace = 5 * time.Second

// ttl is the time to live of state that ends at end when it is now: until
// then, plus ttlGrace, rounded up to a whole millisecond.
func ttl(end, now time.Time) time.Duration {
	return (max(end.Sub(now), 0) + ttlGrace + time.Millisecond - 1).Truncate(time.Millisecond)
}

// script is a redis.Script of src whose GRACE_MS is ttlGrace in
// milliseconds.
func script(src string) *redis.Script {
	return redis.NewScript(strings.ReplaceAll(src, "GRACE_MS", strconv.FormatInt(ttlGrace.Milliseconds(), 10)))
}

// withTimeout bounds one call.
func (s *Store) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// expireAtLast is the end of the session scripts: the set lives as long
// as its longest lease (and ttlGrace). KEYS[1] is the set, ARGV[1] now.
const expireAtLast = `
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
	redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - tonumber(ARGV[1])) / 1000) + GRACE_MS)
end
`

// acquireScript: ARGV now, lease end, max, holder. Expired holders go
// first; a present holder is renewed whatever the count.
var acquireScript = script(`
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
	return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
` + expireAtLast + `
return 1
`)

// renewScript: ARGV now, lease end, holder. A holder whose lease has ended
// is removed, not renewed.
var renewScript = script(`
local score = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not score then
	return 0
end
if tonumber(score) <= tonumber(ARGV[1]) then
	redis.call('ZREM', KEYS[1], ARGV[3])
	return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
` + expireAtLast + `
return 1
`)

// allowScript keeps the bucket as limits.Memory does (the generic cell
// rate algorithm): the time the bucket is full again, moved on by step per
// token. ARGV now, step, window, all in microseconds. The key expires when
// the bucket is full, which is what a missing key means.
var allowScript = script(`
local now = tonumber(ARGV[1])
local full = tonumber(redis.call('GET', KEYS[1])) or now
if full < now then
	full = now
end
local tat = full + tonumber(ARGV[2])
if tat - now > tonumber(ARGV[3]) then
	return 0
end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + GRACE_MS)
return 1
`)

// failScript is INCR with a PEXPIRE on the first failure of a window, but
// with the window's end kept beside the count, since the end is the
// caller's clock's. ARGV now, window end, window in milliseconds.
var failScript = script(`
local e = tonumber(redis.call('HGET', KEYS[1], 'end'))
if not e or e <= tonumber(ARGV[1]) then
	redis.call('HSET', KEYS[1], 'n', 1, 'end', ARGV[2])
	redis.call('PEXPIRE', KEYS[1], ARGV[3])
	return 1
end
return redis.call('HINCRBY', KEYS[1], 'n', 1)
`)

// Acquire implements [limits.Store] with a sorted set per key.
func (s *Store) Acquire(ctx context.Context, key, holder string, max int64, now time.Time, lease time.Duration) (bool, error) {
	if err := limits.CheckLease(holder, lease); err != nil {
		return false, err
	}
	if max < 1 {
		return false, nil
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	n, err := acquireScript.Run(ctx, s.c, []string{s.key("session", key)}, micros(now), micros(now.Add(lease)), max, holder).Int()
	if err != nil {
		return false, fmt.Errorf("redisstore: acquiring a session slot: %w", err)
	}
	return n == 1, nil
}

// Release implements [limits.Store]: ZREM, and Redis deletes a set that
// falls empty.
func (s *Store) Release(ctx context.Context, key, holder string) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := s.c.ZRem(ctx, s.key("session", key), holder).Err(); err != nil {
		return fmt.Errorf("redisstore: releasing a session slot: %w", err)
	}
	return nil
}

// Renew implements [limits.Store]: one script per lease, all in one
// pipeline (in a Cluster, one per node), so one round trip renews every
// session of a proxy. Where Redis no longer has the script cached, the
// script is loaded and the pipeline run again; renewing twice does no harm.
func (s *Store) Renew(ctx context.Context, leases []limits.Lease, now time.Time, lease time.Duration) ([]limits.Lease, error) {
	if lease <= 0 {
		return nil, fmt.Errorf("redisstore: renewing for %v: %w", lease, limits.ErrInvalid)
	}
	if len(leases) == 0 {
		return nil, nil
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	nowArg, endArg := micros(now), micros(now.Add(lease))
	run := func() ([]*redis.Cmd, error) {
		cmds := make([]*redis.Cmd, len(leases))
		_, err := s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, l := range leases {
				cmds[i] = renewScript.EvalSha(ctx, p, []string{s.key("session", l.Key)}, nowArg, endArg, l.Holder)
			}
			return nil
		})
		return cmds, err
	}
	cmds, err := run()
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		if err = renewScript.Load(ctx, s.c).Err(); err == nil {
			cmds, err = run()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("redisstore: renewing %d session slots: %w", len(leases), err)
	}
	var lost []limits.Lease
	for i, cmd := range cmds {
		if n, _ := cmd.Int(); n != 1 {
			lost = append(lost, leases[i])
		}
	}
	return lost, nil
}

// Allow implements [limits.Store]. Times are kept in microseconds, so a
// step (window/rate) below one microsecond counts as one.
func (s *Store) Allow(ctx context.Context, key string, rate int64, window time.Duration, now time.Time) (bool, error) {
	if rate < 1 || window <= 0 {
		return false, fmt.Errorf("redisstore: allowing %d per %v: %w", rate, window, limits.ErrInvalid)
	}
	step := max(window.Microseconds()/rate, 1)
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	n, err := allowScript.Run(ctx, s.c, []string{s.key("bucket", key)}, micros(now), step, window.Microseconds()).Int()
	if err != nil {
		return false, fmt.Errorf("redisstore: taking a token: %w", err)
	}
	return n == 1, nil
}

// Fail implements [limits.Store].
func (s *Store) Fail(ctx context.Context, key string, window time.Duration, now time.Time) (int64, error) {
	if window <= 0 {
		return 0, fmt.Errorf("redisstore: counting failures per %v: %w", window, limits.ErrInvalid)
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	end := now.Add(window)
	n, err := failScript.Run(ctx, s.c, []string{s.key("failures", key)}, micros(now), micros(end), ttl(end, now).Milliseconds()).Int64()
	if err != nil {
		return 0, fmt.Errorf("redisstore: counting a failure: %w", err)
	}
	return n, nil
}

// Reset implements [limits.Store].
func (s *Store) Reset(ctx context.Context, key string) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := s.c.Del(ctx, s.key("failures", key)).Err(); err != nil {
		return fmt.Errorf("redisstore: resetting failures: %w", err)
	}
	return nil
}

// Block implements [limits.Store]: SET with the end as value and PX until
// then, or DEL for an end not after now.
func (s *Store) Block(ctx context.Context, key string, until, now time.Time) error {
	if until.UnixMicro() <= 0 {
		return fmt.Errorf("redisstore: blocking until %v: %w", until, limits.ErrInvalid)
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	var err error
	if until.After(now) {
		err = s.c.Set(ctx, s.key("block", key), micros(until), ttl(until, now)).Err()
	} else {
		err = s.c.Del(ctx, s.key("block", key)).Err()
	}
	if err != nil {
		return fmt.Errorf("redisstore: blocking: %w", err)
	}
	return nil
}

// Blocked implements [limits.Store]: the stored end decides, since the
// key outlives it by ttlGrace.
func (s *Store) Blocked(ctx context.Context, key string, now time.Time) (time.Time, bool, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	v, err := s.c.Get(ctx, s.key("block", key)).Result()
	if errors.Is(err, redis.Nil) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, fmt.Errorf("redisstore: looking up a block: %w", err)
	}
	until, ok := parseMicros(v)
	if !ok || !now.Before(until) {
		return time.Time{}, false, nil
	}
	return until, true, nil
}

func parseMicros(v string) (time.Time, bool) {
	us, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.UnixMicro(us), true
}

// Unblock implements [limits.Store].
func (s *Store) Unblock(ctx context.Context, key string) error {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	if err := s.c.Del(ctx, s.key("block", key)).Err(); err != nil {
		return fmt.Errorf("redisstore: unblocking: %w", err)
	}
	return nil
}

// Blocks implements [limits.Store] by SCAN over the block keys (on every
// master of a Cluster), then GET of what it found. It returns at most
// MaxBlocks entries, the first ones SCAN meets, sorted by key. SCAN walks
// the whole key space, so this is for the admin API, not for every login;
// it is bounded by the timeout like any other call.
func (s *Store) Blocks(ctx context.Context, now time.Time) ([]limits.Block, error) {
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	var (
		mu   sync.Mutex
		list []limits.Block
	)
	scan := func(ctx context.Context, c redis.UniversalClient) error {
		prefix := s.key("block", "")
		iter := c.Scan(ctx, 0, globEscape(prefix)+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
			if len(keys) >= s.maxBlocks {
				break
			}
		}
		if err := iter.Err(); err != nil {
			return err
		}
		cmds := make([]*redis.StringCmd, len(keys))
		if _, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, k := range keys {
				cmds[i] = p.Get(ctx, k)
			}
			return nil
		}); err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		for i, cmd := range cmds {
			if until, ok := parseMicros(cmd.Val()); ok && now.Before(until) {
				list = append(list, limits.Block{Key: strings.TrimPrefix(keys[i], prefix), Until: until})
			}
		}
		return nil
	}
	var err error
	if cc, ok := s.c.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return scan(ctx, c) })
	} else {
		err = scan(ctx, s.c)
	}
	if err != nil {
		return nil, fmt.Errorf("redisstore: listing blocks: %w", err)
	}
	slices.SortFunc(list, func(a, b limits.Block) int { return cmp.Compare(a.Key, b.Key) })
	if len(list) > s.maxBlocks { // several Cluster masters
		list = list[:s.maxBlocks]
	}
	return list, nil
}

// globEscape quotes the glob characters of SCAN's MATCH in s.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

var _ limits.Store = (*Store)(nil)
