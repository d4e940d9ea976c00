package main

import (
	"bufio"
	"bytes"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

// results is everything one run measured, for the report.
type results struct {
	started, finished  time.Time
	loadStart, loadEnd string
	versions           []string
	dovecotConf        string
	caddyfile          string
	nginxConf          string
	fdLimit            string
	retrBytes          int
	retr               map[string]*retrAgg
	login              map[mode]map[string]*loginAgg
	passwd             map[string]*loginAgg // pass-through and passwd_file logins through caddy-pop3
	latency            map[string]*loginAgg // plain sessions one at a time
	memory             []*memResult
	redis              *redisResult // with the plain phase
	profiles           []string
}

type retrAgg struct {
	mbps     []float64
	cpuTicks uint64 // proxy CPU during the RETR rounds (proxies only)
	bytes    int64
}

// cpuPerGB is proxy CPU seconds per 10^9 bytes relayed.
func (a *retrAgg) cpuPerGB() float64 {
	if a.bytes == 0 {
		return math.NaN()
	}
	return float64(a.cpuTicks) / clockTicks / (float64(a.bytes) / 1e9)
}

type loginAgg struct {
	rates    []float64       // sessions/s per round
	lat      []time.Duration // every session of every round
	sessions int
	errors   int
	firstErr error
	resumed  int
	tls      string
	cpuTicks uint64 // the proxy's CPU during the measured runs
	busy     uint64 // the whole machine's busy CPU during the measured runs
	// The shared store's (redis-server's) CPU and commands during the
	// measured runs, for a target with a store.
	store storeStats
}

// storeCPUPerSession is the shared store's CPU milliseconds per completed
// session.
func (a *loginAgg) storeCPUPerSession() float64 {
	if a.sessions == 0 {
		return math.NaN()
	}
	return float64(a.store.cpuTicks) * 1000 / clockTicks / float64(a.sessions)
}

// storePerSession is n (commands or scripts of the shared store) per
// completed session.
func (a *loginAgg) storePerSession(n uint64) float64 {
	if a.sessions == 0 {
		return math.NaN()
	}
	return float64(n) / float64(a.sessions)
}

// machinePerSession is the whole machine's busy CPU milliseconds (client,
// Dovecot, proxy and kernel) per completed session.
func (a *loginAgg) machinePerSession() float64 {
	if a.sessions == 0 {
		return math.NaN()
	}
	return float64(a.busy) * 1000 / clockTicks / float64(a.sessions)
}

// cpuPerSession is the proxy's CPU milliseconds per completed session.
func (a *loginAgg) cpuPerSession() float64 {
	if a.sessions == 0 {
		return math.NaN()
	}
	return float64(a.cpuTicks) * 1000 / clockTicks / float64(a.sessions)
}

func (a *loginAgg) sortLat() { slices.Sort(a.lat) }

type memResult struct {
	n                                 int
	proxy                             string
	mode                              mode
	before, after                     uint64  // RSS KiB
	fdsFresh, fdsAfter                fdCount // right after the restart; with the sessions open
	goroutinesBefore, goroutinesAfter int
	stackBefore, stackAfter           float64 // Caddy's goroutine stacks, bytes
	heapBefore, heapAfter             float64 // Caddy's live Go heap after a forced GC, bytes
	afterGC                           uint64  // Caddy's RSS KiB a settle time after that GC
	open                              int
	openTime                          time.Duration
	errors                            int
	firstErr                          error
	fdLimit                           string
}

// opened is the divisor of the per-session figures: the sessions that
// were open when the RSS was read (all of them unless some failed).
func (m *memResult) opened() float64 { return float64(max(m.open, 1)) }

func (m *memResult) perSession() float64 {
	return (float64(m.after) - float64(m.before)) / m.opened()
}

// fdsPerSession is the growth in sockets and pipe ends per session from
// the fresh process: Go keeps the pipes of finished splices in a pool until
// a GC or two, so after the warm-up some are already open, and the new
// sessions take them over.
func (m *memResult) fdsPerSession() (sockets, pipes float64) {
	n := m.opened()
	return float64(m.fdsAfter.sockets-m.fdsFresh.sockets) / n, float64(m.fdsAfter.pipes-m.fdsFresh.pipes) / n
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "?"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

func kernel() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "?"
	}
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

func versions(caddyBin, nginxBin string) []string {
	v := []string{
		"pop3bench built with " + runtime.Version(),
		"Caddy: " + versionOf(caddyBin, "version"),
		"NGINX: " + strings.TrimPrefix(versionOf(nginxBin, "-v"), "nginx version: "),
	}
	if dv := versionOf("dovecot", "--version"); dv != "?" {
		v = append(v, "Dovecot: "+dv)
	} else {
		v = append(v, "Dovecot: "+versionOf("/usr/sbin/dovecot", "--version"))
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		v = append(v, "caddy-pop3 source: "+strings.TrimSpace(string(out)))
	}
	return v
}

func f1(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.1f", v)
}

func f2(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

func f0(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.0f", v)
}

// x formats a ratio.
func x(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", v)
}

func shortErr(err error) string {
	if err == nil {
		return ""
	}
	s := strings.ReplaceAll(err.Error(), "|", "/")
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 160 {
		s = s[:160] + "…"
	}
	return s
}

// report writes OUT/results.md and OUT/login-latency.png and prints the
// Markdown. failed is true when any session failed.
func (b *bench) report() (failed bool, err error) {
	cfg, r := b.cfg, &b.res
	var w bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&w, format+"\n", args...) }
	host, _ := os.Hostname()

	p("# POP3 proxy benchmark: caddy-pop3, NGINX mail proxy, Dovecot directly")
	p("")
	p("- Run: %s, %s on %s (%s, %d CPUs, Linux %s)", r.started.Format("2006-01-02 15:04 MST"), r.finished.Sub(r.started).Round(time.Second), host, cpuModel(), runtime.NumCPU(), kernel())
	p("- Load average (1/5/15 min): %s at the start, %s at the end", r.loadStart, r.loadEnd)
	p("- Command: `pop3bench %s`", strings.Join(cfg.args, " "))
	p("- %s", strings.Join(r.versions, "; "))
	p("- Open files limit: %s", r.fdLimit)
	p("")
	also := ""
	if r.redis != nil {
		also = " (for caddy-pop3's limits in Redis, a private redis-server and a second Caddy)"
	}
	p("Everything runs on loopback on this machine: a private Dovecot, Caddy with caddy-pop3, a private NGINX with its mail module%s, and the Go client, which is the same for the three paths. Rounds interleave the paths, starting with a different one each round, so that noise from the machine hits all three alike. Medians are over rounds.", also)
	p("")

	if r.retr != nil {
		d, c, n := median(r.retr[nameDirect].mbps), median(r.retr[nameCaddy].mbps), median(r.retr[nameNginx].mbps)
		p("## RETR throughput")
		p("")
		p("One %d MiB message (%d bytes of RETR response), fetched %d times per path over plain POP3; every copy's sha256 is checked. MB/s = 10^6 bytes of response / time from sending `RETR 1` to the final `.`.", cfg.sizeMiB, r.retrBytes, cfg.rounds)
		p("")
		p("| path | median MB/s | min | max | vs direct | caddy-pop3 / NGINX |")
		p("|---|---:|---:|---:|---:|---:|")
		for _, t := range b.targets {
			a := r.retr[t.name]
			lo, hi := minMax(a.mbps)
			vs, cn := "", ""
			switch t.name {
			case nameCaddy:
				vs, cn = x(ratio(c, d)), x(ratio(c, n))
			case nameNginx:
				vs = x(ratio(n, d))
			}
			p("| %s | %s | %s | %s | %s | %s |", t.name, f1(median(a.mbps)), f1(lo), f1(hi), vs, cn)
		}
		p("")
		cc, cn := r.retr[nameCaddy], r.retr[nameNginx]
		p("## Proxy CPU per GB relayed")
		p("")
		p("utime+stime of the proxy's processes (Caddy; NGINX's master and workers) from /proc/<pid>/stat, read before and after the RETR rounds (the proxy is idle while the other paths run; its logins for the RETRs are included), divided by the 10^9 bytes of RETR responses it relayed. The unit is the 10 ms clock tick, so totals of a few ticks are coarse: raise -rounds or -size for precision.")
		p("")
		p("| proxy | CPU seconds per GB | CPU seconds | GB relayed | caddy-pop3 / NGINX |")
		p("|---|---:|---:|---:|---:|")
		p("| %s | %s | %.2f | %.3f | %s |", nameCaddy, f2(cc.cpuPerGB()), float64(cc.cpuTicks)/clockTicks, float64(cc.bytes)/1e9, x(ratio(cc.cpuPerGB(), cn.cpuPerGB())))
		p("| %s | %s | %.2f | %.3f | |", nameNginx, f2(cn.cpuPerGB()), float64(cn.cpuTicks)/clockTicks, float64(cn.bytes)/1e9)
		p("")
	}

	var panels []panel
	if r.login != nil {
		what := fmt.Sprintf("%d rounds of %v per path", cfg.loginRounds, cfg.loginDur)
		if cfg.loginCount > 0 {
			what = fmt.Sprintf("%d rounds of %d sessions per path", cfg.loginRounds, cfg.loginCount)
		}
		p("## Login rate and latency")
		p("")
		p("%d clients at once, each repeating one session: connect (and TLS), `USER`, `PASS`, `STAT`, `QUIT`, one round trip per command; %s and mode. sessions/s is the median over rounds of completed sessions / wall time; p50 and p99 are over every session of every round, from connect to the `QUIT` reply; proxy CPU per session is the utime+stime of the proxy's processes during its runs / its sessions (NGINX's includes its auth_http requests, whose answers cost pop3bench, not NGINX); machine CPU per session is the busy time of all CPUs (client, Dovecot, proxy, kernel; /proc/stat) during a path's runs / its sessions, so the difference to direct is what a path adds to the machine (over TLS the direct path resumes fewer TLS sessions, whose full handshakes cost the client and Dovecot more, so a proxy can come out below it). TLS: client session resumption %s, key exchange %s. NGINX asks the auth_http stand-in (in pop3bench) at every login; caddy-pop3 %s.", cfg.conc, what, onOff(cfg.resume), kexName(cfg.pq), map[bool]string{false: "has a static upstream", true: "asks it too (-caddy-auth-http)"}[cfg.caddyAuthHTTP])
		p("")
		p("| mode | path | sessions/s | p50 ms | p99 ms | rate vs direct | rate caddy-pop3 / NGINX | p50 vs direct | p99 vs direct | proxy CPU ms per session | machine CPU ms per session | errors | TLS resumed | TLS |")
		p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
		for m := modePlain; m < numModes; m++ {
			aggs, ok := r.login[m]
			if !ok {
				continue
			}
			d := aggs[nameDirect]
			dRate, dP50, dP99 := median(d.rates), ms(percentile(d.lat, 50)), ms(percentile(d.lat, 99))
			nRate := median(aggs[nameNginx].rates)
			var ps []series
			var names []string
			for _, t := range b.targets {
				names = append(names, t.name)
			}
			for _, name := range []string{nameCaddyLimits, nameCaddyRedis} {
				if _, ok := aggs[name]; ok {
					names = append(names, name)
				}
			}
			for _, name := range names {
				a := aggs[name]
				rate, p50, p99 := median(a.rates), ms(percentile(a.lat, 50)), ms(percentile(a.lat, 99))
				vsRate, cn, vs50, vs99 := "", "", "", ""
				if name != nameDirect {
					vsRate, vs50, vs99 = x(ratio(rate, dRate)), x(ratio(p50, dP50)), x(ratio(p99, dP99))
				}
				if name == nameCaddy {
					cn = x(ratio(rate, nRate))
				}
				resumed := "–"
				if m != modePlain && a.sessions > 0 {
					resumed = fmt.Sprintf("%.0f%%", 100*float64(a.resumed)/float64(a.sessions))
				}
				errs := fmt.Sprint(a.errors)
				if a.errors > 0 {
					failed = true
					errs = fmt.Sprintf("**%d** (%s)", a.errors, shortErr(a.firstErr))
				}
				tlsDesc := a.tls
				if tlsDesc == "" {
					tlsDesc = "–"
				}
				cpu := ""
				if name != nameDirect {
					cpu = f2(a.cpuPerSession())
					if name == nameCaddy {
						cpu += " (" + x(ratio(a.cpuPerSession(), aggs[nameNginx].cpuPerSession())) + " NGINX)"
					}
				}
				machine := f2(a.machinePerSession())
				if name != nameDirect {
					machine += fmt.Sprintf(" (%+.2f)", a.machinePerSession()-d.machinePerSession())
				}
				p("| %v | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", m, name, f0(rate), f2(p50), f2(p99), vsRate, cn, vs50, vs99, cpu, machine, errs, resumed, tlsDesc)
				// The chart compares the three servers.
				if col, ok := pathColor[name]; ok {
					ps = append(ps, series{name: name, lat: a.lat, col: col})
				}
			}
			panels = append(panels, panel{title: m.String(), series: ps})
		}
		p("")
		p("![login latency CDF](login-latency.png)")
		p("")
		p("`login-latency.png`: the cumulative distribution of session latencies per mode (y: share of sessions that finished within x ms) of the three servers. With %d clients, sessions/s ≈ %d / mean latency: a path whose CDF starts far from 0 (a fixed wait in every session) is limited by that wait, not by CPU; a larger -c tells the two apart.", cfg.conc, cfg.conc)
		p("")
		if on, ok := r.login[modePlain][nameCaddyLimits]; ok {
			b.limitsReport(p, r.login[modePlain][nameCaddy], on)
			if red, ok := r.login[modePlain][nameCaddyRedis]; ok && b.redisReport(p, on, red) {
				failed = true
			}
		}
	}

	if r.passwd != nil {
		what := fmt.Sprintf("%d rounds of %v per path", cfg.loginRounds, cfg.loginDur)
		if cfg.loginCount > 0 {
			what = fmt.Sprintf("%d rounds of %d sessions per path", cfg.loginRounds, cfg.loginCount)
		}
		base := r.passwd[nameCaddy]
		bRate, b50, b99, bCPU := median(base.rates), ms(percentile(base.lat, 50)), ms(percentile(base.lat, 99)), base.cpuPerSession()
		p("## Login rate with passwd_file at the proxy")
		p("")
		p("caddy-pop3 checking each password itself against a `passwd_file` of BLF-CRYPT (bcrypt) hashes made by `doveadm pw -s BLF-CRYPT` (doveadm's default cost), then logging in to the same Dovecot as a master user (`master_login`: AUTH PLAIN with the user as authorization identity; Dovecot knows each of these users by another password, so only the master login gets in), without and with `auth_cache` (ttl 1h; the warm-up fills it, so the measured logins hit it), compared with caddy-pop3's pass-through plain logins (%s), in the same interleaved rounds: %d clients at once, plain POP3, connect, `USER`, `PASS`, `STAT`, `QUIT`; %s; %d users per path. Measured as in the login-rate table (these pass-through figures are this phase's own runs). proxy CPU ms per login is Caddy's utime+stime during a path's runs / its sessions.", map[bool]string{false: "a static upstream", true: "asking the auth_http stand-in (-caddy-auth-http)"}[cfg.caddyAuthHTTP], cfg.conc, what, len(b.passwd.users))
		p("")
		p("| path | sessions/s | p50 ms | p99 ms | rate vs pass-through | p50 vs pass-through | p99 vs pass-through | proxy CPU ms per login | CPU vs pass-through | machine CPU ms per session | errors |")
		p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, name := range []string{nameCaddy, namePasswd, namePasswdCached} {
			a := r.passwd[name]
			rate, p50, p99, cpu := median(a.rates), ms(percentile(a.lat, 50)), ms(percentile(a.lat, 99)), a.cpuPerSession()
			label := name
			vsRate, vs50, vs99, vsCPU := "", "", "", ""
			if name == nameCaddy {
				label = nameCaddy + " pass-through"
			} else {
				vsRate, vs50, vs99, vsCPU = x(ratio(rate, bRate)), x(ratio(p50, b50)), x(ratio(p99, b99)), x(ratio(cpu, bCPU))
			}
			errs := fmt.Sprint(a.errors)
			if a.errors > 0 {
				failed = true
				errs = fmt.Sprintf("**%d** (%s)", a.errors, shortErr(a.firstErr))
			}
			p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", label, f0(rate), f2(p50), f2(p99), vsRate, vs50, vs99, f2(cpu), vsCPU, f2(a.machinePerSession()), errs)
		}
		p("")
	}

	if r.latency != nil {
		d := r.latency[nameDirect]
		dP50, dP99 := ms(percentile(d.lat, 50)), ms(percentile(d.lat, 99))
		p("## Login latency with one client")
		p("")
		p("One client, one plain session at a time (connect, `USER`, `PASS`, `STAT`, `QUIT`), %d rounds of %d sessions per path, interleaved: the latency a proxy adds when nothing queues for the CPUs. p50 and p99 are over every session of every round, from connect to the `QUIT` reply.", cfg.loginRounds, cfg.latencyCount)
		p("")
		p("| path | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU ms per session | errors |")
		p("|---|---:|---:|---:|---:|---:|---:|")
		for _, t := range b.targets {
			a := r.latency[t.name]
			p50, p99 := ms(percentile(a.lat, 50)), ms(percentile(a.lat, 99))
			add50, add99, cpu := "", "", ""
			if t.name != nameDirect {
				add50, add99, cpu = fmt.Sprintf("%+.2f", p50-dP50), fmt.Sprintf("%+.2f", p99-dP99), f2(a.cpuPerSession())
			}
			errs := fmt.Sprint(a.errors)
			if a.errors > 0 {
				failed = true
				errs = fmt.Sprintf("**%d** (%s)", a.errors, shortErr(a.firstErr))
			}
			p("| %s | %s | %s | %s | %s | %s | %s |", t.name, f2(p50), f2(p99), add50, add99, cpu, errs)
		}
		p("")
	}

	if len(r.memory) > 0 {
		p("## Memory per idle session")
		p("")
		p("For each count, the proxy is restarted, warmed up (200 short sessions, 100 idle ones opened and closed), and its RSS (VmRSS from /proc/<pid>/status; NGINX: master + workers) is read before and %v after opening that many logged-in idle sessions (plain POP3, or TLS from the first byte as on port 995; USER/PASS, then nothing); KiB per session = the difference / count. Afterwards every session must answer `NOOP`. fds per session: the growth in the proxy's open sockets and pipe ends (splice(2) buffers) from the freshly started process / count. For Caddy, the growth in goroutines and in goroutine stack memory (`go_memstats_stack_inuse_bytes` from the admin endpoint's /metrics) shows how much of the RSS is stacks; pipes live in kernel memory, outside RSS. The RSS read %v after opening still holds the garbage of the logins: Go collects it at its next GC, which an idle process runs within two minutes. The last two columns show what stays: Caddy's RSS %v after a forced GC (`/debug/pprof/heap?gc=1`), per session, and its live Go heap after a GC (`go_memstats_heap_alloc_bytes`, the growth from before the sessions), per session.", cfg.settle, cfg.settle, cfg.settle)
		p("")
		p("| sessions | mode | proxy | RSS before MiB | RSS with sessions MiB | KiB per session | caddy-pop3 / NGINX | fds per session: sockets + pipe ends | goroutines per session | Go stack KiB per session | open time s | errors | RSS KiB per session after a GC | live Go heap KiB per session |")
		p("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, m := range r.memory {
			cn := ""
			if m.proxy == nameCaddy {
				for _, o := range r.memory {
					if o.n == m.n && o.mode == m.mode && o.proxy == nameNginx {
						cn = x(ratio(m.perSession(), o.perSession()))
					}
				}
			}
			gr, gm, rg, lh := "–", "–", "–", "–"
			if m.proxy == nameCaddy && m.goroutinesAfter > 0 {
				gr = f2(float64(m.goroutinesAfter-m.goroutinesBefore) / m.opened())
			}
			if m.proxy == nameCaddy && m.stackAfter > 0 {
				gm = f1((m.stackAfter - m.stackBefore) / 1024 / m.opened())
			}
			if m.proxy == nameCaddy && m.afterGC > 0 {
				rg = f1((float64(m.afterGC) - float64(m.before)) / m.opened())
			}
			if m.proxy == nameCaddy && m.heapAfter > 0 {
				lh = f1((m.heapAfter - m.heapBefore) / 1024 / m.opened())
			}
			errs := fmt.Sprint(m.errors)
			if m.errors > 0 {
				failed = true
				errs = fmt.Sprintf("**%d** of %d (%s; the proxy's open files limit is %s; per-session figures are over the %d sessions that opened)", m.errors, m.n, shortErr(m.firstErr), m.fdLimit, m.open)
			}
			so, pi := m.fdsPerSession()
			p("| %d | %v | %s | %.1f | %.1f | %s | %s | %s + %s | %s | %s | %.1f | %s | %s | %s |", m.n, m.mode, m.proxy, float64(m.before)/1024, float64(m.after)/1024, f1(m.perSession()), cn, f2(so), f2(pi), gr, gm, m.openTime.Seconds(), errs, rg, lh)
		}
		p("")
	}

	if len(r.profiles) > 0 {
		p("## Profiles")
		p("")
		p("CPU and heap profiles of Caddy, taken from its admin endpoint after the measured rounds (`go tool pprof -top %s FILE`):", cfg.caddyBin)
		p("")
		for _, f := range r.profiles {
			rel, err := filepath.Rel(cfg.out, f)
			if err != nil {
				rel = f
			}
			p("- `%s`", rel)
		}
		p("")
	}

	p("## Configuration")
	p("")
	p("<details><summary>Caddyfile</summary>")
	p("")
	p("```")
	w.WriteString(r.caddyfile)
	p("```")
	p("</details>")
	p("")
	if r.redis != nil {
		p("<details><summary>Caddyfile of the second Caddy (limits in Redis)</summary>")
		p("")
		p("```")
		w.WriteString(r.redis.caddyfile)
		p("```")
		p("</details>")
		p("")
	}
	p("<details><summary>nginx.conf</summary>")
	p("")
	p("```nginx")
	w.WriteString(r.nginxConf)
	p("```")
	p("</details>")
	p("")
	p("<details><summary>Dovecot settings added to internal/dovecot's configuration</summary>")
	p("")
	p("```")
	w.WriteString(r.dovecotConf)
	p("```")
	p("</details>")

	fmt.Println()
	tables, _, _ := strings.Cut(w.String(), "## Configuration")
	fmt.Print(tables)
	file := filepath.Join(cfg.out, "results.md")
	if err := os.WriteFile(file, w.Bytes(), 0o644); err != nil {
		return failed, err
	}
	fmt.Printf("\nwrote %s\n", file)
	if len(panels) > 0 {
		png := filepath.Join(cfg.out, "login-latency.png")
		sub := fmt.Sprintf("%d concurrent clients; connect, USER, PASS, STAT, QUIT; %s", cfg.conc, r.started.Format("2006-01-02"))
		if err := drawCDFs(png, "POP3 login latency (CDF)", sub, panels); err != nil {
			return failed, err
		}
		fmt.Printf("wrote %s\n", png)
	}
	return failed, nil
}

// limitsReport writes the section that compares caddy-pop3's plain logins
// with every limit on (none reached) with its plain logins without limits,
// from the same rounds of the login-rate table (whose rows show the errors
// in full).
func (b *bench) limitsReport(p func(string, ...any), off, on *loginAgg) {
	p("## Plain logins with limits on")
	p("")
	p("caddy-pop3's plain listener as above with a `limits` block that sets every option (below) to values the benchmark's clients never reach: they all come from 127.0.0.1 as %d users, at most %d sessions at once, and every login succeeds, so no session is refused, no failure counted and nothing blocked; 127.0.0.1 is not exempt, so every limit is evaluated for every session. Its runs are the `%s` row of the login-rate table, each right beside a run of the `%s` row (limits off) in the same round, after it in even rounds and before it in odd ones. on / off is the ratio of the two.", len(b.users), b.cfg.conc, nameCaddyLimits, nameCaddy)
	p("")
	row := b.compareTable(p, "limits off", "limits on", "on / off", off, on)
	row("machine CPU ms per session", f2, off.machinePerSession(), on.machinePerSession())
	p("| errors | %d | %d | |", off.errors, on.errors)
	p("")
	p("```")
	for _, l := range limitsBlock {
		p("%s", l)
	}
	p("```")
	p("")
}

// compareTable starts a table that compares the plain logins of path
// other with those of path base: its head, then rows of sessions/s, p50,
// p99 and proxy CPU per session with the ratio other / base. row adds
// another.
func (b *bench) compareTable(p func(string, ...any), baseName, otherName, ratioName string, base, other *loginAgg) (row func(what string, f func(float64) string, vBase, vOther float64)) {
	p("| plain, %d clients | %s | %s | %s |", b.cfg.conc, baseName, otherName, ratioName)
	p("|---|---:|---:|---:|")
	row = func(what string, f func(float64) string, vBase, vOther float64) {
		p("| %s | %s | %s | %s |", what, f(vBase), f(vOther), x(ratio(vOther, vBase)))
	}
	row("sessions/s", f0, median(base.rates), median(other.rates))
	row("p50 ms", f2, ms(percentile(base.lat, 50)), ms(percentile(other.lat, 50)))
	row("p99 ms", f2, ms(percentile(base.lat, 99)), ms(percentile(other.lat, 99)))
	row("proxy CPU ms per session", f2, base.cpuPerSession(), other.cpuPerSession())
	return row
}

// redisReport writes the section that compares the plain logins through
// the second Caddy, whose limits zone is in Redis, with the same limits in
// process (the "limits on" listener of the first Caddy), from the same
// rounds of the login-rate table. failed is true when the second Caddy
// did not keep its zone in Redis throughout: a Redis call failed (and was
// decided in its own memory), or Redis holds no key of the zone.
func (b *bench) redisReport(p func(string, ...any), local, red *loginAgg) (failed bool) {
	res := b.res.redis
	p("## Plain logins with limits in Redis")
	p("")
	p("The limits block above in a zone named `%s` that lives in Redis: a second Caddy process with one plain listener (the same pop3 handler and limits, to the same Dovecot) and the `pop3` app's `redis` block, to a redis-server that pop3bench runs on loopback (internal/redistest: no persistence). Every zone of a Caddy with that block is in Redis, so the same limits in process are the `%s` listener of the first Caddy, which has no `pop3` app, and only the two processes' rows are compared here. Its runs are the `%s` row of the login-rate table, each right beside a run of `%s` in the same round (after it in even rounds, before it in odd ones; that one runs beside limits off in turn). Redis / in process is the ratio of the two. Proxy CPU is Caddy's alone; redis-server's is its own row (utime+stime from /proc), and machine CPU counts both; Redis commands per session are redis-server's `total_commands_processed` during the runs (INFO), which counts the commands that Lua scripts run as well as those that Caddy sends; script runs are the calls of EVALSHA and EVAL (`cmdstat_evalsha`, `cmdstat_eval`), each one call from Caddy that runs several commands at once.", redisZone, nameCaddyLimits, nameCaddyRedis, nameCaddyLimits)
	p("")
	row := b.compareTable(p, "in process", "Redis", "Redis / in process", local, red)
	p("| redis-server CPU ms per session | | %s | |", f2(red.storeCPUPerSession()))
	row("proxy + redis-server CPU ms per session", f2, local.cpuPerSession(), red.cpuPerSession()+red.storeCPUPerSession())
	row("machine CPU ms per session", f2, local.machinePerSession(), red.machinePerSession())
	p("| Redis commands per session (those its Lua scripts run included) | | %s | |", f1(red.storePerSession(red.store.commands)))
	p("| Lua script runs per session (EVALSHA, EVAL) | | %s | |", f1(red.storePerSession(red.store.scripts)))
	p("| errors | %d | %d | |", local.errors, red.errors)
	p("| failed Redis calls (`%s`) | | %.0f | |", storeErrorsMetric, res.storeErrors)
	p("| keys of the zone in Redis after the runs | | %d | |", res.zoneKeys)
	p("")
	p("```")
	p("pop3 {")
	p("\tredis %s", b.redis.server.Addr)
	p("}")
	for _, l := range redisLimitsBlock() {
		p("%s", l)
	}
	p("```")
	p("")
	if res.storeErrors != 0 || res.zoneKeys == 0 || red.store.commands == 0 {
		p("**The zone did not stay in Redis throughout** (failed calls were decided in the second Caddy's own memory): these figures are not Redis's.")
		p("")
		return true
	}
	return false
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func kexName(pq bool) string {
	if pq {
		return "Go's default (X25519MLKEM768 where the server has it)"
	}
	return "X25519 (P-256 offered too)"
}

// message builds a CRLF message with lines that need dot-stuffing, 8-bit
// bytes and a 998-octet line.
func message(size int) []byte {
	var b bytes.Buffer
	b.Grow(size + 1024)
	b.WriteString("From: bench@example.com\r\nSubject: bench\r\n\r\n")
	long := strings.Repeat("x", 998) + "\r\n"
	for i := 0; b.Len() < size; i++ {
		switch i % 4 {
		case 0:
			b.WriteString(".leading dot line\r\n")
		case 1:
			b.WriteString("8-bit \xe9\xff\x80 bytes\r\n")
		case 2:
			b.WriteString(long)
		default:
			b.WriteString("plain line of text for the benchmark\r\n")
		}
	}
	return b.Bytes()
}

// dotStuff is what RETR sends for msg, without the final ".\r\n".
func dotStuff(msg []byte) []byte {
	var out bytes.Buffer
	out.Grow(len(msg) + len(msg)/50)
	for _, line := range bytes.SplitAfter(msg, []byte("\r\n")) {
		if bytes.HasPrefix(line, []byte(".")) {
			out.WriteByte('.')
		}
		out.Write(line)
	}
	return out.Bytes()
}
