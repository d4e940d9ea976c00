package main

// caddy-pop3 with its limits in Redis: a redis-server of pop3bench's own
// and a second Caddy whose pop3 app keeps the limits zone of its one plain
// listener there. The pop3 app's redis block puts every zone of its
// process in Redis, so the same limits in process (the "limits on"
// listener) stay in the first Caddy, which has no pop3 app.

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-pop3/caddy-pop3/internal/redistest"
)

const (
	// redisZone is the named zone of the Redis listener's limits block.
	redisZone = "bench"
	// redisKeyPrefix is the pop3 app's default key_prefix.
	redisKeyPrefix = "caddy-pop3:"
	// storeErrorsMetric counts the calls to Redis that failed, each then
	// decided by the instance's own memory (on_store_failure open).
	storeErrorsMetric = "caddy_layer4_pop3_store_errors_total"
)

// redisLimitsBlock is limitsBlock in the zone redisZone.
func redisLimitsBlock() []string {
	return append([]string{"limits " + redisZone + " {"}, limitsBlock[1:]...)
}

// redisProxy is the second Caddy (one plain listener with
// redisLimitsBlock, the pop3 app's redis block) and its redis-server.
type redisProxy struct {
	*caddyProxy
	server *redistest.Server
	client *redis.Client // pop3bench's own, for INFO and key counts
	conf   string        // the Caddyfile
}

// storeStats is what redis-server did so far: its CPU, the commands it
// processed (those that Lua scripts ran included) and the scripts it ran
// (EVALSHA and EVAL).
type storeStats struct {
	cpuTicks, commands, scripts uint64
}

// newRedisProxy starts redis-server (internal/redistest: a free loopback
// port, no persistence) and the second Caddy, in dir.
func newRedisProxy(bin, dir, upstream, authURL, logLevel string, extraEnv []string) (*redisProxy, error) {
	rdir := filepath.Join(dir, "redis")
	if err := os.MkdirAll(rdir, 0o755); err != nil {
		return nil, err
	}
	srv, err := redistest.Start(rdir)
	if err != nil {
		return nil, err
	}
	r := &redisProxy{server: srv, client: redis.NewClient(&redis.Options{Addr: srv.Addr})}
	addrs, err := freeAddrs(2)
	if err != nil {
		r.stop()
		return nil, err
	}
	p := &caddyProxy{bin: bin, dir: filepath.Join(dir, "caddy-redis"), adminAddr: addrs[1], extraEnv: extraEnv}
	p.addrs[modePlain] = addrs[0]
	r.conf = fmt.Sprintf(`# Written by pop3bench: caddy-pop3 with its limits in Redis.
{
	admin %s
	log {
		level %s
	}
	pop3 {
		redis %s
	}
	layer4 {
		# plain as the first Caddy's "limits on" listener, the zone in Redis
		%s {
			route {
				%s
			}
		}
	}
}
`, p.adminAddr, logLevel, srv.Addr, p.addrs[modePlain],
		pop3Handler(upstream, authURL, append([]string{"starttls off"}, redisLimitsBlock()...)...))
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		r.stop()
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(p.dir, "Caddyfile"), []byte(r.conf), 0o644); err != nil {
		r.stop()
		return nil, err
	}
	if err := p.start(); err != nil {
		r.stop()
		return nil, err
	}
	r.caddyProxy = p
	return r, nil
}

// stop ends Caddy, then redis-server.
func (r *redisProxy) stop() {
	if r.caddyProxy != nil {
		r.caddyProxy.stop()
	}
	_ = r.client.Close()
	_ = r.server.Stop()
}

// stats reads redis-server's CPU from /proc, its total_commands_processed
// (which counts the INFO commands before this one) and the calls of
// EVALSHA and EVAL from INFO.
func (r *redisProxy) stats() (storeStats, error) {
	pid := r.server.Pid()
	if pid == 0 {
		return storeStats{}, fmt.Errorf("redis-server is not running\n%s", lastLines(r.server.Log(), 20))
	}
	ticks, err := cpuTicks([]int{pid})
	if err != nil {
		return storeStats{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := r.client.Info(ctx, "stats", "commandstats").Result()
	if err != nil {
		return storeStats{}, fmt.Errorf("redis INFO: %w", err)
	}
	st := storeStats{cpuTicks: ticks}
	found := false
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "total_commands_processed:"); ok {
			if st.commands, err = strconv.ParseUint(v, 10, 64); err != nil {
				return storeStats{}, fmt.Errorf("redis INFO: total_commands_processed: %w", err)
			}
			found = true
		}
		// cmdstat_evalsha:calls=5010,usec=164293,...
		if rest, ok := strings.CutPrefix(line, "cmdstat_evalsha:calls="); ok {
			st.scripts += leadingUint(rest)
		} else if rest, ok := strings.CutPrefix(line, "cmdstat_eval:calls="); ok {
			st.scripts += leadingUint(rest)
		}
	}
	if !found {
		return storeStats{}, fmt.Errorf("redis INFO: no total_commands_processed")
	}
	return st, nil
}

// leadingUint is the number that s starts with (0 if none).
func leadingUint(s string) uint64 {
	end := strings.IndexFunc(s, func(c rune) bool { return c < '0' || c > '9' })
	if end < 0 {
		end = len(s)
	}
	n, _ := strconv.ParseUint(s[:end], 10, 64)
	return n
}

// zoneKeys counts the keys that the zone holds in Redis now.
func (r *redisProxy) zoneKeys() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n := 0
	iter := r.client.Scan(ctx, 0, redisKeyPrefix+"zone:"+redisZone+":*", 1000).Iterator()
	for iter.Next(ctx) {
		n++
	}
	return n, iter.Err()
}

// storeErrors is the second Caddy's count of failed Redis calls.
func (r *redisProxy) storeErrors() (float64, error) { return r.goMetric(storeErrorsMetric) }

// redisResult is what the report says about the Redis path beyond its
// login figures.
type redisResult struct {
	caddyfile   string  // the second Caddy's
	storeErrors float64 // failed Redis calls during the plain phase
	zoneKeys    int     // keys of the zone in Redis after the plain phase
}

// redisChecks reads, after the plain logins, whether the second Caddy
// kept its zone in Redis all along: its failed Redis calls (each decided
// in its own memory instead) and the zone's keys in Redis.
func (b *bench) redisChecks() error {
	res := b.res.redis
	var err error
	if res.storeErrors, err = b.redis.storeErrors(); err != nil {
		return fmt.Errorf("%s: %w", nameCaddyRedis, err)
	}
	if res.zoneKeys, err = b.redis.zoneKeys(); err != nil {
		return fmt.Errorf("%s: counting the zone's keys: %w", nameCaddyRedis, err)
	}
	log.Printf("  %s: %.0f failed Redis calls, %d keys of zone %s in Redis", nameCaddyRedis, res.storeErrors, res.zoneKeys, redisZone)
	return nil
}

// redisVersion is redis-server's version ("7.0.15").
func redisVersion() string {
	for _, f := range strings.Fields(versionOf("redis-server", "--version")) {
		if v, ok := strings.CutPrefix(f, "v="); ok {
			return v
		}
	}
	return "?"
}
