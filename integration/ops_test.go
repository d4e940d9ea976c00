//go:build integration

package integration

// Operations through Caddy's admin endpoint: config reloads with live
// sessions (POST /load), drain_timeout, the Prometheus metrics at /metrics,
// the /pop3/sessions admin API, the pop3_login and pop3_auth_failed events,
// and example.json (the JSON form of Caddyfile.example).

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// --- admin endpoint ----------------------------------------------------------

// adminCaddy is a Caddy run whose admin endpoint listens on admin.
type adminCaddy struct {
	*caddyProc
	admin string // "127.0.0.1:PORT"
}

// startAdminCaddy starts Caddy with the Caddyfile that mk returns for a
// free admin address, waits for the listeners and the admin endpoint.
func startAdminCaddy(t *testing.T, name string, mk func(admin string) string, listeners ...listener) *adminCaddy {
	t.Helper()
	admin, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	a := &adminCaddy{caddyProc: startCaddy(t, name, mk(admin), listeners...), admin: admin}
	waitFor(t, 10*time.Second, "the admin endpoint", func() bool {
		code, _, err := a.try(http.MethodGet, "/config/", "", nil)
		return err == nil && code == http.StatusOK
	})
	return a
}

var adminClient = &http.Client{Timeout: 30 * time.Second}

// try sends one request to the admin endpoint. Caddy accepts a Host of
// 127.0.0.1:PORT, localhost:PORT or [::1]:PORT on a loopback admin address
// (admin.go allowedOrigins), which is what Go sends for this URL.
func (a *adminCaddy) try(method, path, contentType string, body []byte) (int, []byte, error) {
	req, err := http.NewRequest(method, "http://"+a.admin+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// do is try that fails the test on a transport error.
func (a *adminCaddy) do(t *testing.T, method, path, contentType string, body []byte) (int, []byte) {
	t.Helper()
	code, b, err := a.try(method, path, contentType, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return code, b
}

// load replaces the config with POST /load.
func (a *adminCaddy) load(t *testing.T, contentType string, cfg []byte) {
	t.Helper()
	if code, b := a.do(t, http.MethodPost, "/load", contentType, cfg); code != http.StatusOK {
		t.Fatalf("POST /load (%s): %d %s", contentType, code, b)
	}
}

func (a *adminCaddy) loadCaddyfile(t *testing.T, cf string) {
	t.Helper()
	a.load(t, "text/caddyfile", []byte(cf))
}

// adminSession is one entry of GET /pop3/sessions.
type adminSession struct {
	ID         string    `json:"id"`
	User       string    `json:"user"`
	Remote     string    `json:"remote"`
	Upstream   string    `json:"upstream"`
	State      string    `json:"state"`
	TLS        bool      `json:"tls"`
	Start      time.Time `json:"start"`
	FromClient int64     `json:"bytes_from_client"`
	ToClient   int64     `json:"bytes_to_client"`
}

// sessions lists the live sessions, filtered by query (e.g. "user=alice").
func (a *adminCaddy) sessions(t *testing.T, query string) []adminSession {
	t.Helper()
	path := "/pop3/sessions"
	if query != "" {
		path += "?" + query
	}
	return getList[adminSession](t, a, path)
}

// getList sends GET path, which must answer 200 with a JSON list of T
// whose entries hold no field that T lacks.
func getList[T any](t *testing.T, a *adminCaddy, path string) []T {
	t.Helper()
	code, b := a.do(t, http.MethodGet, path, "", nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, code, b)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var out []T
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("GET %s: %v\n%s", path, err, b)
	}
	if out == nil {
		t.Fatalf("GET %s: %s, want a JSON list", path, b)
	}
	return out
}

// bySession finds the session whose remote address is the client's.
func bySession(list []adminSession, c *client) *adminSession {
	for i := range list {
		if list[i].Remote == c.tcp.LocalAddr().String() {
			return &list[i]
		}
	}
	return nil
}

// kick closes sessions with DELETE /pop3/sessions?query and returns how
// many it closed.
func (a *adminCaddy) kick(t *testing.T, query string) int {
	t.Helper()
	return a.deleteCounting(t, "/pop3/sessions?"+query, "closed")
}

// deleteCounting sends DELETE path, which must answer 200 with a JSON
// object holding a count in field, and returns the count.
func (a *adminCaddy) deleteCounting(t *testing.T, path, field string) int {
	t.Helper()
	code, b := a.do(t, http.MethodDelete, path, "", nil)
	if code != http.StatusOK {
		t.Fatalf("DELETE %s: %d %s", path, code, b)
	}
	var r map[string]*int
	if err := json.Unmarshal(b, &r); err != nil || r[field] == nil {
		t.Fatalf("DELETE %s: %q, want {%q:N}", path, b, field)
	}
	return *r[field]
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// --- metrics ----------------------------------------------------------------

// metricSet is one scrape of /metrics: sample name with its sorted labels
// (`name{a="1",b="2"}`) to value.
type metricSet map[string]float64

var sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)`)
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func (a *adminCaddy) metrics(t *testing.T) metricSet {
	t.Helper()
	code, b := a.do(t, http.MethodGet, "/metrics", "", nil)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, b)
	}
	m := metricSet{}
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		s := sampleLine.FindStringSubmatch(l)
		if s == nil {
			t.Fatalf("GET /metrics: cannot parse %q", l)
		}
		var labels []string
		for _, p := range labelPair.FindAllStringSubmatch(s[2], -1) {
			labels = append(labels, p[1], p[2])
		}
		v, err := strconv.ParseFloat(s[3], 64)
		if err != nil {
			t.Fatalf("GET /metrics: value of %q: %v", l, err)
		}
		m[metricKey(s[1], labels...)] = v
	}
	return m
}

// metricKey is the key of a sample: name and label name/value pairs.
func metricKey(name string, labels ...string) string {
	var pairs []string
	for i := 0; i+1 < len(labels); i += 2 {
		pairs = append(pairs, labels[i]+"="+strconv.Quote(labels[i+1]))
	}
	sort.Strings(pairs)
	if len(pairs) == 0 {
		return name
	}
	return name + "{" + strings.Join(pairs, ",") + "}"
}

func (m metricSet) get(name string, labels ...string) float64 {
	return m[metricKey(name, labels...)]
}

func (m metricSet) has(name string, labels ...string) bool {
	_, ok := m[metricKey(name, labels...)]
	return ok
}

const pfx = "caddy_layer4_pop3_"

// --- the 32 MiB message -------------------------------------------------------

var bigRetr struct {
	once sync.Once
	sum  [32]byte
	size int64
}

// bigRetrBody returns the sha256 and length of what RETR 2 of bigmail
// sends after its +OK line: the dot-stuffed message and ".\r\n".
func bigRetrBody() ([32]byte, int64) {
	bigRetr.once.Do(func() {
		b := append(stuffed(env.bigMsgs[1]), ".\r\n"...)
		bigRetr.sum, bigRetr.size = sha256.Sum256(b), int64(len(b))
	})
	return bigRetr.sum, bigRetr.size
}

// --- reload -----------------------------------------------------------------

// reloadConfig is what TestReload changes between loads.
type reloadConfig struct {
	admin, main, drain, keep string // addresses
	greeting                 string
	upstream                 string // the main listener's upstream line and block
}

func (rc reloadConfig) caddyfile() string {
	return fmt.Sprintf(`{
	admin %[1]s
	log {
		level DEBUG
	}
	layer4 {
		# the listener whose upstream and greeting change
		%[2]s {
			route {
				pop3 {
					%[6]s
					starttls off
					greeting %[5]q
					auth_failure_delay 1ms
				}
			}
		}
		# old sessions closed 1s after a reload
		%[3]s {
			route {
				pop3 %[7]s {
					starttls off
					greeting %[5]q
					drain_timeout 1s
				}
			}
		}
		# old sessions kept (the default)
		%[4]s {
			route {
				pop3 %[7]s {
					starttls off
					greeting %[5]q
				}
			}
		}
	}
}
`, rc.admin, rc.main, rc.drain, rc.keep, rc.greeting, rc.upstream, env.dc.POP3Addr)
}

// TestReload replaces the config with POST /load while sessions run: a
// 32 MiB RETR on a slow reader finishes byte-exact, new sessions get the
// new greeting and upstream while old logged-in ones keep theirs, and
// drain_timeout closes old sessions after the reload where the default
// keeps them.
func TestReload(t *testing.T) {
	need(t)
	usedSecret(big, bigPass)
	usedSecret(alice, alicePass)
	ports := make([]string, 4)
	for i := range ports {
		var err error
		if ports[i], err = freePort(); err != nil {
			t.Fatal(err)
		}
	}
	closed := ports[3]
	rc := reloadConfig{main: ports[0], drain: ports[1], keep: ports[2], greeting: "config 1", upstream: "upstream " + env.dc.POP3Addr}
	a := startAdminCaddy(t, "reload", func(admin string) string { rc.admin = admin; return rc.caddyfile() },
		listener{addr: rc.main}, listener{addr: rc.drain}, listener{addr: rc.keep})
	generation := 1
	reload := func(t *testing.T, change func(*reloadConfig)) {
		t.Helper()
		generation++
		rc.greeting = fmt.Sprintf("config %d", generation)
		if change != nil {
			change(&rc)
		}
		a.loadCaddyfile(t, rc.caddyfile())
	}
	dial := func(t *testing.T, addr string) *client { return dialPOP3(t, addr, nil) }
	wantGreeting := func(t *testing.T, c *client) {
		t.Helper()
		if want := "+OK " + rc.greeting; c.greeting != want {
			t.Errorf("greeting of a new session: %q, want %q", c.greeting, want)
		}
	}

	t.Run("retr-across-reload", func(t *testing.T) {
		wantSum, wantSize := bigRetrBody()
		c := dial(t, rc.main)
		c.login(big, bigPass)
		c.deadline(120 * time.Second)
		if r := c.cmd("RETR 2"); !strings.HasPrefix(r, "+OK") {
			t.Fatalf("RETR 2: %q", r)
		}
		h := sha256.New()
		// A slow reader: 4 MiB in 64 KiB steps, so that the transfer is
		// well under way (and the socket buffers full) at the reload.
		var got int64
		for got < 4<<20 {
			n, err := io.CopyN(h, c.r, 64<<10)
			got += n
			if err != nil {
				t.Fatalf("RETR 2 after %d bytes: %v", got, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
		reload(t, nil)
		n := dial(t, rc.main)
		wantGreeting(t, n)
		n.quit()

		m, err := io.CopyN(h, c.r, wantSize-got)
		got += m
		if err != nil {
			t.Fatalf("RETR 2 after the reload, at %d of %d bytes: %v", got, wantSize, err)
		}
		if sum := h.Sum(nil); !bytes.Equal(sum, wantSum[:]) {
			t.Errorf("RETR 2 across the reload: sha256 %x, want %x", sum[:8], wantSum[:8])
		}
		c.deadline(30 * time.Second)
		if c.r.Buffered() > 0 {
			t.Errorf("%d bytes after the end of RETR 2", c.r.Buffered())
		}
		c.ok("STAT")
		c.quit()
	})

	t.Run("new-upstream", func(t *testing.T) {
		old := dial(t, rc.main)
		old.login(alice, alicePass)
		// Dovecot's implicit TLS port is a second upstream.
		reload(t, func(rc *reloadConfig) {
			rc.upstream = fmt.Sprintf("upstream %s {\n\t\t\t\t\t\ttls_trust_pool file %s\n\t\t\t\t\t\ttls_server_name localhost\n\t\t\t\t\t}",
				env.dc.POP3SAddr, env.dc.CACertFile)
		})
		c := dial(t, rc.main)
		wantGreeting(t, c)
		c.login(alice, alicePass)
		list := a.sessions(t, "user="+alice)
		if s := bySession(list, c); s == nil || s.Upstream != env.dc.POP3SAddr || s.State != "relay" {
			t.Errorf("new session: %+v, want upstream %s (list %+v)", s, env.dc.POP3SAddr, list)
		}
		if s := bySession(list, old); s == nil || s.Upstream != env.dc.POP3Addr || s.State != "relay" {
			t.Errorf("old session: %+v, want upstream %s (list %+v)", s, env.dc.POP3Addr, list)
		}
		compareRetr(t, c, 1, env.aliceMsgs[0])
		c.quit()

		// Then to a closed port: new logins fail, the old session (on the
		// first upstream) and the one on Dovecot's TLS port keep working.
		c = dial(t, rc.main)
		c.login(alice, alicePass)
		reload(t, func(rc *reloadConfig) { rc.upstream = "upstream " + closed })
		d := dial(t, rc.main)
		wantGreeting(t, d)
		d.ok("USER " + alice)
		if got := d.cmd("PASS " + alicePass); sansID(got) != replyUnavailable {
			t.Errorf("login after the reload to a closed port: %q, want %q", got, replyUnavailable)
		}
		d.expectClosed()
		for _, s := range []*client{old, c} {
			compareRetr(t, s, 2, env.aliceMsgs[1])
			s.quit()
		}
		reload(t, func(rc *reloadConfig) { rc.upstream = "upstream " + env.dc.POP3Addr })
	})

	t.Run("drain_timeout", func(t *testing.T) {
		drainFresh := dial(t, rc.drain)
		drainLogged := dial(t, rc.drain)
		drainLogged.login(alice, alicePass)
		keepFresh := dial(t, rc.keep)
		keepLogged := dial(t, rc.keep)
		keepLogged.login(alice, alicePass)

		start := time.Now()
		reload(t, nil)
		reloaded := time.Since(start)
		after := dial(t, rc.drain) // a session of the new config: not drained
		wantGreeting(t, after)

		// Both old sessions of the drain listener end about 1s after the
		// reload, at the same time.
		var wg sync.WaitGroup
		var freshReply string
		var freshAt, loggedAt time.Duration
		var freshErr, loggedErr error
		var loggedBytes []byte
		wg.Add(2)
		go func() {
			defer wg.Done()
			_ = drainFresh.tcp.SetDeadline(time.Now().Add(5 * time.Second))
			l, err := drainFresh.r.ReadString('\n')
			freshReply, freshAt, freshErr = strings.TrimSuffix(l, "\r\n"), time.Since(start), err
			if err == nil {
				rest, err := io.ReadAll(drainFresh.r)
				if len(rest) > 0 || err != nil {
					freshErr = fmt.Errorf("after the drain -ERR: %q, %v", rest, err)
				}
			}
		}()
		go func() {
			defer wg.Done()
			_ = drainLogged.tcp.SetDeadline(time.Now().Add(5 * time.Second))
			loggedBytes, loggedErr = io.ReadAll(drainLogged.r)
			loggedAt = time.Since(start)
		}()
		wg.Wait()
		t.Logf("POST /load took %v; drained before login after %v, after login after %v", reloaded, freshAt, loggedAt)
		const wantDrain = "-ERR [SYS/TEMP] Server configuration changed, please reconnect"
		if freshErr != nil || sansID(freshReply) != wantDrain {
			t.Errorf("old session before login: %q, %v; want %q and a close", freshReply, freshErr, wantDrain)
		}
		if loggedErr != nil || len(loggedBytes) > 0 {
			t.Errorf("old logged-in session: read %q, %v; want a clean close", loggedBytes, loggedErr)
		}
		for what, at := range map[string]time.Duration{"before login": freshAt, "logged in": loggedAt} {
			if at < 900*time.Millisecond || at > 3*time.Second+reloaded {
				t.Errorf("old session %s drained %v after the reload started, want 1s to 3s", what, at)
			}
		}

		// Without drain_timeout old sessions are alive 2s after the reload.
		time.Sleep(2*time.Second - time.Since(start))
		keepFresh.ok("CAPA")
		keepFresh.multi()
		keepFresh.login(alice, alicePass)
		keepFresh.quit()
		keepLogged.ok("STAT")
		keepLogged.quit()
		after.ok("CAPA")
		after.multi()
		after.quit()
	})
}

// --- metrics ----------------------------------------------------------------

// TestMetrics makes sessions of every kind on a Caddy of its own and checks
// what /metrics on the admin endpoint says about them, then that the
// counters go on after a reload.
func TestMetrics(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(alice, wrongPass)
	var main, down, sick, closed1, closed2 string
	for _, p := range []*string{&main, &down, &sick, &closed1, &closed2} {
		var err error
		if *p, err = freePort(); err != nil {
			t.Fatal(err)
		}
	}
	greeting := "metrics 1"
	var admin string
	cf := func() string {
		return fmt.Sprintf(`{
	admin %[1]s
	local_certs
	skip_install_trust
	tls_automate_names localhost
	log {
		level DEBUG
	}
	layer4 {
		%[2]s {
			route {
				pop3 %[5]s {
					starttls on
					greeting %[8]q
					auth_failure_delay 1ms
					health_interval 200ms
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
		# upstream down, no health checks: the login dials it
		%[3]s {
			route {
				pop3 %[6]s {
					starttls off
				}
			}
		}
		# upstream down, health-checked
		%[4]s {
			route {
				pop3 %[7]s {
					starttls off
					health_interval 200ms
				}
			}
		}
	}
}
`, admin, main, down, sick, env.dc.POP3Addr, closed1, closed2, greeting)
	}
	a := startAdminCaddy(t, "metrics", func(ad string) string { admin = ad; return cf() },
		listener{addr: main}, listener{addr: down}, listener{addr: sick})
	// The local CA and the certificate come in the background.
	var tlsCfg *tls.Config
	waitFor(t, 15*time.Second, "an STLS handshake with the certificate for localhost", func() bool {
		cfg, err := a.tlsConfig()
		if err == nil && stlsProbe(main, cfg) == nil {
			tlsCfg = cfg
			return true
		}
		return false
	})

	var before metricSet
	waitFor(t, 5*time.Second, "upstream_healthy of both health-checked upstreams", func() bool {
		before = a.metrics(t)
		return before.has(pfx+"upstream_healthy", "upstream", env.dc.POP3Addr) && before.has(pfx+"upstream_healthy", "upstream", closed2)
	})
	if v := before.get(pfx+"upstream_healthy", "upstream", env.dc.POP3Addr); v != 1 {
		t.Errorf("upstream_healthy{%s} = %v, want 1", env.dc.POP3Addr, v)
	}
	if v := before.get(pfx+"upstream_healthy", "upstream", closed2); v != 0 {
		t.Errorf("upstream_healthy{%s} = %v, want 0", closed2, v)
	}
	const active = 0
	waitFor(t, 5*time.Second, "active_sessions 0 once the probes ended", func() bool { return a.metrics(t).get(pfx+"active_sessions") == active })

	// An open session counts as active.
	idle := dialPOP3(t, main, nil)
	if v := a.metrics(t).get(pfx + "active_sessions"); v != active+1 {
		t.Errorf("active_sessions with one session open = %v, want %v", v, active+1)
	}
	idle.quit()
	waitFor(t, 5*time.Second, "active_sessions back to 0", func() bool { return a.metrics(t).get(pfx+"active_sessions") == active })
	before = a.metrics(t)

	// A good login over STLS, with exactly known relayed bytes.
	c := dialPOP3(t, main, nil)
	c.stls(tlsCfg)
	c.login(alice, alicePass)
	stat := c.ok("STAT")
	bye := c.ok("QUIT")
	c.expectClosed()
	fromClient, toClient := len("STAT\r\nQUIT\r\n"), len(stat)+len(bye)+4
	// A wrong password, then QUIT before login.
	c = dialPOP3(t, main, nil)
	c.ok("USER " + alice)
	if got := c.cmd("PASS " + wrongPass); sansID(got) != replyAuthFailed {
		t.Errorf("wrong password: %q", got)
	}
	// Credentials that cannot go upstream: a CR in the user name.
	if got := c.cmd("AUTH PLAIN " + b64("\x00al\rice\x00"+alicePass)); sansID(got) != "-ERR [AUTH] Invalid credentials syntax" {
		t.Errorf("AUTH PLAIN with a CR in the user name: %q", got)
	}
	c.quit()
	// A login whose upstream is down.
	c = dialPOP3(t, down, nil)
	c.ok("USER " + alice)
	if got := c.cmd("PASS " + alicePass); sansID(got) != replyUnavailable {
		t.Errorf("login with the upstream down: %q", got)
	}
	c.expectClosed()
	// STLS refused (plaintext pipelined after it) and failed (no TLS).
	c = dialPOP3(t, main, nil)
	c.write("STLS\r\nCAPA\r\n")
	if got := c.line(); got != replyInjection {
		t.Errorf("pipelined STLS: %q", got)
	}
	c.expectClosed()
	c = dialPOP3(t, main, nil)
	c.ok("STLS")
	c.write("this is not a TLS ClientHello\r\n")
	c.deadline(10 * time.Second)
	_, _ = io.ReadAll(c.r) // a TLS alert, then the close
	waitFor(t, 5*time.Second, "active_sessions back to 0", func() bool { return a.metrics(t).get(pfx+"active_sessions") == active })

	after := a.metrics(t)
	for _, d := range []struct {
		name   string
		labels []string
		delta  float64
	}{
		{"logins_total", []string{"method", "plain", "result", "ok"}, 1},
		{"logins_total", []string{"method", "plain", "result", "failed"}, 1},
		{"logins_total", []string{"method", "plain", "result", "unavailable"}, 1},
		{"logins_total", []string{"method", "plain", "result", "invalid"}, 1},
		{"login_duration_seconds_count", []string{"method", "plain"}, 1},
		{"sessions_total", []string{"result", "ok"}, 1},
		{"sessions_total", []string{"result", "quit"}, 1},
		{"sessions_total", []string{"result", "upstream_unavailable"}, 1},
		{"sessions_total", []string{"result", "stls_injection"}, 1},
		{"sessions_total", []string{"result", "tls_handshake_failed"}, 1},
		{"stls_total", []string{"result", "ok"}, 1},
		{"stls_total", []string{"result", "refused"}, 1},
		{"stls_total", []string{"result", "failed"}, 1},
		{"upstream_dial_errors_total", []string{"upstream", closed1}, 1},
		{"bytes_total", []string{"direction", "from_client"}, float64(fromClient)},
		{"bytes_total", []string{"direction", "to_client"}, float64(toClient)},
	} {
		k := metricKey(pfx+d.name, d.labels...)
		if !after.has(pfx+d.name, d.labels...) {
			t.Errorf("%s missing from /metrics", k)
			continue
		}
		if got := after[k] - before[k]; got != d.delta {
			t.Errorf("%s went up by %v, want %v (from %v to %v)", k, got, d.delta, before[k], after[k])
		}
	}
	if sum := after.get(pfx+"login_duration_seconds_sum", "method", "plain") - before.get(pfx+"login_duration_seconds_sum", "method", "plain"); sum <= 0 || sum > 5 {
		t.Errorf("login_duration_seconds_sum went up by %v, want the one login's duration", sum)
	}
	if after.get(pfx+"active_sessions") != active {
		t.Errorf("active_sessions = %v after the sessions ended, want %v", after.get(pfx+"active_sessions"), active)
	}

	// A reload keeps the counts: each config has a new registry, but the
	// collectors are the same.
	greeting = "metrics 2"
	a.loadCaddyfile(t, cf())
	reloaded := a.metrics(t)
	ok := metricKey(pfx+"logins_total", "method", "plain", "result", "ok")
	if reloaded[ok] != after[ok] {
		t.Errorf("%s after the reload: %v, want %v as before it", ok, reloaded[ok], after[ok])
	}
	c = dialPOP3(t, main, nil)
	if c.greeting != "+OK "+greeting {
		t.Errorf("greeting after the reload: %q", c.greeting)
	}
	c.stls(tlsCfg)
	c.login(alice, alicePass)
	c.quit()
	waitFor(t, 5*time.Second, "active_sessions back to 0", func() bool { return a.metrics(t).get(pfx+"active_sessions") == active })
	final := a.metrics(t)
	if final[ok] != after[ok]+1 {
		t.Errorf("%s after a login on the reloaded config: %v, want %v", ok, final[ok], after[ok]+1)
	}
	sessionsOK := metricKey(pfx+"sessions_total", "result", "ok")
	if final[sessionsOK] != after[sessionsOK]+1 {
		t.Errorf("%s after a session on the reloaded config: %v, want %v", sessionsOK, final[sessionsOK], after[sessionsOK]+1)
	}
}

// stlsProbe upgrades a session on addr with STLS and quits.
func stlsProbe(addr string, cfg *tls.Config) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	r := bufio.NewReader(conn)
	if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+OK") {
		return fmt.Errorf("greeting %q: %v", l, err)
	}
	if _, err := conn.Write([]byte("STLS\r\n")); err != nil {
		return err
	}
	if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+OK") {
		return fmt.Errorf("STLS: %q: %v", l, err)
	}
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	_, err = tc.Write([]byte("QUIT\r\n"))
	return err
}

// --- admin API ---------------------------------------------------------------

// TestAdminSessions lists sessions with GET /pop3/sessions and closes them
// with DELETE by user, by id and by remote address.
func TestAdminSessions(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(dave, davePass)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	a := startAdminCaddy(t, "admin-api", func(admin string) string {
		return fmt.Sprintf(`{
	admin %s
	log {
		level DEBUG
	}
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
				}
			}
		}
	}
}
`, admin, addr, env.dc.POP3Addr)
	}, listener{addr: addr})
	waitFor(t, 5*time.Second, "the listener probe's session to end", func() bool { return len(a.sessions(t, "")) == 0 })

	fresh := dialPOP3(t, addr, nil)
	relay := dialPOP3(t, addr, nil)
	relay.login(alice, alicePass)
	relay.ok("STAT")
	list := a.sessions(t, "")
	if len(list) != 2 {
		t.Fatalf("GET /pop3/sessions: %d sessions, want 2: %+v", len(list), list)
	}
	f, r := bySession(list, fresh), bySession(list, relay)
	if f == nil || r == nil {
		t.Fatalf("GET /pop3/sessions: sessions of %s and %s not listed: %+v", fresh.tcp.LocalAddr(), relay.tcp.LocalAddr(), list)
	}
	if f.State != "authorization" || f.User != "" || f.Upstream != "" || f.TLS {
		t.Errorf("session before login: %+v", *f)
	}
	if r.State != "relay" || r.User != alice || r.Upstream != env.dc.POP3Addr || r.TLS {
		t.Errorf("relaying session: %+v", *r)
	}
	idPattern := regexp.MustCompile(`^[0-9a-f]{12}$`)
	for _, s := range []*adminSession{f, r} {
		if !idPattern.MatchString(s.ID) || time.Since(s.Start) > time.Minute || time.Since(s.Start) < 0 {
			t.Errorf("session %+v: want a 12-hex id and a recent start", *s)
		}
	}
	// Relayed bytes show while the session runs: STAT\r\n went up.
	var counted *adminSession
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if counted = bySession(a.sessions(t, "user="+alice), relay); counted != nil && counted.FromClient > 0 {
			break
		}
	}
	if counted == nil || counted.FromClient != int64(len("STAT\r\n")) || counted.ToClient == 0 {
		t.Errorf("relaying session 2s after STAT: %+v, want bytes_from_client %d and bytes_to_client > 0", counted, len("STAT\r\n"))
	}
	if f.ID == r.ID {
		t.Errorf("two sessions share the id %s", f.ID)
	}
	if got := a.sessions(t, "user="+alice); len(got) != 1 || got[0].ID != r.ID {
		t.Errorf("GET ?user=%s: %+v", alice, got)
	}
	if got := a.sessions(t, "id="+f.ID); len(got) != 1 || got[0].Remote != f.Remote {
		t.Errorf("GET ?id=%s: %+v", f.ID, got)
	}
	if got := a.sessions(t, "user=nobody"); len(got) != 0 {
		t.Errorf("GET ?user=nobody: %+v", got)
	}
	if got := a.sessions(t, "remote=127.0.0.1"); len(got) != 2 {
		t.Errorf("GET ?remote=127.0.0.1: %+v", got)
	}

	if code, b := a.do(t, http.MethodDelete, "/pop3/sessions", "", nil); code != http.StatusBadRequest {
		t.Errorf("DELETE without a filter: %d %s, want 400", code, b)
	}
	if n := a.kick(t, "user=nobody"); n != 0 {
		t.Errorf("DELETE ?user=nobody closed %d", n)
	}
	if len(a.sessions(t, "")) != 2 {
		t.Fatalf("sessions gone after DELETEs that matched none")
	}

	// By user: the relaying session is closed.
	if n := a.kick(t, "user="+url.QueryEscape(alice)); n != 1 {
		t.Errorf("DELETE ?user=%s closed %d, want 1", alice, n)
	}
	relay.expectClosed()
	// By id: the session before login is told why.
	if n := a.kick(t, "id="+f.ID); n != 1 {
		t.Errorf("DELETE ?id=%s closed %d, want 1", f.ID, n)
	}
	if got, want := fresh.line(), "-ERR [SYS/TEMP] Session closed by the administrator (session "+f.ID+")"; got != want {
		t.Errorf("kicked before login: %q, want %q", got, want)
	}
	fresh.expectClosed()
	waitFor(t, 5*time.Second, "the closed sessions to leave the list", func() bool { return len(a.sessions(t, "")) == 0 })

	// By remote address: all of this client's sessions, of both kinds.
	c1 := dialPOP3(t, addr, nil)
	c2 := dialPOP3(t, addr, nil)
	c2.login(dave, davePass)
	c3 := dialPOP3(t, addr, nil)
	c3.ok("USER " + dave)
	if n := a.kick(t, "remote=127.0.0.1"); n != 3 {
		t.Errorf("DELETE ?remote=127.0.0.1 closed %d, want 3", n)
	}
	for _, c := range []*client{c1, c3} {
		if got := c.line(); sansID(got) != "-ERR [SYS/TEMP] Session closed by the administrator" {
			t.Errorf("kicked by remote before login: %q", got)
		}
		c.expectClosed()
	}
	c2.expectClosed()
	waitFor(t, 5*time.Second, "the closed sessions to leave the list", func() bool { return len(a.sessions(t, "")) == 0 })

	// A session that keeps sending commands is closed as well.
	busy := dialPOP3(t, addr, nil)
	busyID := a.sessions(t, "")[0].ID
	kicked := make(chan time.Time, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		// Not a.kick: no t.Fatal outside the test's goroutine.
		if code, b, err := a.try(http.MethodDelete, "/pop3/sessions?id="+busyID, "", nil); err != nil || code != http.StatusOK || string(b) != "{\"closed\":1}\n" {
			t.Errorf("DELETE ?id=%s (busy session): %d %q %v, want {\"closed\":1}", busyID, code, b, err)
		}
		kicked <- time.Now()
	}()
	busy.deadline(10 * time.Second)
	start := time.Now()
	var last string
	for time.Since(start) < 4*time.Second {
		if _, err := io.WriteString(busy.conn, "CAPA\r\n"); err != nil {
			break
		}
		l, err := busy.r.ReadString('\n')
		if err != nil {
			break
		}
		if last = strings.TrimSuffix(l, "\r\n"); strings.HasPrefix(last, "-ERR") {
			break
		}
		if last == "+OK" || strings.HasPrefix(last, "+OK ") {
			for l != ".\r\n" && err == nil {
				l, err = busy.r.ReadString('\n')
			}
		}
	}
	at := <-kicked
	if want := "-ERR [SYS/TEMP] Session closed by the administrator (session " + busyID + ")"; last != want {
		t.Errorf("busy session (CAPA after CAPA) %v after the DELETE: last line %q, want %q", time.Since(at).Round(time.Millisecond), last, want)
	} else if d := time.Since(at); d > time.Second {
		t.Errorf("busy session closed %v after the DELETE", d)
	}
	busy.tcp.Close()
	waitFor(t, 5*time.Second, "the busy session to leave the list", func() bool { return len(a.sessions(t, "")) == 0 })

	// The closes are logged as such, without ERROR (but for the admin
	// API's own line about the 400).
	for _, e := range caddyEntries(a.log()) {
		if logger, _ := e["logger"].(string); e["level"] == "error" && strings.HasPrefix(logger, "layer4") {
			t.Errorf("ERROR in Caddy's log: %v", e)
		}
	}
	closedByAdmin := 0
	for _, e := range caddyEntries(a.log()) {
		if e["msg"] == "session" && e["result"] == "closed_by_admin" {
			closedByAdmin++
		}
	}
	if closedByAdmin != 6 {
		t.Errorf("%d session lines with result closed_by_admin, want 6", closedByAdmin)
	}
}

// --- events -----------------------------------------------------------------

// TestEvents checks that logins emit pop3_login and refused credentials
// pop3_auth_failed to Caddy's events app, which logs every event at DEBUG
// with its data: user, remote, method, session, and never the password.
func TestEvents(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	usedSecret(alice, wrongPass)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	p := startCaddy(t, "events", fmt.Sprintf(`{
	admin off
	log {
		level DEBUG
	}
	layer4 {
		%s {
			route {
				pop3 %s {
					starttls off
					auth_failure_delay 1ms
				}
			}
		}
	}
}
`, addr, env.dc.POP3Addr), listener{addr: addr})

	// One session: a wrong password, then the right one.
	c := dialPOP3(t, addr, nil)
	c.ok("USER " + alice)
	reply := c.cmd("PASS " + wrongPass)
	if sansID(reply) != replyAuthFailed {
		t.Fatalf("wrong password: %q", reply)
	}
	id := sessionIDSuffix.FindString(reply)
	id = strings.TrimSuffix(strings.TrimPrefix(id, " (session "), ")")
	if got := loginMethods[1].login(c, alice, alicePass); !strings.HasPrefix(got, "+OK") { // AUTH PLAIN: method "plain" too
		t.Fatalf("login: %q", got)
	}
	c.quit()
	remote := c.tcp.LocalAddr().String()

	want := map[string]map[string]any{
		"pop3_auth_failed": {"session": id, "remote": remote, "user": alice, "method": "plain"},
		"pop3_login":       {"session": id, "remote": remote, "user": alice, "upstream_user": alice, "method": "plain", "upstream": env.dc.POP3Addr},
	}
	got := map[string][]map[string]any{}
	waitFor(t, 5*time.Second, "both events in the log", func() bool {
		clear(got)
		for _, e := range caddyEntries(p.log()) {
			if e["logger"] == "events" && e["msg"] == "event" {
				name, _ := e["name"].(string)
				if want[name] != nil {
					got[name] = append(got[name], e)
				}
			}
		}
		return len(got) == len(want)
	})
	for name, data := range want {
		if len(got[name]) != 1 {
			t.Errorf("%d %s events, want 1: %v", len(got[name]), name, got[name])
			continue
		}
		e := got[name][0]
		if e["level"] != "debug" || e["origin"] != "layer4.handlers.pop3" {
			t.Errorf("%s: level %v, origin %v; want debug from layer4.handlers.pop3", name, e["level"], e["origin"])
		}
		if !reflect.DeepEqual(e["data"], data) {
			t.Errorf("%s data: %v, want %v", name, e["data"], data)
		}
	}
}

// --- example.json -------------------------------------------------------------

// exampleEnv is the environment for `caddy adapt` of Caddyfile.example:
// Caddy's with none of the POP3_* variables it reads, so that their
// defaults apply.
func exampleEnv(dir string) []string {
	var e []string
	for _, kv := range caddyEnv(dir) {
		if !strings.HasPrefix(kv, "POP3_") {
			e = append(e, kv)
		}
	}
	return e
}

func readJSON(t *testing.T, file string) any {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return v
}

// TestExampleJSONMatchesCaddyfile checks that example.json is what
// `caddy adapt` makes of Caddyfile.example with the default values.
func TestExampleJSONMatchesCaddyfile(t *testing.T) {
	need(t)
	dir := t.TempDir()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := commandIn(dir, env.caddyBin, "adapt", "--config", filepath.Join(root, "Caddyfile.example"), "--adapter", "caddyfile")
	cmd.Env = exampleEnv(dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v\n%s", err, stderr.String())
	}
	var adapted any
	if err := json.Unmarshal(out, &adapted); err != nil {
		t.Fatalf("caddy adapt output: %v\n%s", err, out)
	}
	example := readJSON(t, filepath.Join(root, "example.json"))
	if !reflect.DeepEqual(adapted, example) {
		want, _ := json.MarshalIndent(adapted, "", "\t")
		t.Errorf("example.json differs from `caddy adapt --config Caddyfile.example`, which gives:\n%s", want)
	}
}

// TestExampleJSONLoads posts example.json to a running Caddy's /load, with
// its admin address and ports moved to free ones and its upstream pointed
// at the test Dovecot, and logs in through both of its listeners.
func TestExampleJSONLoads(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	a := startAdminCaddy(t, "example-json", func(admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n\tlog {\n\t\tlevel DEBUG\n\t}\n}\n", admin)
	})
	stlsAddr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	implicitAddr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}

	cfg := readJSON(t, filepath.Join(root, "example.json"))
	at := func(v any, path ...string) map[string]any {
		for _, k := range path {
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("example.json: no object at %q", path)
			}
			v = m[k]
		}
		m, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("example.json: no object at %q", path)
		}
		return m
	}
	at(cfg, "admin")["listen"] = a.admin
	servers := at(cfg, "apps", "layer4", "servers")
	if len(servers) != 2 {
		t.Fatalf("example.json has %d layer4 servers, want 2", len(servers))
	}
	upstreams := 0
	for name, addr := range map[string]string{"srv0": stlsAddr, "srv1": implicitAddr} {
		srv := at(servers, name)
		srv["listen"] = []any{addr}
		for _, route := range srv["routes"].([]any) {
			for _, h := range route.(map[string]any)["handle"].([]any) {
				h := h.(map[string]any)
				if h["handler"] != "pop3" {
					continue
				}
				for _, u := range h["upstream"].([]any) {
					u.(map[string]any)["address"] = env.dc.POP3Addr
					upstreams++
				}
			}
		}
	}
	if upstreams != 2 {
		t.Fatalf("example.json: %d pop3 upstreams, want one per server", upstreams)
	}
	body, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.load(t, "application/json", body)

	// The internal issuer makes the certificate in the background.
	var tlsCfg *tls.Config
	waitFor(t, 15*time.Second, "the certificate for localhost", func() bool {
		cfg, err := a.tlsConfig()
		if err != nil {
			return false
		}
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", implicitAddr, cfg)
		if err != nil {
			return false
		}
		conn.Close()
		tlsCfg = cfg
		return true
	})

	c := dialPOP3(t, stlsAddr, nil)
	c.ok("CAPA")
	if caps := strings.Join(c.multi(), "|"); !strings.Contains(caps, "STLS") || strings.Contains(caps, "USER") {
		t.Errorf("CAPA before STLS on the starttls only listener: %q", caps)
	}
	st := c.stls(tlsCfg.Clone())
	if st.NegotiatedProtocol != "" && st.NegotiatedProtocol != "pop3" {
		t.Errorf("ALPN %q", st.NegotiatedProtocol)
	}
	c.login(alice, alicePass)
	compareRetr(t, c, 1, env.aliceMsgs[0])
	c.quit()

	cfg2 := tlsCfg.Clone()
	cfg2.NextProtos = []string{"pop3"}
	c = dialPOP3(t, implicitAddr, cfg2)
	if p := c.conn.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != "pop3" {
		t.Errorf("implicit TLS ALPN %q, want pop3", p)
	}
	c.login(alice, alicePass)
	c.ok("STAT")
	c.quit()

	// The loaded config is what GET /config/ returns.
	code, b := a.do(t, http.MethodGet, "/config/", "", nil)
	var loaded any
	if code != http.StatusOK || json.Unmarshal(b, &loaded) != nil {
		t.Fatalf("GET /config/: %d %s", code, b)
	}
	var posted any
	_ = json.Unmarshal(body, &posted)
	if !reflect.DeepEqual(loaded, posted) {
		t.Errorf("GET /config/ differs from the posted example.json:\n%s", b)
	}
}

// --- parked sessions -----------------------------------------------------------

// TestIdleSessionsPark: logged-in sessions that go quiet give up their
// goroutines (Caddy's go_goroutines stays flat while 40 plain and 10
// implicit_tls sessions idle), and a parked session still works both ways,
// is listed and can be closed by the admin API, and times out by
// proxy_timeout.
func TestIdleSessionsPark(t *testing.T) {
	need(t)
	usedSecret(alice, alicePass)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	tlsAddr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	a := startAdminCaddy(t, "park", func(admin string) string {
		return fmt.Sprintf(`{
	admin %[1]s
	local_certs
	skip_install_trust
	tls_automate_names localhost
	layer4 {
		%[2]s {
			route {
				pop3 %[4]s {
					starttls off
					proxy_timeout 8s
				}
			}
		}
		%[3]s {
			route {
				pop3 %[4]s {
					implicit_tls
					proxy_timeout 8s
					connection_policy {
						default_sni localhost
					}
				}
			}
		}
	}
}
`, admin, addr, tlsAddr, env.dc.POP3Addr)
	}, listener{addr: addr}, listener{addr: tlsAddr, tls: true})
	tlsCfg, err := a.tlsConfig()
	if err != nil {
		t.Fatal(err)
	}

	direct := dialPOP3(t, env.dc.POP3Addr, nil)
	direct.ok("USER " + alice)
	direct.ok("PASS " + alicePass)
	want := direct.transcript("STAT", "LIST", "UIDL", "RETR 1", "TOP 2 3")
	direct.ok("QUIT")

	goroutines := func() float64 { return a.metrics(t).get("go_goroutines") }
	before := goroutines()
	const n, nTLS = 40, 10
	login := func(c *client) *client {
		c.ok("USER " + alice)
		c.ok("PASS " + alicePass)
		c.ok("NOOP")
		return c
	}
	var clients, tlsClients []*client
	for i := 0; i < n; i++ {
		clients = append(clients, login(dialPOP3(t, addr, nil)))
	}
	for i := 0; i < nTLS; i++ {
		tlsClients = append(tlsClients, login(dialPOP3(t, tlsAddr, tlsCfg)))
	}
	// Two goroutines per session before parking; none after (about a
	// second of quiet).
	waitFor(t, 10*time.Second, "the idle sessions to park", func() bool { return goroutines() < before+(n+nTLS)/4 })

	// Parked sessions: commands and replies flow, byte for byte as direct.
	for _, c := range []*client{clients[0], tlsClients[0]} {
		if got := c.transcript("STAT", "LIST", "UIDL", "RETR 1", "TOP 2 3"); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: parked session transcript differs from direct:\n%q\nwant\n%q", c.name, got, want)
		}
	}
	// Listed with its counts, closed by id.
	list := a.sessions(t, "user="+alice)
	s := bySession(list, clients[1])
	if len(list) != n+nTLS || s == nil || s.State != "relay" || s.FromClient == 0 {
		t.Fatalf("%d sessions listed, session %+v", len(list), s)
	}
	if closed := a.kick(t, "id="+s.ID); closed != 1 {
		t.Fatalf("DELETE closed %d", closed)
	}
	clients[1].expectClosed()
	// The rest, parked again, wake for QUIT; Dovecot answers and closes.
	time.Sleep(1500 * time.Millisecond)
	for _, c := range append(clients[2:n/2], tlsClients...) {
		c.ok("QUIT")
		c.expectClosed()
	}
	// The others idle out after proxy_timeout while parked.
	for _, c := range clients[n/2:] {
		c.expectClosed()
	}
	waitFor(t, 5*time.Second, "no session left", func() bool { return len(a.sessions(t, "")) == 0 })
	logs := a.log()
	for result, want := range map[string]int{`"result":"ok"`: n/2 - 2 + nTLS, `"result":"idle_timeout"`: n/2 + 1, `"result":"closed_by_admin"`: 1} {
		if got := strings.Count(logs, result); got != want {
			t.Errorf("%d session lines with %s, want %d", got, result, want)
		}
	}
}
