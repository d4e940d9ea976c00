package pop3

// Sessions across a cluster (issue 15): every instance registers its live
// sessions in Redis, so that the admin API of any instance lists them all,
// and a kick reaches the owning instance through Redis pub/sub.
//
// The registry is a hash per instance, <key_prefix>sessions:<instance>,
// with a field per session id that holds a clusterSession in JSON, and a
// PEXPIRE that the instance's loop refreshes: the hash of an instance that
// died expires within sessionTTL, and nothing needs cleaning up. The
// sorted set <key_prefix>instances names the instances (scored by their
// last write, unix milliseconds), so that a listing needs no SCAN, which a
// Redis Cluster would have to run on every master.
//
// A login adds no Redis round trip: the session registry notes the
// sessions that start, change (login, STLS) or end, and the app's loop
// writes what changed every sessionSync in one pipeline (HSET, HDEL,
// PEXPIRE). A session thus shows in other instances' lists within
// sessionSync, as it was then; one that starts and ends in between never
// reaches Redis. The loop rewrites the whole hash (DEL and HSET in MULTI)
// when it starts, after an error, when it finds the hash gone (Redis
// restarted, or the loop stalled past the TTL) and every sessionResync, so
// that Redis comes back to the instance's own truth whatever was lost.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// The session registry's timing; an App's sessionSync and sessionTTL may
// be shorter in tests.
const (
	defaultSessionSync = time.Second      // how often changes are written
	defaultSessionTTL  = 15 * time.Second // how long a silent instance's sessions stay listed
	sessionResync      = time.Minute      // how often the whole hash is rewritten
	instancesTTL       = time.Hour        // how long a silent instance stays in <key_prefix>instances
	sessionWriteBound  = 5 * time.Second  // bound of one write of the loop, as for the leases
)

// clusterSession is what the instances of a cluster know of each other's
// sessions, and what GET /pop3/sessions?cluster=1 lists: never a password,
// and no byte counts, which change too often to share.
type clusterSession struct {
	sessionInfo
	Instance string `json:"instance"`
}

// listed is what the cluster's session list shows of s, without the
// socket's byte counts that view asks the kernel for.
func (s *session) listed(instance string) clusterSession {
	return clusterSession{sessionInfo: s.info(), Instance: instance}
}

// kickMessage is what an instance publishes on <key_prefix>sessions:kick
// for the others to close their sessions that match.
type kickMessage struct {
	Origin   string `json:"origin"`   // the publishing process's token: it closed its own already
	Instance string `json:"instance"` // the publishing instance, for the log
	sessionFilter
}

func (a *App) sessionsKey(instance string) string { return a.Redis.KeyPrefix + "sessions:" + instance }
func (a *App) instancesKey() string               { return a.Redis.KeyPrefix + "instances" }
func (a *App) kickChannel() string                { return a.Redis.KeyPrefix + "sessions:kick" }
func (a *App) redisTimeout() time.Duration        { return time.Duration(a.Redis.Timeout) }

// startSessions registers this process's sessions in Redis and subscribes
// to other instances' kicks until ctx ends. The subscription is confirmed
// before Start returns (or the Redis timeout passed; go-redis then keeps
// trying): a reload's new app subscribes before the old one unsubscribes,
// so no kick is lost in between, and one that both get is done once.
func (a *App) startSessions(ctx context.Context) {
	a.proc.sessions.track(true)
	sctx, cancel := context.WithTimeout(ctx, a.redisTimeout())
	a.pubsub = a.client.Subscribe(sctx, a.kickChannel())
	_, err := a.pubsub.Receive(sctx) // the subscription's confirmation
	cancel()
	if err != nil {
		a.storeFailed(err)
	}
	msgs := a.pubsub.Channel()
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		a.syncSessions(ctx)
	}()
	go func() {
		defer a.wg.Done()
		a.receiveKicks(ctx, msgs)
	}()
}

// stopSessions ends the subscription. Unless next (the process's running
// app, if any) writes the same registry entry, it removes this instance's
// sessions from Redis, and with no next that writes any, it stops noting
// session changes.
func (a *App) stopSessions(next *App) {
	if a.pubsub != nil {
		_ = a.pubsub.Close()
		a.pubsub = nil
	}
	if next == nil || next.client == nil {
		a.proc.sessions.track(false)
	} else if next.sameRegistry(a) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.redisTimeout())
	defer cancel()
	pipe := a.client.Pipeline()
	pipe.Del(ctx, a.sessionsKey(a.Instance))
	pipe.ZRem(ctx, a.instancesKey(), a.Instance)
	if _, err := pipe.Exec(ctx); err != nil {
		a.logger.Debug("removing this instance's sessions from redis", zap.Error(err))
	}
}

// sameRegistry reports whether a and b register sessions under the same
// key of the same Redis.
func (a *App) sameRegistry(b *App) bool {
	ra, rb := a.Redis, b.Redis
	return a.Instance == b.Instance && slices.Equal(ra.Addresses, rb.Addresses) && ra.DB == rb.DB &&
		ra.Sentinel == rb.Sentinel && ra.KeyPrefix == rb.KeyPrefix
}

// storeFailed counts an error of the session registry and warns at most
// once a minute.
func (a *App) storeFailed(err error) {
	a.proc.metrics.storeError()
	if a.sessionsWarned.allow() {
		a.logger.Warn("session registry (redis) unavailable: other instances do not see or reach this instance's sessions until it answers", zap.Error(err))
	}
}

// syncSessions writes the changes of this process's sessions every
// sessionSync while the app is the process's running one.
func (a *App) syncSessions(ctx context.Context) {
	defer func() {
		if p := recover(); p != nil {
			a.logger.Error("session registry loop panicked", zap.Any("panic", p), zap.Stack("stack"))
		}
	}()
	y := &sessionSyncer{a: a, key: a.sessionsKey(a.Instance), full: true}
	t := time.NewTicker(a.sessionSync)
	defer t.Stop()
	for {
		if a.proc.cluster.Load() == a { // else a reload's successor writes them
			wctx, cancel := context.WithTimeout(ctx, sessionWriteBound)
			err := y.tick(wctx)
			cancel()
			if err != nil && ctx.Err() == nil {
				a.storeFailed(err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sessionSyncer is the state of the registry loop of one app.
type sessionSyncer struct {
	a           *App
	key         string
	full        bool      // rewrite the whole hash next time
	lastFull    time.Time // of the last rewrite
	lastRefresh time.Time // of the last PEXPIRE
	stored      int64     // fields in the hash after the last write
}

func (y *sessionSyncer) tick(ctx context.Context) error {
	a := y.a
	changes := a.proc.sessions.takeChanges()
	t := now()
	if y.full || t.Sub(y.lastFull) >= sessionResync {
		return y.rewrite(ctx, t)
	}
	if len(changes) == 0 && t.Sub(y.lastRefresh) < a.sessionTTL/3 {
		return nil
	}
	var set []any
	var del []string
	for id, s := range changes {
		if s == nil {
			del = append(del, id)
			continue
		}
		v, _ := json.Marshal(s.listed(a.Instance))
		set = append(set, id, v)
	}
	pipe := a.client.Pipeline()
	alive := pipe.PExpire(ctx, y.key, a.sessionTTL)
	if len(set) > 0 {
		pipe.HSet(ctx, y.key, set...)
	}
	if len(del) > 0 {
		pipe.HDel(ctx, y.key, del...)
	}
	pipe.PExpire(ctx, y.key, a.sessionTTL)
	n := pipe.HLen(ctx, y.key)
	y.announce(ctx, pipe, t)
	if _, err := pipe.Exec(ctx); err != nil {
		y.full = true
		return fmt.Errorf("writing the session registry: %w", err)
	}
	if !alive.Val() && y.stored > 0 {
		// The hash is gone though it had fields: what this write did not
		// touch must come back.
		return y.rewrite(ctx, t)
	}
	y.stored, y.lastRefresh = n.Val(), t
	return nil
}

// rewrite replaces the hash with this process's sessions.
func (y *sessionSyncer) rewrite(ctx context.Context, t time.Time) error {
	a := y.a
	all := a.proc.sessions.matching(func(*session) bool { return true })
	set := make([]any, 0, 2*len(all))
	for _, s := range all {
		v, _ := json.Marshal(s.listed(a.Instance))
		set = append(set, s.id, v)
	}
	tx := a.client.TxPipeline() // one key: a Redis Cluster runs it on its slot
	tx.Del(ctx, y.key)
	if len(set) > 0 {
		tx.HSet(ctx, y.key, set...)
		tx.PExpire(ctx, y.key, a.sessionTTL)
	}
	if _, err := tx.Exec(ctx); err != nil {
		y.full = true
		return fmt.Errorf("rewriting the session registry: %w", err)
	}
	pipe := a.client.Pipeline() // another slot
	y.announce(ctx, pipe, t)
	if _, err := pipe.Exec(ctx); err != nil {
		y.full = true
		return fmt.Errorf("writing the instance list: %w", err)
	}
	y.full, y.lastFull, y.lastRefresh, y.stored = false, t, t, int64(len(all))
	return nil
}

// announce adds this instance to <key_prefix>instances, which forgets
// those silent for instancesTTL, by this instance's clock: far longer
// than any skew, since a listing finds a dead instance's hash expired
// anyway.
func (y *sessionSyncer) announce(ctx context.Context, pipe redis.Pipeliner, t time.Time) {
	key := y.a.instancesKey()
	pipe.ZAdd(ctx, key, redis.Z{Score: float64(t.UnixMilli()), Member: y.a.Instance})
	pipe.ZRemRangeByScore(ctx, key, "-inf", fmt.Sprint(t.Add(-instancesTTL).UnixMilli()))
	pipe.PExpire(ctx, key, instancesTTL)
}

// receiveKicks closes the sessions that other instances' kick messages
// name.
func (a *App) receiveKicks(ctx context.Context, msgs <-chan *redis.Message) {
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-msgs:
			if !ok {
				return
			}
			a.kickFromPeer(m.Payload)
		}
	}
}

func (a *App) kickFromPeer(payload string) {
	var m kickMessage
	if err := json.Unmarshal([]byte(payload), &m); err != nil {
		a.logger.Debug("ignoring a malformed kick message", zap.Error(err))
		return
	}
	// Never everything: an empty filter names no session here, as in the
	// admin API.
	if m.Origin == a.proc.token || m.empty() {
		return
	}
	if n := kickLocal(a.proc, m.sessionFilter); n > 0 {
		a.logger.Info("sessions closed at another instance's request",
			zap.String("from", m.Instance), zap.Int("closed", n),
			zap.String("id", m.ID), zap.String("user", m.User), zap.String("remote", m.Remote))
	}
}

// errNoRegistry wraps what keeps the cluster's sessions from being listed
// or reached.
var errNoRegistry = errors.New("session registry (redis) unavailable")

// registryError is err of an admin request to Redis, bounded by timeout,
// as the admin reads it: go-redis keeps a refused connection's cause in
// its own log and fails at the deadline.
func registryError(err error, timeout time.Duration) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: no answer within %v", errNoRegistry, timeout)
	}
	return fmt.Errorf("%w: %w", errNoRegistry, err)
}

// clusterSessions lists the sessions of every instance that match f: this
// instance's live, the others' as their last write to Redis left them.
// Without Redis, the process is the whole cluster.
func (a *App) clusterSessions(ctx context.Context, f sessionFilter) ([]clusterSession, error) {
	out, err := a.remoteSessions(ctx, f)
	if err != nil {
		return nil, err
	}
	for _, s := range a.proc.sessions.matching(func(*session) bool { return true }) {
		if c := s.listed(a.Instance); f.matches(c.sessionInfo) {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out, nil
}

// remoteSessions reads the other instances' sessions that match f from
// Redis: two round trips, each bounded by the Redis timeout.
func (a *App) remoteSessions(ctx context.Context, f sessionFilter) ([]clusterSession, error) {
	if a.client == nil {
		return nil, nil
	}
	fail := func(err error) ([]clusterSession, error) {
		a.proc.metrics.storeError()
		return nil, registryError(err, a.redisTimeout())
	}
	zctx, cancel := context.WithTimeout(ctx, a.redisTimeout())
	names, err := a.client.ZRange(zctx, a.instancesKey(), 0, -1).Result()
	cancel()
	if err != nil {
		return fail(err)
	}
	hctx, cancel := context.WithTimeout(ctx, a.redisTimeout())
	defer cancel()
	pipe := a.client.Pipeline()
	var hashes []*redis.MapStringStringCmd
	for _, name := range names {
		// This instance's own are listed live; a name shared by two
		// instances is a misconfiguration that the rewrites expose anyway.
		if name != a.Instance {
			hashes = append(hashes, pipe.HGetAll(hctx, a.sessionsKey(name)))
		}
	}
	if len(hashes) == 0 {
		return nil, nil
	}
	if _, err := pipe.Exec(hctx); err != nil {
		return fail(err)
	}
	var out []clusterSession
	for _, h := range hashes {
		for _, v := range h.Val() {
			var c clusterSession
			if json.Unmarshal([]byte(v), &c) == nil && f.matches(c.sessionInfo) {
				out = append(out, c)
			}
		}
	}
	return out, nil
}

// kickCluster closes the sessions that match f on every instance: here
// directly, elsewhere through a kick message. It returns how many were
// asked to close: this instance's, and the others' that the registry
// lists (an owner also closes its sessions too new to be listed). With
// Redis down it closes nothing and fails.
func (a *App) kickCluster(ctx context.Context, f sessionFilter) (int, error) {
	remote, err := a.remoteSessions(ctx, f)
	if err != nil {
		return 0, err
	}
	if a.client != nil {
		msg, _ := json.Marshal(kickMessage{Origin: a.proc.token, Instance: a.Instance, sessionFilter: f})
		pctx, cancel := context.WithTimeout(ctx, a.redisTimeout())
		err := a.client.Publish(pctx, a.kickChannel(), msg).Err()
		cancel()
		if err != nil {
			a.proc.metrics.storeError()
			return 0, registryError(err, a.redisTimeout())
		}
	}
	return kickLocal(a.proc, f) + len(remote), nil
}
