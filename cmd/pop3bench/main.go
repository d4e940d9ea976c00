// Command pop3bench measures caddy-pop3 side by side with Dovecot directly
// and with NGINX's mail proxy, in one run on loopback, with one Go client:
//
//   - RETR throughput of a large message (sha256 checked), MB/s;
//   - login rate (connect, USER/PASS, STAT, QUIT with -c clients at once),
//     sessions/s and latency percentiles, in plain POP3, over implicit TLS
//     (995) and over STLS, with the proxy's and the whole machine's CPU per
//     session;
//   - the plain login rate through caddy-pop3 with every edge limit on
//     (values no client reaches, none exempt), against limits off in the
//     same interleaved rounds, and with the same limits in Redis (a
//     redis-server of its own, a second Caddy with the pop3 app's redis
//     block) against them in process;
//   - the login rate through caddy-pop3 when it checks the users itself in a
//     passwd_file of bcrypt hashes and logs in to Dovecot as a master user
//     (master_login), without and with auth_cache, against its pass-through
//     plain logins in the same interleaved rounds;
//   - login latency with one client, where nothing queues for the CPUs: what
//     a proxy adds to p50 and p99;
//   - the proxy's memory (RSS) and file descriptors per logged-in idle
//     session;
//   - the proxy's CPU time per GB relayed during the RETR rounds.
//
// It starts a private Dovecot, Caddy (the binary given with -caddy) with a
// generated Caddyfile, a private NGINX with a generated nginx.conf, and an
// auth_http stand-in for NGINX inside this process. Rounds interleave the
// three paths so that noise from the machine hits them alike. The results go
// to stdout, OUT/results.md and the chart OUT/login-latency.png.
//
//	go build -o bin/caddy ./cmd/caddy && go run ./cmd/pop3bench -caddy bin/caddy
//	go run ./cmd/pop3bench -quick   # smoke run, under a minute
//
// scripts/bench.sh installs what is needed on Debian and runs it.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	nameDirect = "Dovecot direct"
	nameCaddy  = "caddy-pop3"
	nameNginx  = "NGINX"
	// caddy-pop3's plain listener with every limit on, none reached.
	nameCaddyLimits = "caddy-pop3 limits on"
	// The same limits in a zone in Redis (a second Caddy, see redis.go).
	nameCaddyRedis = "caddy-pop3 limits in Redis"
	// caddy-pop3 checking the users in a passwd_file, master_login upstream.
	namePasswd       = "caddy-pop3 passwd_file"
	namePasswdCached = "caddy-pop3 passwd_file + auth_cache"
)

type config struct {
	caddyBin, nginxBin string
	out                string
	sizeMiB            int
	rounds             int
	loginRounds        int
	loginDur           time.Duration
	loginCount         int
	conc               int
	sessions           []int
	tlsSessions        []int // idle sessions over implicit TLS (995)
	openConc           int
	settle             time.Duration
	phases             map[string]bool
	resume             bool
	pq                 bool
	caddyAuthHTTP      bool
	caddyLog           string
	caddyEnv           []string
	latencyCount       int
	nginxWorkers       string
	nginxProxyBuffer   string
	pprof              bool
	pprofSeconds       int
	keep               bool
	quick              bool
	args               []string
}

var allPhases = []string{"retr", "plain", "tls", "stls", "passwd", "latency", "memory"}

func main() {
	log.SetFlags(log.Ltime)
	log.SetPrefix("pop3bench: ")
	cfg, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		log.Fatal(err)
	}
	// Ctrl-C: stop the servers (they run in their own process groups, out
	// of the terminal's reach) and remove the work directory.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		log.Printf("%v: stopping the servers", s)
		runCleanups()
		os.Exit(130)
	}()
	failed, err := run(cfg)
	if err != nil {
		log.Fatal(err)
	}
	if failed {
		log.Print("errors occurred: see the tables")
		os.Exit(1)
	}
}

// parseFlags turns the command line into a config, with -quick's sizes for
// the flags not given.
func parseFlags(args []string) (*config, error) {
	cfg := &config{args: args}
	fs := flag.NewFlagSet("pop3bench", flag.ContinueOnError)
	var sessions, tlsSessions, only, caddyEnv string
	fs.StringVar(&cfg.caddyBin, "caddy", "bin/caddy", "Caddy binary with the pop3 handler (go build -o bin/caddy ./cmd/caddy)")
	fs.StringVar(&cfg.nginxBin, "nginx", "/usr/sbin/nginx", "nginx binary; its mail module must be /usr/lib/nginx/modules/ngx_mail_module.so")
	fs.StringVar(&cfg.out, "out", "bench", "directory for results.md, login-latency.png and pprof files")
	fs.IntVar(&cfg.sizeMiB, "size", 32, "RETR message size in MiB")
	fs.IntVar(&cfg.rounds, "rounds", 7, "RETR rounds; each fetches the message once per path")
	fs.IntVar(&cfg.loginRounds, "login-rounds", 5, "login-rate rounds per mode; each runs every path once")
	fs.DurationVar(&cfg.loginDur, "login-duration", 2*time.Second, "length of one login-rate run (one path, one mode, one round)")
	fs.IntVar(&cfg.loginCount, "login-count", 0, "sessions per login-rate run instead of -login-duration (0: use the duration)")
	fs.IntVar(&cfg.conc, "c", 16, "concurrent clients in the login-rate runs")
	fs.IntVar(&cfg.latencyCount, "latency-count", 300, "sessions per path and round in the one-client latency runs")
	fs.StringVar(&caddyEnv, "caddy-env", "", "space-separated NAME=value settings added to Caddy's environment, e.g. GOMAXPROCS=1")
	fs.StringVar(&sessions, "sessions", "1000,10000", "comma-separated counts of logged-in idle sessions for the memory measurement")
	fs.StringVar(&tlsSessions, "tls-sessions", "1000", "comma-separated counts of logged-in idle sessions over implicit TLS (995) for the memory measurement (empty: none)")
	fs.IntVar(&cfg.openConc, "open-c", 64, "sessions opened at once in the memory measurement")
	fs.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait after opening the idle sessions before reading RSS")
	fs.StringVar(&only, "only", strings.Join(allPhases, ","), "phases to run: "+strings.Join(allPhases, ","))
	fs.BoolVar(&cfg.resume, "resume", true, "TLS session resumption in the client (tls.ClientSessionCache), for TLS (995) and STLS")
	fs.BoolVar(&cfg.pq, "pq", false, "let the client offer X25519MLKEM768 (Go's default); off: X25519 (and P-256, which TLS 1.2 needs for the ECDSA certificates), which all three servers support, so the handshakes compare")
	fs.BoolVar(&cfg.caddyAuthHTTP, "caddy-auth-http", false, "caddy-pop3 asks the auth_http stand-in for the upstream at each login, as NGINX must (default: a static upstream)")
	fs.StringVar(&cfg.caddyLog, "caddy-log", "INFO", "Caddy's log level (INFO logs a line per session and per login, to a file)")
	fs.StringVar(&cfg.nginxWorkers, "nginx-workers", "auto", "NGINX worker_processes")
	fs.StringVar(&cfg.nginxProxyBuffer, "nginx-proxy-buffer", "", "NGINX proxy_buffer for the relay (empty: NGINX's default, one memory page)")
	fs.BoolVar(&cfg.pprof, "pprof", false, "after the measurements, record CPU profiles of Caddy under each load and a heap profile with idle sessions, into OUT/pprof")
	fs.IntVar(&cfg.pprofSeconds, "pprof-seconds", 10, "length of each CPU profile")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work directory (configs and logs) under /tmp")
	fs.BoolVar(&cfg.quick, "quick", false, "smoke run with small sizes (1 MiB, short runs, 200 idle sessions): under a minute; flags given explicitly still win")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}

	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if cfg.quick {
		quick := map[string]func(){
			"size":           func() { cfg.sizeMiB = 1 },
			"rounds":         func() { cfg.rounds = 3 },
			"login-rounds":   func() { cfg.loginRounds = 2 },
			"login-duration": func() { cfg.loginDur = 300 * time.Millisecond },
			"sessions":       func() { sessions = "200" },
			"tls-sessions":   func() { tlsSessions = "200" },
			"settle":         func() { cfg.settle = 500 * time.Millisecond },
			"pprof-seconds":  func() { cfg.pprofSeconds = 2 },
			"latency-count":  func() { cfg.latencyCount = 50 },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	cfg.caddyEnv = strings.Fields(caddyEnv)
	for _, kv := range cfg.caddyEnv {
		if !strings.Contains(kv, "=") {
			return nil, fmt.Errorf("-caddy-env: %q is not NAME=value", kv)
		}
	}
	var err error
	if cfg.sessions, err = parseCounts("sessions", sessions); err != nil {
		return nil, err
	}
	if cfg.tlsSessions, err = parseCounts("tls-sessions", tlsSessions); err != nil {
		return nil, err
	}
	cfg.phases = map[string]bool{}
	for _, p := range strings.Split(only, ",") {
		p = strings.TrimSpace(p)
		if p == "login" { // all three login modes
			cfg.phases["plain"], cfg.phases["tls"], cfg.phases["stls"] = true, true, true
			continue
		}
		if !slices.Contains(allPhases, p) {
			return nil, fmt.Errorf("-only: unknown phase %q (want %s or login)", p, strings.Join(allPhases, ","))
		}
		cfg.phases[p] = true
	}
	if cfg.phases["memory"] && len(cfg.sessions) == 0 {
		return nil, errors.New("-sessions: no count given")
	}
	if cfg.sizeMiB <= 0 || cfg.rounds <= 0 || cfg.loginRounds <= 0 || cfg.conc <= 0 || cfg.openConc <= 0 || cfg.pprofSeconds <= 0 || cfg.latencyCount <= 0 {
		return nil, errors.New("-size, -rounds, -login-rounds, -c, -open-c, -pprof-seconds and -latency-count must be positive")
	}
	return cfg, nil
}

// parseCounts reads a comma-separated list of positive counts.
func parseCounts(flagName, list string) ([]int, error) {
	var out []int
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("-%s: bad count %q", flagName, s)
		}
		out = append(out, n)
	}
	return out, nil
}

var (
	cleanupMu sync.Mutex
	cleanups  []func()
)

// atExit registers f to run, last registered first, when run returns or
// when pop3bench is interrupted.
func atExit(f func()) {
	cleanupMu.Lock()
	defer cleanupMu.Unlock()
	cleanups = append(cleanups, f)
}

// runCleanups runs the registered functions once.
func runCleanups() {
	cleanupMu.Lock()
	defer cleanupMu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
}

// bench holds what one run set up.
type bench struct {
	cfg     *config
	dir     string
	targets []*target // direct, caddy-pop3, NGINX
	caddy   *caddyProxy
	nginx   *nginxProxy
	// redis: the second Caddy with its limits in Redis (plain phase only),
	// and its path.
	redis       *redisProxy
	redisTarget *target
	users       []userCred // login and idle-session users
	passwd      *passwdSetup
	retrUser    userCred
	want        [32]byte
	res         results
}

func run(cfg *config) (failed bool, err error) {
	defer runCleanups()
	for _, bin := range []string{cfg.caddyBin, cfg.nginxBin} {
		if _, err := os.Stat(bin); err != nil {
			return false, fmt.Errorf("%w (build Caddy with: go build -o bin/caddy ./cmd/caddy; install nginx with scripts/bench.sh)", err)
		}
	}
	if _, err := os.Stat("/usr/lib/nginx/modules/ngx_mail_module.so"); err != nil {
		return false, fmt.Errorf("NGINX's mail module is missing (apt-get install libnginx-mod-mail): %w", err)
	}
	caddyBin, err := filepath.Abs(cfg.caddyBin)
	if err != nil {
		return false, err
	}
	if err := os.MkdirAll(cfg.out, 0o755); err != nil {
		return false, err
	}
	dir, err := os.MkdirTemp("/tmp", "pop3bench-")
	if err != nil {
		return false, err
	}
	if cfg.keep {
		log.Printf("work directory (kept): %s", dir)
	} else {
		atExit(func() { os.RemoveAll(dir) })
	}
	// Dovecot's unprivileged users must traverse it.
	if err := os.Chmod(dir, 0o755); err != nil {
		return false, err
	}

	b := &bench{cfg: cfg, dir: dir, retrUser: userCred{"bench", "bench-password"}}
	b.res.started = time.Now()
	b.res.loadStart = loadAvg()
	for i := 1; i <= 16; i++ {
		b.users = append(b.users, userCred{fmt.Sprintf("user%02d", i), fmt.Sprintf("password-%02d", i)})
	}

	log.Printf("building a %d MiB message", cfg.sizeMiB)
	msg := message(cfg.sizeMiB << 20)
	b.want = sha256.Sum256(append(dotStuff(msg), ".\r\n"...))
	b.res.retrBytes = len(dotStuff(msg)) + 3

	maxSessions := 0
	if cfg.phases["memory"] {
		maxSessions = slices.Max(append(slices.Clone(cfg.sessions), cfg.tlsSessions...))
	}
	if cfg.phases["passwd"] {
		// Users of their own, whose passwords only the proxy knows: Dovecot
		// has another one for each, so only the master login gets in.
		b.passwd = &passwdSetup{
			file:        filepath.Join(dir, "proxy-users"),
			masterUser:  "benchmaster",
			masterPw:    "bench-master-password",
			mastersFile: filepath.Join(dir, "dovecot-masters"),
		}
		for i := 1; i <= 16; i++ {
			b.passwd.users = append(b.passwd.users, userCred{fmt.Sprintf("pfuser%02d", i), fmt.Sprintf("pf-password-%02d", i)})
		}
		log.Printf("hashing %d passwords for passwd_file (doveadm pw -s BLF-CRYPT)", len(b.passwd.users))
		if err := writePasswd(b.passwd); err != nil {
			return false, err
		}
	}
	log.Print("starting Dovecot")
	dc, err := startDovecot(dir, msg, b.retrUser, b.users, b.passwd, maxSessions)
	if err != nil {
		return false, err
	}
	atExit(func() { _ = dc.Stop() })
	msg = nil

	auth, err := startAuthServer(dc.POP3Addr)
	if err != nil {
		return false, err
	}
	atExit(auth.Close)

	authURL := ""
	if cfg.caddyAuthHTTP {
		authURL = "http://" + auth.addr + "/auth"
	}
	log.Print("starting Caddy")
	b.caddy, err = newCaddyProxy(caddyBin, filepath.Join(dir, "caddy"), dc.POP3Addr, authURL, cfg.caddyLog, cfg.caddyEnv, b.passwd)
	if err != nil {
		return false, err
	}
	atExit(b.caddy.stop)
	if cfg.phases["plain"] {
		log.Print("starting redis-server and a second Caddy with the limits in Redis")
		if b.redis, err = newRedisProxy(caddyBin, dir, dc.POP3Addr, authURL, cfg.caddyLog, cfg.caddyEnv); err != nil {
			return false, err
		}
		atExit(b.redis.stop)
	}

	log.Print("starting NGINX")
	b.nginx, err = newNginxProxy(cfg.nginxBin, filepath.Join(dir, "nginx"), auth.addr, dc.CACertFile,
		filepath.Join(filepath.Dir(dc.CACertFile), "key.pem"), cfg.nginxWorkers, cfg.nginxProxyBuffer, maxSessions)
	if err != nil {
		return false, err
	}
	atExit(b.nginx.stop)

	// One client TLS configuration for all: Dovecot's self-signed
	// certificate (also served by NGINX) and Caddy's local root.
	pool := x509.NewCertPool()
	for _, f := range []string{dc.CACertFile, b.caddy.rootCA()} {
		pem, err := os.ReadFile(f)
		if err != nil {
			return false, err
		}
		if !pool.AppendCertsFromPEM(pem) {
			return false, fmt.Errorf("%s: no certificate", f)
		}
	}
	tlsConf := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	if !cfg.pq {
		tlsConf.CurvePreferences = []tls.CurveID{tls.X25519, tls.CurveP256}
	}
	newTarget := func(name string, addrs [numModes]string, pids func() ([]int, error), restart func() error) *target {
		t := &target{name: name, addrs: addrs, tlsConf: tlsConf, pids: pids, restart: restart}
		for m := range t.caches {
			t.caches[m] = tls.NewLRUClientSessionCache(64)
		}
		return t
	}
	b.targets = []*target{
		newTarget(nameDirect, [numModes]string{modePlain: dc.POP3Addr, modeTLS: dc.POP3SAddr, modeSTLS: dc.POP3Addr}, nil, nil),
		newTarget(nameCaddy, b.caddy.addrs, b.caddy.pids, b.caddy.restart),
		newTarget(nameNginx, b.nginx.addrs, b.nginx.pids, b.nginx.restart),
	}
	b.res.versions = versions(caddyBin, cfg.nginxBin)
	if b.redis != nil {
		b.redisTarget = newTarget(nameCaddyRedis, b.redis.addrs, b.redis.pids, nil)
		b.redisTarget.store = b.redis.stats
		b.res.versions = append(b.res.versions, "Redis: "+redisVersion())
		b.res.redis = &redisResult{caddyfile: b.redis.conf}
	}
	b.res.dovecotConf = dovecotExtra(maxSessions)
	if b.passwd != nil {
		b.res.dovecotConf += masterExtra(b.passwd.mastersFile)
	}
	b.res.caddyfile = b.caddy.caddyfile(dc.POP3Addr, authURL, cfg.caddyLog)
	ngConf, _ := os.ReadFile(filepath.Join(b.nginx.dir, "nginx.conf"))
	b.res.nginxConf = string(ngConf)
	soft, hard := fdLimit()
	b.res.fdLimit = fmt.Sprintf("%d (soft) / %d (hard) for pop3bench; Caddy's: %s", soft, hard, procFDLimit(b.caddy.child.pid()))

	if cfg.phases["retr"] {
		if err := b.retrPhase(); err != nil {
			return false, err
		}
	}
	for m := modePlain; m < numModes; m++ {
		if cfg.phases[m.short()] {
			if b.res.login == nil {
				b.res.login = map[mode]map[string]*loginAgg{}
			}
			var extra []loginPath
			if m == modePlain {
				extra = append(extra,
					loginPath{t: b.caddyListener(nameCaddyLimits, b.caddy.limitsAddr), users: b.users, beside: nameCaddy},
					loginPath{t: b.redisTarget, users: b.users, beside: nameCaddyLimits})
			}
			if b.res.login[m], err = b.loginPhase(m, cfg.conc, 0, extra...); err != nil {
				return false, err
			}
			if m == modePlain {
				aggs := b.res.login[m]
				log.Printf("  %s vs off: %s", nameCaddyLimits, vsLine(aggs[nameCaddyLimits], aggs[nameCaddy]))
				if err := b.redisChecks(); err != nil {
					return false, err
				}
				red := aggs[nameCaddyRedis]
				log.Printf("  %s vs in process: %s; redis-server CPU %.2f ms, %.1f commands and %.1f scripts per login", nameCaddyRedis, vsLine(red, aggs[nameCaddyLimits]), red.storeCPUPerSession(), red.storePerSession(red.store.commands), red.storePerSession(red.store.scripts))
			}
		}
	}
	if cfg.phases["passwd"] {
		if b.res.passwd, err = b.passwdPhase(); err != nil {
			return false, err
		}
	}
	if cfg.phases["latency"] {
		if b.res.latency, err = b.loginPhase(modePlain, 1, cfg.latencyCount); err != nil {
			return false, err
		}
	}
	if cfg.pprof {
		if err := b.profile(); err != nil {
			log.Printf("pprof: %v", err)
		}
	}
	if cfg.phases["memory"] {
		if err := b.memoryPhase(); err != nil {
			return false, err
		}
	}
	b.res.finished = time.Now()
	b.res.loadEnd = loadAvg()
	return b.report()
}

// rotate returns the targets starting at offset r, so that no path always
// runs first or last.
func (b *bench) rotate(r int) []*target {
	n := len(b.targets)
	out := make([]*target, n)
	for i := range out {
		out[i] = b.targets[(i+r)%n]
	}
	return out
}

func (b *bench) retrPhase() error {
	cfg := b.cfg
	log.Printf("RETR: %d rounds of a %d MiB message through each path", cfg.rounds, cfg.sizeMiB)
	b.res.retr = map[string]*retrAgg{}
	for _, t := range b.targets {
		b.res.retr[t.name] = &retrAgg{}
	}
	// The proxies' CPU is read once before and once after all rounds: they
	// are idle while the other paths run, and one reading loses less to
	// the 10 ms clock tick than one per RETR would.
	cpuStart := map[string]uint64{}
	for _, t := range b.targets {
		if t.pids != nil {
			ticks, err := t.cpu()
			if err != nil {
				return err
			}
			cpuStart[t.name] = ticks
		}
	}
	for i := 0; i < cfg.rounds; i++ {
		for _, t := range b.rotate(i) {
			agg := b.res.retr[t.name]
			n, d, err := retr(t, b.retrUser, b.want)
			if err != nil {
				return fmt.Errorf("RETR round %d via %s: %w", i+1, t.name, err)
			}
			agg.mbps = append(agg.mbps, float64(n)/1e6/d.Seconds())
			agg.bytes += int64(n)
		}
	}
	for _, t := range b.targets {
		if t.pids != nil {
			ticks, err := t.cpu()
			if err != nil {
				return err
			}
			b.res.retr[t.name].cpuTicks = ticks - cpuStart[t.name]
		}
	}
	for _, t := range b.targets {
		a := b.res.retr[t.name]
		log.Printf("  %-15s median %8.1f MB/s", t.name, median(a.mbps))
	}
	return nil
}

// loginPath is a path of the login-rate runs with the users it logs in.
type loginPath struct {
	t     *target
	users []userCred
	// beside, when set, is the name of the path that this one runs right
	// next to in every round: after it in even rounds, before it in odd
	// ones, so that the two share the machine's moment and take turns
	// after the same runs. (Rotated as a path of its own, a copy of
	// caddy-pop3's plain listener that always ran after NGINX, where the
	// original ran after Dovecot directly, came out 1.09× to 1.22× the
	// original's rate in four runs on a busy 2-CPU machine.)
	beside string
}

// roundOrder is the order of the paths in round i (from 0): those without
// beside rotated to start at the i-th, so that none always runs first or
// last, each followed (even rounds) or preceded (odd rounds) by those that
// run beside it, and these in turn by those beside them (a path beside the
// one beside another runs next to it, on the far side from the first).
func roundOrder(paths []loginPath, i int) []loginPath {
	var main []loginPath
	for _, p := range paths {
		if p.beside == "" {
			main = append(main, p)
		}
	}
	var place func(p loginPath) []loginPath
	place = func(p loginPath) []loginPath {
		var next []loginPath
		for _, q := range paths {
			if q.beside == p.t.name {
				next = append(next, place(q)...)
			}
		}
		if i%2 == 0 {
			return append([]loginPath{p}, next...)
		}
		return append(next, p)
	}
	var out []loginPath
	for j := range main {
		out = append(out, place(main[(i+j)%len(main)])...)
	}
	return out
}

// loginPhase runs conc clients per path (the targets, then extra) in mode
// m, rounds interleaved, each run lasting -login-duration or, with count
// (else -login-count) above 0, that many sessions.
func (b *bench) loginPhase(m mode, conc, count int, extra ...loginPath) (aggs map[string]*loginAgg, err error) {
	var paths []loginPath
	for _, t := range b.targets {
		paths = append(paths, loginPath{t: t, users: b.users})
	}
	return b.loginRuns(append(paths, extra...), m, conc, count)
}

// caddyListener is another plain listener of the Caddy process under test:
// the caddy-pop3 target (its CPU is the same process's) with that name and
// address, and no restart.
func (b *bench) caddyListener(name, addr string) *target {
	t := *b.targets[1]
	t.name = name
	t.addrs = [numModes]string{modePlain: addr}
	t.restart = nil
	return &t
}

// vsLine compares a path's logins with base's: ratios of rate, p50, p99
// and proxy CPU per login.
func vsLine(a, base *loginAgg) string {
	return fmt.Sprintf("rate %s, p50 %s, p99 %s, proxy CPU per login %s",
		x(ratio(median(a.rates), median(base.rates))),
		x(ratio(ms(percentile(a.lat, 50)), ms(percentile(base.lat, 50)))),
		x(ratio(ms(percentile(a.lat, 99)), ms(percentile(base.lat, 99)))),
		x(ratio(a.cpuPerSession(), base.cpuPerSession())))
}

// passwdPhase compares plain logins through caddy-pop3 that pass the
// password on (the pass-through path of the plain login runs) with logins
// that caddy-pop3 checks in its passwd_file (bcrypt) before it logs in as
// the master user, without and with auth_cache, rounds interleaved.
func (b *bench) passwdPhase() (map[string]*loginAgg, error) {
	paths := []loginPath{
		{t: b.targets[1], users: b.users},
		{t: b.caddyListener(namePasswd, b.caddy.passwdAddrs[0]), users: b.passwd.users},
		{t: b.caddyListener(namePasswdCached, b.caddy.passwdAddrs[1]), users: b.passwd.users},
	}
	log.Print("passwd_file: caddy-pop3 pass-through against passwd_file (bcrypt) with master_login, without and with auth_cache")
	if err := b.checkPasswd(paths[1].t); err != nil {
		return nil, err
	}
	aggs, err := b.loginRuns(paths, modePlain, b.cfg.conc, 0)
	if err != nil {
		return nil, err
	}
	base := aggs[nameCaddy]
	for _, name := range []string{namePasswd, namePasswdCached} {
		a := aggs[name]
		log.Printf("  %-*s vs pass-through: %s", len(namePasswdCached), name, vsLine(a, base))
	}
	return aggs, nil
}

// checkPasswd makes sure that only the proxy's check and master login let
// the passwd_file users in: Dovecot refuses each of their passwords, and the
// proxy (through t, without auth_cache) refuses a wrong one.
func (b *bench) checkPasswd(t *target) error {
	direct := b.targets[0]
	users := b.passwd.users
	_, err := forEach(len(users)+1, len(users)+1, 0, func(i int) error {
		if i == len(users) {
			u := users[0]
			if err := refused(t, u.name, "wrong-"+u.pass); err != nil {
				return fmt.Errorf("%s with a wrong password: %w", t.name, err)
			}
			return nil
		}
		u := users[i]
		if err := refused(direct, u.name, u.pass); err != nil {
			return fmt.Errorf("%s with %s's passwd_file password: %w", direct.name, u.name, err)
		}
		return nil
	})
	return err
}

// refused logs in to t on its plain port and returns nil if PASS is
// answered with -ERR.
func refused(t *target, user, pass string) error {
	pc, err := dialPOP3(t, modePlain, false, time.Now().Add(15*time.Second))
	if err != nil {
		return err
	}
	defer pc.Close()
	if _, err := pc.cmd("USER " + user); err != nil {
		return err
	}
	if _, err := io.WriteString(pc.c, "PASS "+pass+"\r\n"); err != nil {
		return err
	}
	line, err := pc.r.ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "-ERR") {
		return fmt.Errorf("logged in (%q), want -ERR", strings.TrimSpace(line))
	}
	_, _ = io.WriteString(pc.c, "QUIT\r\n")
	return nil
}

// loginRuns runs conc clients per path in mode m, rounds interleaved (each
// starting with another path, see roundOrder), each run lasting
// -login-duration or, with count (else -login-count) above 0, that many
// sessions.
func (b *bench) loginRuns(paths []loginPath, m mode, conc, count int) (aggs map[string]*loginAgg, err error) {
	cfg := b.cfg
	if count == 0 {
		count = cfg.loginCount
	}
	what := fmt.Sprintf("%v", cfg.loginDur)
	if count > 0 {
		what = fmt.Sprintf("%d sessions", count)
	}
	log.Printf("logins, %v: %d rounds of %s per path, %d clients", m, cfg.loginRounds, what, conc)
	aggs = map[string]*loginAgg{}
	for _, p := range paths {
		t := p.t
		aggs[t.name] = &loginAgg{}
		// Warm-up: processes, TLS session caches, connection pools.
		r := runLoad(t, m, cfg.resume, conc, 0, 4*max(conc, 16), p.users)
		if r.errors > 0 {
			return nil, fmt.Errorf("logins %v via %s (warm-up): %d errors, first: %v", m, t.name, r.errors, r.firstErr)
		}
	}
	for i := 0; i < cfg.loginRounds; i++ {
		for _, p := range roundOrder(paths, i) {
			t := p.t
			a := aggs[t.name]
			var cpu0 uint64
			if t.pids != nil {
				if cpu0, err = t.cpu(); err != nil {
					return nil, err
				}
			}
			var store0 storeStats
			if t.store != nil {
				if store0, err = t.store(); err != nil {
					return nil, err
				}
			}
			busy0, err := machineBusyTicks()
			if err != nil {
				return nil, err
			}
			r := runLoad(t, m, cfg.resume, conc, cfg.loginDur, count, p.users)
			busy1, err := machineBusyTicks()
			if err != nil {
				return nil, err
			}
			a.busy += busy1 - busy0
			if t.store != nil {
				store1, err := t.store()
				if err != nil {
					return nil, err
				}
				// Less the INFO command of the first reading.
				a.store.cpuTicks += store1.cpuTicks - store0.cpuTicks
				a.store.commands += store1.commands - store0.commands - 1
				a.store.scripts += store1.scripts - store0.scripts
			}
			if t.pids != nil {
				cpu1, err := t.cpu()
				if err != nil {
					return nil, err
				}
				a.cpuTicks += cpu1 - cpu0
			}
			a.rates = append(a.rates, r.rate())
			a.lat = append(a.lat, r.lat...)
			a.sessions += r.sessions
			a.errors += r.errors
			a.resumed += r.resumed
			if a.firstErr == nil {
				a.firstErr = r.firstErr
			}
			if r.tls != "" {
				a.tls = r.tls
			}
		}
	}
	width := 15
	for _, p := range paths {
		width = max(width, len(p.t.name))
	}
	for _, p := range paths {
		t := p.t
		a := aggs[t.name]
		a.sortLat()
		cpu := ""
		if t.pids != nil {
			cpu = fmt.Sprintf(", proxy CPU %.2f ms/session", a.cpuPerSession())
		}
		log.Printf("  %-*s median %8.0f sessions/s, p50 %6.2f ms, p99 %6.2f ms, %d errors%s, machine CPU %.2f ms/session", width, t.name, median(a.rates), ms(percentile(a.lat, 50)), ms(percentile(a.lat, 99)), a.errors, cpu, a.machinePerSession())
	}
	return aggs, nil
}

func (b *bench) memoryPhase() error {
	cfg := b.cfg
	type count struct {
		n int
		m mode
	}
	var counts []count
	for _, n := range cfg.sessions {
		counts = append(counts, count{n, modePlain})
	}
	for _, n := range cfg.tlsSessions {
		counts = append(counts, count{n, modeTLS})
	}
	for _, c := range counts {
		n := c.n
		for _, t := range b.targets {
			if t.pids == nil {
				continue
			}
			log.Printf("memory: %d idle %v sessions through %s", n, c.m, t.name)
			mr, err := b.measureIdle(t, n, c.m)
			if err != nil {
				return err
			}
			b.res.memory = append(b.res.memory, mr)
			if mr.errors > 0 {
				log.Printf("  %d errors, first: %v", mr.errors, mr.firstErr)
			} else {
				so, pi := mr.fdsPerSession()
				log.Printf("  RSS %d -> %d KiB: %.1f KiB per session; per session %.2f sockets and %.2f pipe ends", mr.before, mr.after, mr.perSession(), so, pi)
			}
		}
	}
	return nil
}

// measureIdle restarts the proxy (so earlier phases leave no reusable heap
// behind), warms it up, reads its RSS, opens n logged-in idle sessions,
// waits, reads the RSS again and checks every session with NOOP.
func (b *bench) measureIdle(t *target, n int, m mode) (*memResult, error) {
	cfg := b.cfg
	mr := &memResult{n: n, proxy: t.name, mode: m}
	if err := t.restart(); err != nil {
		return nil, fmt.Errorf("restarting %s: %w", t.name, err)
	}
	pids, err := t.pids()
	if err != nil {
		return nil, err
	}
	if mr.fdsFresh, err = openFDs(pids); err != nil {
		return nil, err
	}
	if r := runLoad(t, m, false, cfg.conc, 0, 200, b.users); r.errors > 0 {
		return nil, fmt.Errorf("%s warm-up: %d errors, first: %v", t.name, r.errors, r.firstErr)
	}
	warm, _, err := openIdle(t, m, min(100, n), cfg.openConc, b.users)
	if err != nil {
		return nil, fmt.Errorf("%s warm-up: %w", t.name, err)
	}
	closeAll(warm, cfg.openConc)
	time.Sleep(cfg.settle)
	if pids, err = t.pids(); err != nil {
		return nil, err
	}
	mr.fdLimit = procFDLimit(pids[len(pids)-1])
	if mr.before, err = rssKiB(pids); err != nil {
		return nil, err
	}
	if t.name == nameCaddy {
		mr.goroutinesBefore, _ = b.caddy.goroutines()
		mr.stackBefore, _ = b.caddy.goStack()
		mr.heapBefore, _ = b.caddy.liveHeap()
	}

	start := time.Now()
	conns, errs, firstErr := openIdle(t, m, n, cfg.openConc, b.users)
	mr.openTime = time.Since(start)
	mr.errors, mr.firstErr = errs, firstErr
	defer closeAll(conns, cfg.openConc)
	time.Sleep(cfg.settle)
	if pids, err = t.pids(); err != nil {
		return nil, err
	}
	if mr.after, err = rssKiB(pids); err != nil {
		return nil, err
	}
	mr.fdsAfter, _ = openFDs(pids)
	if t.name == nameCaddy {
		mr.goroutinesAfter, _ = b.caddy.goroutines()
		mr.stackAfter, _ = b.caddy.goStack()
		// What stays once the garbage of the logins is collected.
		mr.heapAfter, _ = b.caddy.liveHeap()
		time.Sleep(cfg.settle)
		mr.afterGC, _ = rssKiB(pids)
		if cfg.pprof && (m == modePlain && n == slices.Max(cfg.sessions) || m == modeTLS && n == slices.Max(cfg.tlsSessions)) {
			b.saveProfile(fmt.Sprintf("caddy-heap-%s-%d-idle.pb.gz", m.short(), n), "/debug/pprof/heap", 30*time.Second)
		}
	}
	if e, err := checkIdle(conns, cfg.openConc); e > 0 {
		mr.errors += e
		if mr.firstErr == nil {
			mr.firstErr = err
		}
	}
	mr.open = len(conns)
	return mr, nil
}

// profile records CPU profiles of Caddy (admin endpoint /debug/pprof) under
// each kind of load, after the measured rounds so as not to disturb them.
func (b *bench) profile() error {
	cfg := b.cfg
	caddy := b.targets[1]
	secs := cfg.pprofSeconds
	dur := time.Duration(secs) * time.Second
	for m := modePlain; m < numModes; m++ {
		log.Printf("pprof: %ds CPU profile of Caddy under %v logins", secs, m)
		done := make(chan struct{})
		go func() {
			defer close(done)
			runLoad(caddy, m, cfg.resume, cfg.conc, dur+time.Second, 0, b.users)
		}()
		time.Sleep(500 * time.Millisecond)
		b.saveProfile(fmt.Sprintf("caddy-cpu-login-%s.pb.gz", m.short()), fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), dur+30*time.Second)
		<-done
	}
	log.Printf("pprof: %ds CPU profile of Caddy during RETRs", secs)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, _, err := retr(caddy, b.retrUser, b.want); err != nil {
				log.Printf("pprof RETR: %v", err)
				return
			}
		}
	}()
	b.saveProfile("caddy-cpu-retr.pb.gz", fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), dur+30*time.Second)
	close(stop)
	<-done
	return nil
}

func (b *bench) saveProfile(name, path string, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	data, err := b.caddy.adminGet(ctx, path)
	if err != nil {
		log.Printf("pprof %s: %v", path, err)
		return
	}
	dir := filepath.Join(b.cfg.out, "pprof")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Printf("pprof: %v", err)
		return
	}
	file := filepath.Join(dir, name)
	if err := os.WriteFile(file, data, 0o644); err != nil {
		log.Printf("pprof: %v", err)
		return
	}
	b.res.profiles = append(b.res.profiles, file)
}
