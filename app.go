package pop3

// The pop3 app: what every pop3 handler of the process shares with the
// other instances of a cluster. Without a redis block everything stays in
// the process, as without the app.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
	"github.com/caddy-pop3/caddy-pop3/internal/limits/redisstore"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(App))
	httpcaddyfile.RegisterGlobalOption("pop3", parseAppCaddyfile)
}

// Store failure policies (on_store_failure).
const (
	StoreFailureOpen   = "open"   // decide with the instance's own state
	StoreFailureClosed = "closed" // refuse what needs the shared state
)

// Defaults of the app's options.
const (
	defaultRedisKeyPrefix = "caddy-pop3:"
	defaultRedisTimeout   = 200 * time.Millisecond
)

// App is the pop3 app (module `pop3`): the state every pop3 handler of
// the process shares, and, with redis, shares with other instances.
type App struct {
	// Redis (or Valkey) that holds the shared state: limits, blocks,
	// login penalties, the auth cache and the sessions of every instance.
	Redis *RedisConfig `json:"redis,omitempty"`
	// What to do while Redis cannot be reached: open (decide with this
	// instance's own state) or closed (refuse logins with [SYS/TEMP]).
	// Default: open.
	OnStoreFailure string `json:"on_store_failure,omitempty"`
	// This instance's name in the shared session list. Default: the host
	// name.
	Instance string `json:"instance,omitempty"`
	// HMAC key for the auth cache's shared keys; the same on every
	// instance. Placeholders such as {env.POP3_SHARED_KEY} work.
	SharedKey string `json:"shared_key,omitempty"`

	client   redis.UniversalClient // nil without redis
	penalty  limits.Store          // the login penalty's failures per address, with redis
	breaker  *storeBreaker         // when Redis last failed
	redisKey string                // the client's key in redisClients
	logger   *zap.Logger
	stop     context.CancelFunc // ends the loops Start started
	wg       sync.WaitGroup     // the loops
	proc     *processState

	// The session registry (clustersessions.go): how often changes are
	// written and how long an instance's sessions outlive its last write.
	sessionSync, sessionTTL time.Duration
	pubsub                  *redis.PubSub // other instances' kicks
	sessionsWarned          onceAMinute
}

// RedisConfig says how to reach Redis. Several addresses make a Redis
// Cluster; with sentinel they are Sentinels.
type RedisConfig struct {
	Addresses []string `json:"addresses"`
	Username  string   `json:"username,omitempty"`
	// Placeholders such as {env.REDIS_PASSWORD} work.
	Password string `json:"password,omitempty"`
	DB       int    `json:"db,omitempty"`
	// TLS to Redis, with the options of an upstream's tls.
	TLS *reverseproxy.TLSConfig `json:"tls,omitempty"`
	// The master name the Sentinels know.
	Sentinel string `json:"sentinel,omitempty"`
	// Prefix of every key. Default: "caddy-pop3:".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// Bound of one operation. Default: 200ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "pop3", New: func() caddy.Module { return new(App) }}
}

// Provision applies defaults, resolves placeholders and connects to Redis
// (lazily: an unreachable Redis does not fail the config).
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.proc == nil {
		a.proc = theProcess
	}
	repl := caddy.NewReplacer()
	if a.OnStoreFailure == "" {
		a.OnStoreFailure = StoreFailureOpen
	}
	if a.Instance == "" {
		a.Instance = hostname
	}
	a.SharedKey = repl.ReplaceKnown(a.SharedKey, "")
	if r := a.Redis; r != nil {
		r.Username = repl.ReplaceKnown(r.Username, "")
		r.Password = repl.ReplaceKnown(r.Password, "")
		if r.KeyPrefix == "" {
			r.KeyPrefix = defaultRedisKeyPrefix
		}
		if r.Timeout == 0 {
			r.Timeout = caddy.Duration(defaultRedisTimeout)
		}
		if a.sessionSync == 0 {
			a.sessionSync = defaultSessionSync
		}
		if a.sessionTTL == 0 {
			a.sessionTTL = defaultSessionTTL
		}
	}
	if err := a.Validate(); err != nil {
		return err
	}
	if a.Redis != nil {
		var err error
		var c redisClient
		if c, a.redisKey, err = a.connectRedis(ctx); err != nil {
			return err
		}
		a.client, a.breaker = c.UniversalClient, c.breaker
		a.penalty = redisstore.New(a.client, redisstore.Options{KeyPrefix: a.Redis.KeyPrefix + "penalty:", Timeout: time.Duration(a.Redis.Timeout)})
	}
	return nil
}

// Cleanup lets go of the Redis client; the next config keeps it when its
// redis block is the same.
func (a *App) Cleanup() error {
	if a.client != nil {
		_, err := redisClients.Delete(a.redisKey)
		return err
	}
	return nil
}

// Validate checks the configuration; no secret goes into its errors.
func (a *App) Validate() error {
	switch a.OnStoreFailure {
	case "", StoreFailureOpen, StoreFailureClosed:
	default:
		return fmt.Errorf("pop3: on_store_failure: unknown policy %q (want open or closed)", a.OnStoreFailure)
	}
	if r := a.Redis; r != nil {
		if len(r.Addresses) == 0 {
			return errors.New("pop3: redis: at least one address is required")
		}
		if r.DB < 0 {
			return errors.New("pop3: redis: db must not be negative")
		}
		if r.Timeout < 0 {
			return errors.New("pop3: redis: timeout must not be negative")
		}
		if r.DB != 0 && len(r.Addresses) > 1 && r.Sentinel == "" {
			return errors.New("pop3: redis: a Redis Cluster (several addresses) has only db 0")
		}
	}
	return nil
}

// Start implements caddy.App: the app becomes the process's running one
// (the admin API's cluster view). With Redis, it renews the leases of the
// session slots this instance's sessions hold, registers the sessions and
// subscribes to other instances' kicks.
func (a *App) Start() error {
	a.proc.cluster.Store(a)
	if a.client != nil {
		ctx, cancel := context.WithCancel(context.Background())
		a.stop = cancel
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.renewLeases(ctx.Done())
		}()
		a.startSessions(ctx)
	}
	return nil
}

// Stop implements caddy.App. A reload starts the new config's app before
// it stops the old one, which then leaves the sessions to its successor.
func (a *App) Stop() error {
	a.proc.cluster.CompareAndSwap(a, nil)
	if a.stop != nil {
		a.stop()
		a.stop = nil
		a.wg.Wait() // no write of the loop may follow stopSessions' removal
		a.stopSessions(a.proc.cluster.Load())
	}
	return nil
}

// renewLeases renews every sharedLease/3 the slots the process's sessions
// hold in shared zones, so that they outlive the lease only while this
// instance lives.
func (a *App) renewLeases(stop <-chan struct{}) {
	t := time.NewTicker(sharedLease / 3)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		byZone := map[*limitZone][]limits.Lease{}
		for _, s := range a.proc.sessions.matching(func(s *session) bool { return s.edge != nil && s.edge.limits.zone.instance != "" }) {
			z := s.edge.limits.zone
			byZone[z] = s.edge.leases(byZone[z])
		}
		for z, leases := range byZone {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			lost, err := z.store.Renew(ctx, leases, now(), z.lease)
			cancel()
			if len(lost) > 0 {
				a.logger.Debug("session slots lost in the shared store", zap.String("zone", z.name), zap.Int("lost", len(lost)))
			}
			_ = err // counted and warned by the failover store
		}
	}
}

// parseAppCaddyfile reads the global option
//
//	pop3 {
//		redis <address>... {
//			username <name>
//			password <password>
//			db <n>
//			tls
//			tls_trust_pool <module> ...
//			tls_server_name <name>
//			tls_client_auth <cert> <key> | <automate_name>
//			tls_insecure_skip_verify
//			sentinel <master_name>
//			key_prefix <prefix>
//			timeout <duration>
//		}
//		on_store_failure open|closed
//		instance <name>
//		shared_key <secret>
//	}
func parseAppCaddyfile(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("pop3: the global option may be given once")
	}
	a := new(App)
	if err := a.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "pop3", Value: caddyconfig.JSON(a, nil)}, nil
}

// UnmarshalCaddyfile reads the pop3 global option.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	const wrapper = "pop3"
	d.Next() // the option's name
	if d.CountRemainingArgs() > 0 {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("duplicate %s option '%s'", wrapper, opt)
		}
		seen[opt] = true
		switch opt {
		case "redis":
			r := &RedisConfig{Addresses: d.RemainingArgs()}
			if len(r.Addresses) == 0 {
				return d.ArgErr()
			}
			if err := r.unmarshalCaddyfile(d, wrapper); err != nil {
				return err
			}
			a.Redis = r
			continue // its block is consumed
		case "on_store_failure", "instance", "shared_key":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			switch opt {
			case "on_store_failure":
				if v := d.Val(); v != StoreFailureOpen && v != StoreFailureClosed {
					return d.Errf("parsing %s option '%s': unknown value '%s' (want open or closed)", wrapper, opt, v)
				}
				a.OnStoreFailure = d.Val()
			case "instance":
				a.Instance = d.Val()
			case "shared_key":
				a.SharedKey = d.Val()
			}
		default:
			return d.Errf("unrecognized %s option '%s'", wrapper, opt)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("malformed %s option '%s': blocks are not supported", wrapper, opt)
		}
	}
	return nil
}

func (r *RedisConfig) unmarshalCaddyfile(d *caddyfile.Dispenser, wrapper string) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		opt := "redis " + sub
		if seen[sub] {
			return d.Errf("duplicate %s option '%s'", wrapper, opt)
		}
		seen[sub] = true
		tlsConfig := func() *reverseproxy.TLSConfig {
			if r.TLS == nil {
				r.TLS = new(reverseproxy.TLSConfig)
			}
			return r.TLS
		}
		switch sub {
		case "tls":
			if d.CountRemainingArgs() != 0 {
				return d.ArgErr()
			}
			tlsConfig()
		case "tls_insecure_skip_verify", "tls_server_name", "tls_client_auth", "tls_trust_pool":
			if err := unmarshalTLSClientOption(d, wrapper, opt, tlsConfig()); err != nil {
				return err
			}
		case "username", "password", "sentinel", "key_prefix":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			*map[string]*string{"username": &r.Username, "password": &r.Password, "sentinel": &r.Sentinel, "key_prefix": &r.KeyPrefix}[sub] = d.Val()
		case "db":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 0 {
				return d.Errf("parsing %s option '%s': want a database number, got '%s'", wrapper, opt, d.Val())
			}
			r.DB = n
		case "timeout":
			dur, err := parsePositiveDuration(d, wrapper, opt)
			if err != nil {
				return err
			}
			r.Timeout = dur
		default:
			return d.Errf("unrecognized %s option '%s'", wrapper, opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.App             = (*App)(nil)
	_ caddy.Provisioner     = (*App)(nil)
	_ caddy.CleanerUpper    = (*App)(nil)
	_ caddy.Validator       = (*App)(nil)
	_ caddyfile.Unmarshaler = (*App)(nil)
)

// sharedFailures counts a failed login from ip in the cluster's login
// penalty and returns the failures of the last penaltyForget from its
// address (IPv6 by /64), 0 without redis or while Redis fails: the
// instance's own count then stands alone.
func (a *App) sharedFailures(ctx context.Context, ip netip.Addr) int64 {
	if a == nil || a.penalty == nil || !ip.IsValid() || now().UnixNano() < a.breaker.downUntil.Load() {
		return 0
	}
	n, err := a.penalty.Fail(ctx, penaltyKey(ip).String(), penaltyForget, now())
	if err != nil {
		return 0
	}
	return n
}
