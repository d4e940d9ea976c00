//go:build integration

package integration

// Edge limits (issue 14): sessions per address and per user, new
// connections per address, failed logins per user and address, per address
// and per user with their blocks, exempt networks, the minimum input rate
// before login and the longest session, through a real Caddy in front of
// the package's Dovecot. Clients act as many hosts by binding to addresses
// of 127.0.0.0/8, which Linux routes to lo; each test uses addresses of its
// own, away from 127.0.0.1, where the harness's listener probes come from.

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

// The replies of the limits, without the session id of those that carry one.
const (
	replyTooManyConnections = "-ERR [SYS/TEMP] Too many connections from your address, try again later"
	replyTooManySessions    = "-ERR [SYS/TEMP] Too many sessions from your address, try again later"
	replyInUse              = "-ERR [IN-USE] Too many sessions for this user, try again later"
	replyTooSlow            = "-ERR Input too slow, closing connection"
	replyLifetime           = "-ERR [SYS/TEMP] Session lifetime exceeded"
	replyTooManyErrors      = "-ERR Too many errors, closing connection"
)

// --- Caddy with limits --------------------------------------------------------

// edgeServer is one pop3 listener in front of the package's Dovecot:
// plaintext, or implicit TLS with a certificate from Caddy's local CA.
type edgeServer struct {
	addr     string
	upstream string // "": the package's Dovecot
	tls      bool   // implicit TLS
	stls     bool   // STLS offered, plaintext logins allowed
	greeting string // "": "edge"
	delay    string // auth_failure_delay; "": 1ms
	zone     string // "": the default zone
	limits   string // the lines of the limits block, one option a line
	extra    string // more lines for the handler
}

// edgeCaddyfile is the Caddyfile of a Caddy with an admin endpoint and the
// servers; logins fail fast (auth_failure_delay 1ms unless the server says
// otherwise) so that tests that fail many stay quick.
func edgeCaddyfile(admin string, servers ...edgeServer) string {
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tlog {\n\t\tlevel DEBUG\n\t}\n", admin)
	for _, s := range servers {
		if s.tls || s.stls {
			b.WriteString("\tlocal_certs\n\tskip_install_trust\n\ttls_automate_names localhost\n")
			break
		}
	}
	b.WriteString("\tlayer4 {\n")
	for _, s := range servers {
		greeting, upstream := s.greeting, s.upstream
		if greeting == "" {
			greeting = "edge"
		}
		if upstream == "" {
			upstream = env.dc.POP3Addr
		}
		var h strings.Builder
		switch {
		case s.tls:
			h.WriteString("implicit_tls\nconnection_policy {\n\tdefault_sni localhost\n}\n")
		case s.stls:
			h.WriteString("starttls on\nconnection_policy {\n\tdefault_sni localhost\n}\n")
		default:
			h.WriteString("starttls off\n")
		}
		delay := s.delay
		if delay == "" {
			delay = "1ms"
		}
		fmt.Fprintf(&h, "auth_failure_delay %s\ngreeting %q\n", delay, greeting)
		if s.extra != "" {
			h.WriteString(strings.TrimSpace(s.extra) + "\n")
		}
		if s.zone != "" {
			fmt.Fprintf(&h, "limits %s {\n", s.zone)
		} else {
			h.WriteString("limits {\n")
		}
		h.WriteString(s.limits + "\n}\n")
		// indent flattens the nested blocks, which Caddy does not mind.
		fmt.Fprintf(&b, "\t\t%s {\n\t\t\troute {\n\t\t\t\tpop3 %s {\n%s\n\t\t\t\t}\n\t\t\t}\n\t\t}\n",
			s.addr, upstream, indent(h.String(), "\t\t\t\t\t"))
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// startEdgeCaddy starts a Caddy with the servers and waits for each to greet.
func startEdgeCaddy(t *testing.T, name string, servers ...edgeServer) *adminCaddy {
	t.Helper()
	var ls []listener
	for _, s := range servers {
		ls = append(ls, listener{addr: s.addr, tls: s.tls}) // STLS: the plaintext greeting
	}
	return startAdminCaddy(t, name, func(admin string) string { return edgeCaddyfile(admin, servers...) }, ls...)
}

// --- clients -------------------------------------------------------------------

// firstLine connects to addr from local and reads the first line the proxy
// sends, within 5s: a greeting or a refusal.
func firstLine(t *testing.T, local, addr string) (*client, string) {
	t.Helper()
	c := connectFrom(t, local, addr)
	c.deadline(5 * time.Second)
	l, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s from %s: no first line: %v (got %q)", addr, local, err, l)
	}
	c.deadline(30 * time.Second)
	return c, strings.TrimSuffix(l, "\r\n")
}

// expectRefused checks that a connection from local gets exactly want as
// its first line, and then the close.
func expectRefused(t *testing.T, local, addr, want string) {
	t.Helper()
	c, l := firstLine(t, local, addr)
	if l != want {
		t.Errorf("a connection from %s: first line %q, want %q and the close", local, l, want)
		return
	}
	c.expectClosed()
}

// waitAccepted connects from local until the proxy greets, for up to 5s,
// and returns the greeted client and how many connections were refused
// with refusal before.
func waitAccepted(t *testing.T, local, addr, refusal string) (*client, int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for refused := 0; ; refused++ {
		c, l := firstLine(t, local, addr)
		if strings.HasPrefix(l, "+OK") {
			c.greeting = l
			return c, refused
		}
		if l != refusal {
			t.Fatalf("a connection from %s: %q, want a greeting or %q", local, l, refusal)
		}
		c.conn.Close()
		if time.Now().After(deadline) {
			t.Fatalf("connections from %s still refused after 5s: %q", local, l)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// atOnce runs f(0) … f(n-1) at the same time and returns their results,
// sorted. Each f returns its result and what to close (or nil), which is
// closed only once every f has returned: sessions are held until then.
func atOnce(n int, f func(i int) (string, io.Closer)) []string {
	results := make([]string, n)
	closers := make([]io.Closer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], closers[i] = f(i)
		}()
	}
	wg.Wait()
	for _, c := range closers {
		if c != nil {
			c.Close()
		}
	}
	slices.Sort(results)
	return results
}

// burstFirstLines opens n connections from local to addr at once and
// returns the first line of each (or its error), sorted, without CRLF;
// the greeted ones hold their sessions until every line is in.
func burstFirstLines(local, addr string, n int) []string {
	return atOnce(n, func(int) (string, io.Closer) {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			return "dial: " + err.Error(), nil
		}
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		l, err := (&rawSession{conn: conn, r: bufio.NewReader(conn)}).line()
		if err != nil {
			return err.Error(), conn
		}
		return l, conn
	})
}

// tryLogin sends USER and PASS and returns the reply to PASS.
func (c *client) tryLogin(user, pass string) string {
	c.t.Helper()
	usedSecret(user, pass)
	return loginMethods[0].login(c, user, pass)
}

// failLogin sends a wrong password for user, which must get the
// wrong-password reply.
func (c *client) failLogin(user string) {
	c.t.Helper()
	if got := c.tryLogin(user, wrongPass); sansID(got) != replyAuthFailed {
		c.t.Fatalf("%s: wrong password for %s: %q, want %q", c.name, user, got, replyAuthFailed)
	}
}

// expectBlocked sends the right password for user, which must get exactly
// the wrong-password reply: a blocked attempt looks like a failed one.
func (c *client) expectBlocked(user, pass string) {
	c.t.Helper()
	if got := c.tryLogin(user, pass); sansID(got) != replyAuthFailed {
		c.t.Fatalf("%s: the right password for %s while blocked: %q, want %q", c.name, user, got, replyAuthFailed)
	}
}

// waitGone waits until the admin API no longer lists c's session: its
// slots are given back when its handler returns, a little after the client
// sees the close.
func waitGone(t *testing.T, a *adminCaddy, c *client) {
	t.Helper()
	waitFor(t, 5*time.Second, "the session of "+c.tcp.LocalAddr().String()+" to end", func() bool {
		return bySession(a.sessions(t, ""), c) == nil
	})
}

// closedWithin reads from c until the proxy closes the connection, for up
// to d, and returns what came before the close and how long it took.
func closedWithin(t *testing.T, c *client, d time.Duration) ([]byte, time.Duration) {
	t.Helper()
	start := time.Now()
	c.deadline(d)
	b, err := io.ReadAll(c.r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open after %v (got %q)", c.name, d, b)
	}
	return b, time.Since(start)
}

// --- admin API: blocks -----------------------------------------------------------

// blockView is one entry of GET /pop3/blocks.
type blockView struct {
	Zone    string    `json:"zone"`
	Limit   string    `json:"limit"`
	Address string    `json:"address"`
	User    string    `json:"user"`
	Until   time.Time `json:"until"`
}

func (a *adminCaddy) blocks(t *testing.T) []blockView {
	t.Helper()
	code, b := a.do(t, http.MethodGet, "/pop3/blocks", "", nil)
	if code != http.StatusOK {
		t.Fatalf("GET /pop3/blocks: %d %s", code, b)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var out []blockView
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("GET /pop3/blocks: %v\n%s", err, b)
	}
	if out == nil {
		t.Fatalf("GET /pop3/blocks: %s, want a JSON list", b)
	}
	// Empty address and user are left out, not sent empty.
	var raw []map[string]any
	_ = json.Unmarshal(b, &raw)
	for _, e := range raw {
		for _, k := range []string{"address", "user"} {
			if v, ok := e[k]; ok && v == "" {
				t.Errorf("GET /pop3/blocks: %v holds an empty %s, want it left out", e, k)
			}
		}
	}
	return out
}

// unblock sends DELETE /pop3/blocks?query and returns how many blocks it
// removed.
func (a *adminCaddy) unblock(t *testing.T, query string) int {
	t.Helper()
	return a.deleteCounting(t, "/pop3/blocks?"+query, "removed")
}

// expectBlocks checks GET /pop3/blocks against want (until aside) and
// returns the list.
func expectBlocks(t *testing.T, a *adminCaddy, want ...blockView) []blockView {
	t.Helper()
	got := a.blocks(t)
	var gotKeys, wantKeys []string
	for _, b := range got {
		gotKeys = append(gotKeys, fmt.Sprintf("%s/%s/%s/%s", b.Zone, b.Limit, b.Address, b.User))
	}
	for _, b := range want {
		wantKeys = append(wantKeys, fmt.Sprintf("%s/%s/%s/%s", b.Zone, b.Limit, b.Address, b.User))
	}
	slices.Sort(gotKeys)
	slices.Sort(wantKeys)
	if !slices.Equal(gotKeys, wantKeys) {
		t.Errorf("GET /pop3/blocks: %q (zone/limit/address/user), want %q", gotKeys, wantKeys)
	}
	return got
}

// --- metrics -------------------------------------------------------------------

// limitMetric returns the sample of the limits' metric name (without the
// handler's metric prefix, pfx) with labels; 0 when there is none.
func limitMetric(t *testing.T, m metricSet, name string, labels ...string) float64 {
	t.Helper()
	if m.has(pfx+name, labels...) {
		return m.get(pfx+name, labels...)
	}
	return 0
}

// --- log ---------------------------------------------------------------------

// handlerEntries returns the pop3 handler's log entries with message msg
// whose fields hold the given values.
func handlerEntries(p *caddyProc, msg string, fields map[string]string) []map[string]any {
	var out []map[string]any
	for _, e := range caddyEntries(p.log()) {
		if e["logger"] != "layer4.handlers.pop3" || e["msg"] != msg {
			continue
		}
		ok := true
		for k, v := range fields {
			if s, _ := e[k].(string); s != v {
				ok = false
			}
		}
		if ok {
			out = append(out, e)
		}
	}
	return out
}

// expectEntry waits up to 5s for a pop3 handler entry msg with fields.
func expectEntry(t *testing.T, p *caddyProc, msg string, fields map[string]string) map[string]any {
	t.Helper()
	var got []map[string]any
	deadline := time.Now().Add(5 * time.Second)
	for len(got) == 0 && time.Now().Before(deadline) {
		got = handlerEntries(p, msg, fields)
		if len(got) == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if len(got) == 0 {
		t.Errorf("no %q entry with %v in Caddy's log", msg, fields)
		return nil
	}
	return got[0]
}

// eventData returns the data of the events named name in p's log (the
// events app logs each at DEBUG).
func eventData(p *caddyProc, name string) []map[string]any {
	var out []map[string]any
	for _, e := range caddyEntries(p.log()) {
		if e["logger"] == "events" && e["msg"] == "event" && e["name"] == name {
			d, _ := e["data"].(map[string]any)
			out = append(out, d)
		}
	}
	return out
}

// expectEvent waits up to 5s for an event name whose data holds fields.
func expectEvent(t *testing.T, p *caddyProc, name string, fields map[string]string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, d := range eventData(p, name) {
			ok := true
			for k, v := range fields {
				if s, _ := d[k].(string); s != v {
					ok = false
				}
			}
			if ok {
				return d
			}
		}
		if time.Now().After(deadline) {
			t.Errorf("no %s event with %v; got %v", name, fields, eventData(p, name))
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// remoteOf is the client's address as the proxy logs it.
func remoteOf(c *client) string { return c.tcp.LocalAddr().String() }

// --- 1. sessions_per_ip ---------------------------------------------------------

// TestEdgeSessionsPerIP: with sessions_per_ip 2 a third session from an
// address is refused before the greeting, another address is not; a
// session that ends, logged in or not, frees its slot.
func TestEdgeSessionsPerIP(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-sessions-ip", edgeServer{addr: addr, limits: "sessions_per_ip 2"})
	const ip, other = "127.0.0.3", "127.0.0.4"

	loggedIn := dialPOP3From(t, ip, addr, nil)
	loggedIn.login(alice, alicePass)
	greeted := dialPOP3From(t, ip, addr, nil)
	expectRefused(t, ip, addr, replyTooManySessions)
	refusals := 1
	o := dialPOP3From(t, other, addr, nil)
	o.login(alice, alicePass)
	o.quit()

	// A logged-in session ends: one more fits, and no more.
	loggedIn.ok("STAT")
	loggedIn.quit()
	c, n := waitAccepted(t, ip, addr, replyTooManySessions)
	refusals += n
	expectRefused(t, ip, addr, replyTooManySessions)
	refusals++
	// A session ends before login: the same.
	greeted.quit()
	d, n := waitAccepted(t, ip, addr, replyTooManySessions)
	refusals += n
	expectRefused(t, ip, addr, replyTooManySessions)
	refusals++
	c.login(alice, alicePass)
	c.ok("STAT")
	d.login(bob, bobPass)
	d.ok("STAT")

	// Twenty at once from a fresh address: exactly two get in.
	lines := burstFirstLines("127.0.0.40", addr, 20)
	want := append(slices.Repeat([]string{replyTooManySessions}, 18), "+OK edge", "+OK edge")
	slices.Sort(want)
	if !slices.Equal(lines, want) {
		t.Errorf("20 connections at once from one address under sessions_per_ip 2: %q, want 2 greetings and 18 refusals", lines)
	}
	refusals += 18

	e := expectEntry(t, a.caddyProc, "limit reached", map[string]string{"limit": "sessions_per_ip"})
	if r, _ := e["remote"].(string); !strings.HasPrefix(r, ip+":") {
		t.Errorf("limit reached: remote %q, want %s:PORT", r, ip)
	}
	m := a.metrics(t)
	if got := limitMetric(t, m, "limit_refusals_total", "limit", "sessions_per_ip"); got != float64(refusals) {
		t.Errorf("caddy_pop3_limit_refusals_total{limit=sessions_per_ip} = %v, want %d", got, refusals)
	}
}

// --- 2. sessions_per_user, sessions_per_user_ip ----------------------------------

// TestEdgeSessionsPerUser: with sessions_per_user 2 a third login of a user
// (whatever the case of its name) is refused with [IN-USE] after the
// upstream accepted it, and the session may log in once another of that
// user's ends; with sessions_per_user_ip 1 the same for a second login of
// a user from one address, while other users and addresses log in, and the
// refusals count toward max_errors.
func TestEdgeSessionsPerUser(t *testing.T) {
	need(t)
	perUser, perUserIP := freePortT(t), freePortT(t)
	a := startEdgeCaddy(t, "edge-sessions-user",
		edgeServer{addr: perUser, zone: "user", limits: "sessions_per_user 2"},
		edgeServer{addr: perUserIP, zone: "userip", limits: "sessions_per_user_ip 1", extra: "max_errors 2"})

	t.Run("sessions_per_user", func(t *testing.T) {
		c1 := dialPOP3From(t, "127.0.0.5", perUser, nil)
		c1.login(alice, alicePass)
		c2 := dialPOP3From(t, "127.0.0.6", perUser, nil)
		c2.login("ALICE", alicePass) // Dovecot's auth_username_format %Lu: the same mailbox
		c3 := dialPOP3From(t, "127.0.0.7", perUser, nil)
		// Dovecot's line for a session that ended with QUIT.
		upstreamQuits := func() int {
			n := 0
			for _, l := range strings.Split(env.dc.Log(), "\n") {
				if strings.Contains(l, "pop3("+alice+")") && strings.Contains(l, "Disconnected: Logged out") {
					n++
				}
			}
			return n
		}
		quits := upstreamQuits()
		if got := c3.tryLogin("Alice", alicePass); sansID(got) != replyInUse {
			t.Fatalf("a third login of alice: %q, want %q", got, replyInUse)
		}
		// The refused session is still before login.
		if got := c3.cmd("STAT"); !strings.HasPrefix(got, "-ERR") {
			t.Errorf("STAT after the [IN-USE] refusal: %q, want -ERR (no login)", got)
		}
		// The upstream session that the proxy logged in was ended with QUIT.
		waitFor(t, 5*time.Second, "Dovecot to log the refused login's upstream session ending with QUIT",
			func() bool { return upstreamQuits() > quits })
		// Other users are not limited by alice's sessions.
		b := dialPOP3From(t, "127.0.0.7", perUser, nil)
		b.login(bob, bobPass)
		b.quit()

		c1.quit()
		waitGone(t, a, c1)
		if got := c3.tryLogin(alice, alicePass); !strings.HasPrefix(got, "+OK") {
			t.Fatalf("alice's retry after one of her sessions ended: %q", got)
		}
		c3.ok("STAT")
		c4 := dialPOP3From(t, "127.0.0.5", perUser, nil)
		if got := c4.tryLogin(alice, alicePass); sansID(got) != replyInUse {
			t.Errorf("a third login of alice again: %q, want %q", got, replyInUse)
		}
		expectEntry(t, a.caddyProc, "limit reached", map[string]string{"limit": "sessions_per_user", "remote": remoteOf(c4)})
		c2.quit()
		c3.quit()
	})

	t.Run("at-once", func(t *testing.T) {
		// Ten logins of one user at once from ten addresses: exactly two
		// get in.
		usedSecret(dave, davePass)
		replies := atOnce(10, func(i int) (string, io.Closer) {
			reply, s, err := loginFrom(perUser, dave, davePass, sessionOpts{local: fmt.Sprintf("127.0.0.%d", 60+i)})
			if err != nil {
				return err.Error(), nil
			}
			if strings.HasPrefix(reply, "-ERR") {
				reply = sansID(reply)
			}
			return reply, s.conn
		})
		want := append(slices.Repeat([]string{replyInUse}, 8), "+OK Logged in.", "+OK Logged in.")
		slices.Sort(want)
		if !slices.Equal(replies, want) {
			t.Errorf("ten logins of %s at once under sessions_per_user 2: %q, want 2 logged in and 8 [IN-USE]", dave, replies)
		}
	})

	t.Run("sessions_per_user_ip", func(t *testing.T) {
		const ip = "127.0.0.5"
		d1 := dialPOP3From(t, ip, perUserIP, nil)
		d1.login(alice, alicePass)
		// Another user from the address, the user from another address.
		dBob := dialPOP3From(t, ip, perUserIP, nil)
		dBob.login(bob, bobPass)
		dOther := dialPOP3From(t, "127.0.0.6", perUserIP, nil)
		dOther.login(alice, alicePass)

		d2 := dialPOP3From(t, ip, perUserIP, nil)
		if got := d2.tryLogin(alice, alicePass); sansID(got) != replyInUse {
			t.Fatalf("a second login of alice from %s: %q, want %q", ip, got, replyInUse)
		}
		// Two refusals reach max_errors 2.
		d3 := dialPOP3From(t, ip, perUserIP, nil)
		for i := 1; i <= 2; i++ {
			if got := d3.tryLogin(alice, alicePass); sansID(got) != replyInUse {
				t.Fatalf("refusal %d: %q, want %q", i, got, replyInUse)
			}
		}
		if got := d3.line(); sansID(got) != replyTooManyErrors {
			t.Errorf("after two [IN-USE] refusals with max_errors 2: %q, want %q", got, replyTooManyErrors)
		}
		d3.expectClosed()

		d1.quit()
		waitGone(t, a, d1)
		if got := d2.tryLogin(alice, alicePass); !strings.HasPrefix(got, "+OK") {
			t.Fatalf("alice's retry from %s after her session there ended: %q", ip, got)
		}
		d2.ok("STAT")
		for _, c := range []*client{d2, dBob, dOther} {
			c.quit()
		}
	})
}

// TestEdgeSessionsPerUserChallengeRelay: with APOP relayed from the
// upstream (no auth server: the greeting carries the upstream's timestamp),
// a login refused by sessions_per_user ends the session (its timestamp
// belonged to the upstream connection that got QUIT), and a new session
// logs in once the user's other session ended.
func TestEdgeSessionsPerUserChallengeRelay(t *testing.T) {
	need(t)
	dc := startTestDovecot(t, "edge-apop", []dovecot.User{{Name: alice, Password: alicePass, Messages: env.aliceMsgs}}, challengeMechs)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-apop", edgeServer{addr: addr, upstream: dc.POP3Addr, extra: "auth plain apop", limits: "sessions_per_user 1"})
	usedSecret(alice, alicePass)
	apop := func(c *client) string {
		digest := apopDigest(greetingTimestamp(t, c.greeting), alicePass)
		usedSecretValue(digest, "APOP digest of alice's password")
		return c.cmd("APOP " + alice + " " + digest)
	}

	first := dialPOP3From(t, "127.0.0.5", addr, nil)
	if got := apop(first); !strings.HasPrefix(got, "+OK") {
		t.Fatalf("APOP: %q", got)
	}
	second := dialPOP3From(t, "127.0.0.6", addr, nil)
	if got := apop(second); sansID(got) != replyInUse {
		t.Fatalf("a second APOP login of alice: %q, want %q", got, replyInUse)
	}
	// The digest was made over the timestamp of the upstream connection
	// that got QUIT: the session ends, and a new one logs in once the
	// user's other session has ended.
	second.expectClosed()
	first.quit()
	waitGone(t, a, first)
	third := dialPOP3From(t, "127.0.0.6", addr, nil)
	if got := apop(third); !strings.HasPrefix(got, "+OK") {
		t.Fatalf("alice's APOP login after her other session ended: %q", got)
	}
	third.ok("STAT")
	third.quit()
}

// --- 3. connections_per_ip ------------------------------------------------------

// TestEdgeConnectionsPerIP: with connections_per_ip 3 6s, of a burst of
// five connections from one address the last two are refused before the
// greeting; on an implicit TLS listener of the same (default) zone the
// next one is closed with nothing written; another address is accepted;
// and after the window the address has its burst again.
func TestEdgeConnectionsPerIP(t *testing.T) {
	need(t)
	plain, implicit := freePortT(t), freePortT(t)
	// The harness's probes come from 127.0.0.1 and retry until the TLS
	// listener has its certificate, each a new connection: exempt.
	const limits = "connections_per_ip 3 6s\nexempt 127.0.0.1"
	a := startEdgeCaddy(t, "edge-connections",
		edgeServer{addr: plain, limits: limits},
		edgeServer{addr: implicit, tls: true, limits: limits})
	cfg, err := a.tlsConfig()
	if err != nil {
		t.Fatal(err)
	}
	const ip, other = "127.0.0.8", "127.0.0.9"

	// burst opens five connections from ip and checks that the first three
	// greet and the others are refused; it returns when it ended.
	burst := func(t *testing.T) time.Time {
		t.Helper()
		start := time.Now()
		var refused []*client
		for i := range 5 {
			c, l := firstLine(t, ip, plain)
			want := "+OK edge"
			if i >= 3 {
				want = replyTooManyConnections
				refused = append(refused, c)
			}
			if l != want {
				// Three tokens refill in 6s: one every two seconds.
				t.Errorf("connection %d of a burst of 5 (%v since its first): %q, want %q",
					i+1, time.Since(start).Round(time.Millisecond), l, want)
			}
		}
		end := time.Now()
		for _, c := range refused {
			c.expectClosed()
		}
		return end
	}
	end := burst(t)

	// The implicit TLS listener, same zone: closed before the handshake.
	conn := connectFrom(t, ip, implicit)
	counted := &countingConn{Conn: conn.tcp}
	_ = conn.tcp.SetDeadline(time.Now().Add(5 * time.Second))
	herr := tls.Client(counted, cfg).Handshake()
	if herr == nil {
		t.Errorf("implicit TLS from %s after the burst: the handshake succeeded, want a close", ip)
	} else if n := counted.n.Load(); n > 0 {
		t.Errorf("implicit TLS from %s after the burst: %d bytes came before the close (%v), want none", ip, n, herr)
	}
	var ne net.Error
	if errors.As(herr, &ne) && ne.Timeout() {
		t.Errorf("implicit TLS from %s after the burst: still open after 5s, want a close", ip)
	}

	// Another address is not limited, on either listener.
	o := dialPOP3From(t, other, plain, nil)
	o.login(alice, alicePass)
	o.quit()
	o = dialPOP3From(t, other, implicit, cfg)
	o.login(alice, alicePass)
	o.quit()

	// Ten at once from a fresh address: exactly three get in.
	lines := burstFirstLines("127.0.0.41", plain, 10)
	want := append(slices.Repeat([]string{replyTooManyConnections}, 7), "+OK edge", "+OK edge", "+OK edge")
	slices.Sort(want)
	if !slices.Equal(lines, want) {
		t.Errorf("10 connections at once from one address under connections_per_ip 3: %q, want 3 greetings and 7 refusals", lines)
	}

	e := expectEntry(t, a.caddyProc, "limit reached", map[string]string{"limit": "connections_per_ip"})
	if r, _ := e["remote"].(string); !strings.HasPrefix(r, ip+":") {
		t.Errorf("limit reached: remote %q, want %s:PORT", r, ip)
	}
	if got := limitMetric(t, a.metrics(t), "limit_refusals_total", "limit", "connections_per_ip"); got != 3+7 {
		t.Errorf("caddy_pop3_limit_refusals_total{limit=connections_per_ip} = %v, want 10", got)
	}

	// After the window the bucket is full again.
	time.Sleep(time.Until(end.Add(6*time.Second + 100*time.Millisecond)))
	burst(t)
}

// countingConn counts the bytes read from its connection.
type countingConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// --- 4. failures_per_user_ip, failures_per_ip -------------------------------------

// TestEdgeFailures: after n wrong passwords (failures_per_user_ip: for one
// user from one address; failures_per_ip: for any users from one address)
// the right password gets exactly the wrong-password reply without being
// checked anywhere, until the block expires or the admin API lifts it;
// GET /pop3/blocks lists the block, and a good login resets a user's
// failures from its address.
func TestEdgeFailures(t *testing.T) {
	need(t)
	perUserIP, perIP, perIP2 := freePortT(t), freePortT(t), freePortT(t)
	a := startEdgeCaddy(t, "edge-failures",
		edgeServer{addr: perUserIP, zone: "fuip", limits: "failures_per_user_ip 3 1m 2s", extra: "max_errors 20"},
		edgeServer{addr: perIP, zone: "fip", limits: "failures_per_ip 3 1m 2s", extra: "max_errors 20"},
		// a second port of zone fip (a POP3S port beside POP3, say)
		edgeServer{addr: perIP2, zone: "fip", limits: "failures_per_ip 3 1m 2s", extra: "max_errors 20"})
	usedSecret(carol, carolPass)
	var blockedAttempts atomic.Int64 // right passwords refused by a block
	dovecotLogins := func(user string) int { return logLines(env.dc, "Login: user=<"+user+">") }

	// waitExpiry logs in as user from ip from 1.5s after since until it
	// works, which must be 2s (the block) after since, and not much later.
	waitExpiry := func(t *testing.T, addr, ip, user, pass string, since time.Time) {
		t.Helper()
		c := dialPOP3From(t, ip, addr, nil)
		time.Sleep(time.Until(since.Add(1500 * time.Millisecond)))
		for {
			got := c.tryLogin(user, pass)
			if strings.HasPrefix(got, "+OK") {
				break
			}
			if sansID(got) != replyAuthFailed {
				t.Fatalf("%s from %s while blocked: %q, want %q", user, ip, got, replyAuthFailed)
			}
			blockedAttempts.Add(1)
			if time.Since(since) > 5*time.Second {
				t.Fatalf("%s from %s still refused %v after the block of 2s started", user, ip, time.Since(since).Round(time.Millisecond))
			}
			time.Sleep(100 * time.Millisecond)
		}
		if took := time.Since(since); took < 2*time.Second {
			t.Errorf("%s from %s logged in %v after the block of 2s started", user, ip, took.Round(time.Millisecond))
		}
		c.ok("STAT")
		c.quit()
	}

	t.Run("failures_per_user_ip", func(t *testing.T) {
		const ip = "127.0.0.11"
		n0 := dovecotLogins(carol)
		c := dialPOP3From(t, ip, perUserIP, nil)
		// A good login resets carol's failures from the address: two, a
		// login, two more leave her unblocked.
		for i := range 2 {
			c.failLogin(carol)
			c.failLogin(carol)
			g := dialPOP3From(t, ip, perUserIP, nil)
			if got := g.tryLogin(carol, carolPass); !strings.HasPrefix(got, "+OK") {
				t.Fatalf("carol after %d wrong passwords (%d since her last good login): %q", 2*(i+1), 2, got)
			}
			g.quit()
		}

		// Three in a row block her there.
		c.failLogin(carol)
		c.failLogin(carol)
		since := time.Now()
		c.failLogin(carol)
		before := waitLogLines(env.dc, "Login: user=<"+carol+">", n0+2) // the two good logins above
		c.expectBlocked(carol, carolPass)
		if got := loginMethods[1].login(c, carol, carolPass); sansID(got) != replyAuthFailed { // AUTH PLAIN
			t.Errorf("AUTH PLAIN with the right password while blocked: %q, want %q", got, replyAuthFailed)
		}
		blockedAttempts.Add(2)
		// Others from the address and carol from another address log in.
		o := dialPOP3From(t, ip, perUserIP, nil)
		o.login(alice, alicePass)
		o.quit()
		o = dialPOP3From(t, "127.0.0.12", perUserIP, nil)
		o.login(carol, carolPass)
		o.quit()

		bl := expectBlocks(t, a, blockView{Zone: "fuip", Limit: "failures_per_user_ip", Address: ip, User: carol})
		if len(bl) == 1 {
			if d := time.Until(bl[0].Until); d <= 0 || d > 2*time.Second+500*time.Millisecond {
				t.Errorf("block until %v: %v from now, want within the 2s block", bl[0].Until, d)
			}
		}
		e := expectEntry(t, a.caddyProc, "blocked", map[string]string{"limit": "failures_per_user_ip", "address": ip, "user": carol, "zone": "fuip"})
		if e != nil && e["until"] == nil {
			t.Errorf("blocked entry without until: %v", e)
		}
		if e := expectEntry(t, a.caddyProc, "login blocked", map[string]string{"limit": "failures_per_user_ip", "remote": remoteOf(c), "user": carol, "method": "plain"}); e != nil && e["session"] == nil {
			t.Errorf("login blocked entry without session: %v", e)
		}

		waitExpiry(t, perUserIP, ip, carol, carolPass, since)
		expectEvent(t, a.caddyProc, "pop3_unblocked", map[string]string{"zone": "fuip", "limit": "failures_per_user_ip", "address": ip, "user": carol, "reason": "expired"})
		// The blocked right passwords reached nobody: Dovecot saw only the
		// logins after the block (one from 127.0.0.12, one after expiry).
		if got := waitLogLines(env.dc, "Login: user=<"+carol+">", before+2); got != before+2 {
			t.Errorf("Dovecot logged %d logins of carol since the block started, want 2: the blocked attempts reached it", got-before)
		}
		expectBlocks(t, a)

		// Blocked again from another address, and lifted by the admin API.
		const ip2 = "127.0.0.16"
		c2 := dialPOP3From(t, ip2, perUserIP, nil)
		for range 3 {
			c2.failLogin(carol)
		}
		c2.expectBlocked(carol, carolPass)
		blockedAttempts.Add(1)
		if code, b := a.do(t, http.MethodDelete, "/pop3/blocks", "", nil); code != http.StatusBadRequest {
			t.Errorf("DELETE /pop3/blocks without address, user or limit: %d %s, want 400", code, b)
		}
		if n := a.unblock(t, "user=nobody"); n != 0 {
			t.Errorf("DELETE ?user=nobody: removed %d, want 0", n)
		}
		if n := a.unblock(t, "address="+ip2); n != 1 {
			t.Errorf("DELETE ?address=%s: removed %d, want 1", ip2, n)
		}
		if d := expectEvent(t, a.caddyProc, "pop3_blocked", map[string]string{"zone": "fuip", "limit": "failures_per_user_ip", "address": ip2, "user": carol}); d != nil && d["until"] == nil {
			t.Errorf("pop3_blocked event without until: %v", d)
		}
		expectEvent(t, a.caddyProc, "pop3_unblocked", map[string]string{"zone": "fuip", "limit": "failures_per_user_ip", "address": ip2, "user": carol, "reason": "admin"})
		if got := c2.tryLogin(carol, carolPass); !strings.HasPrefix(got, "+OK") {
			t.Fatalf("carol from %s after DELETE /pop3/blocks: %q", ip2, got)
		}
		c2.quit()
		expectBlocks(t, a)
	})

	t.Run("failures_per_ip", func(t *testing.T) {
		const ip = "127.0.0.13"
		c := dialPOP3From(t, ip, perIP, nil)
		c.failLogin(alice)
		c.failLogin(bob)
		since := time.Now()
		c.failLogin(carol)
		// The address is blocked for every user, with the right password.
		for _, u := range []struct{ user, pass string }{{dave, davePass}, {alice, alicePass}} {
			c.expectBlocked(u.user, u.pass)
			blockedAttempts.Add(1)
		}
		// The zone's other port knows the block; another address is free.
		o := dialPOP3From(t, ip, perIP2, nil)
		o.expectBlocked(dave, davePass)
		blockedAttempts.Add(1)
		o = dialPOP3From(t, "127.0.0.14", perIP, nil)
		o.login(dave, davePass)
		o.quit()
		expectBlocks(t, a, blockView{Zone: "fip", Limit: "failures_per_ip", Address: ip})
		expectEntry(t, a.caddyProc, "blocked", map[string]string{"limit": "failures_per_ip", "address": ip, "zone": "fip"})
		expectEntry(t, a.caddyProc, "login blocked", map[string]string{"limit": "failures_per_ip", "remote": remoteOf(c), "user": dave})
		waitExpiry(t, perIP, ip, dave, davePass, since)
		expectBlocks(t, a)

		// Failures on both ports of the zone count together.
		const ip2 = "127.0.0.15"
		c2 := dialPOP3From(t, ip2, perIP, nil)
		c2.failLogin(alice)
		c2.failLogin(bob)
		o = dialPOP3From(t, ip2, perIP2, nil)
		o.failLogin(carol)
		o.quit()
		c2.expectBlocked(dave, davePass)
		blockedAttempts.Add(1)
		expectBlocks(t, a, blockView{Zone: "fip", Limit: "failures_per_ip", Address: ip2})
		if n := a.unblock(t, "address="+ip2+"&zone=fuip"); n != 0 {
			t.Errorf("DELETE ?address=%s&zone=fuip: removed %d, want 0 (the block is in zone fip)", ip2, n)
		}
		// The spec's address=<ip or prefix>: a network lifts the blocks of
		// the addresses in it.
		if n := a.unblock(t, "address=127.0.0.0/24"); n != 1 {
			t.Errorf("DELETE ?address=127.0.0.0/24: removed %d, want 1 (the block of %s)", n, ip2)
		}
		if got := c2.tryLogin(dave, davePass); !strings.HasPrefix(got, "+OK") {
			if sansID(got) == replyAuthFailed {
				blockedAttempts.Add(1) // still blocked: counted as a refusal
			}
			t.Fatalf("dave from %s after DELETE /pop3/blocks: %q", ip2, got)
		}
		c2.quit()
	})

	m := a.metrics(t)
	for _, limit := range []string{"failures_per_user_ip", "failures_per_ip"} {
		if got := limitMetric(t, m, "blocks_total", "limit", limit); got != 2 {
			t.Errorf("caddy_pop3_blocks_total{limit=%s} = %v, want 2", limit, got)
		}
	}
	refusals := limitMetric(t, m, "limit_refusals_total", "limit", "failures_per_user_ip") +
		limitMetric(t, m, "limit_refusals_total", "limit", "failures_per_ip")
	if want := blockedAttempts.Load(); refusals != float64(want) {
		t.Errorf("caddy_pop3_limit_refusals_total of the failures_* limits = %v, want %d (one per blocked attempt)", refusals, want)
	}
}

// TestEdgeBehindProxyProtocol: behind caddy-l4's proxy_protocol handler
// (a load balancer in front), the limits count the client address of the
// PROXY header, not the load balancer's: a second session of one client
// is refused while another client through the same balancer is greeted,
// and a block names the client.
func TestEdgeBehindProxyProtocol(t *testing.T) {
	need(t)
	addr := freePortT(t)
	const l4proxy = "\t\t\t\tproxy_protocol {\n\t\t\t\t\tallow 127.0.0.0/8\n\t\t\t\t\ttimeout 2s\n\t\t\t\t}\n"
	body := "upstream " + env.dc.POP3Addr + "\nlimits {\nsessions_per_ip 1\nfailures_per_ip 1 1m 1m\n}"
	// The listener greets only after a PROXY header: no harness probe.
	a := startAdminCaddy(t, "edge-proxy-protocol", func(admin string) string { return poolCaddyfile(admin, poolServer(addr, body, l4proxy)) })
	header := func(client string) string {
		return fmt.Sprintf("PROXY TCP4 %s 127.0.0.1 4242 %s\r\n", client, port(addr))
	}
	waitGreeting(t, a.caddyProc, addr, header("192.0.2.99"))
	// via is a connection from the balancer (127.0.0.1) for client.
	via := func(client string) (*client, string) {
		c := connectFrom(t, "127.0.0.1", addr)
		c.write(header(client))
		c.deadline(5 * time.Second)
		l := c.line()
		c.deadline(30 * time.Second)
		c.greeting = l
		return c, l
	}

	held, l := via("192.0.2.55")
	if !strings.HasPrefix(l, "+OK") {
		t.Fatalf("the first session of 192.0.2.55: %q", l)
	}
	if _, l := via("192.0.2.55"); l != replyTooManySessions {
		t.Errorf("a second session of 192.0.2.55: %q, want %q", l, replyTooManySessions)
	}
	other, l := via("192.0.2.56")
	if !strings.HasPrefix(l, "+OK") {
		t.Fatalf("a session of 192.0.2.56 beside one of 192.0.2.55, both through 127.0.0.1: %q, want a greeting", l)
	}
	other.failLogin(alice)
	other.expectBlocked(alice, alicePass)
	expectBlocks(t, a, blockView{Limit: "failures_per_ip", Address: "192.0.2.56"})
	held.login(alice, alicePass)
	held.quit()
}

// TestEdgeBlockedAttemptDelay: a blocked attempt is answered after the
// failure delay, as a wrong password is, so that its timing does not tell
// a guesser that the address is blocked.
func TestEdgeBlockedAttemptDelay(t *testing.T) {
	need(t)
	addr := freePortT(t)
	startEdgeCaddy(t, "edge-blocked-delay", edgeServer{addr: addr, delay: "300ms", limits: "failures_per_user_ip 1 1m 1m"})
	c := dialPOP3From(t, "127.0.0.23", addr, nil)
	timed := func(pass string) (string, time.Duration) {
		c.ok("USER " + carol)
		start := time.Now()
		return c.cmd("PASS " + pass), time.Since(start)
	}
	usedSecret(carol, wrongPass)
	usedSecret(carol, carolPass)
	wrong, wrongTook := timed(wrongPass)
	blocked, blockedTook := timed(carolPass)
	if sansID(wrong) != replyAuthFailed || sansID(blocked) != replyAuthFailed {
		t.Fatalf("a wrong password: %q; then the right one, blocked: %q; want %q for both", wrong, blocked, replyAuthFailed)
	}
	t.Logf("wrong password answered after %v, blocked attempt after %v", wrongTook.Round(time.Millisecond), blockedTook.Round(time.Millisecond))
	if wrongTook < 300*time.Millisecond {
		t.Errorf("a wrong password was answered after %v, want at least auth_failure_delay 300ms", wrongTook.Round(time.Millisecond))
	}
	if blockedTook < 300*time.Millisecond {
		t.Errorf("a blocked attempt was answered after %v, want at least auth_failure_delay 300ms, as a wrong password", blockedTook.Round(time.Millisecond))
	}
}

// --- 5. exempt ----------------------------------------------------------------

// TestEdgeExempt: with every limit set tight, clients from exempt addresses
// (a bare address and a network) hold many sessions of one user, fail
// logins without a block, send nothing for longer than the input rate's
// window and live longer than max_session_lifetime; their sessions and
// failures count nowhere, so a client from another address still logs in
// as that user, while the limits hold for it.
func TestEdgeExempt(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-exempt", edgeServer{addr: addr, extra: "max_errors 20", limits: `sessions_per_ip 1
sessions_per_user 1
sessions_per_user_ip 1
connections_per_ip 1 1m
failures_per_user_ip 2 1m 1m
failures_per_ip 2 1m 1m
failures_per_user 2 1m 1m
min_input_rate 1000 1s
max_session_lifetime 2s
exempt 127.0.0.2 127.0.1.0/24`})
	exempt := []string{"127.0.0.2", "127.0.1.7"}
	const ctlIP = "127.0.0.3"

	var loggedIn, silent []*client
	for _, ip := range exempt {
		for range 2 {
			c := dialPOP3From(t, ip, addr, nil)
			c.login(alice, alicePass)
			loggedIn = append(loggedIn, c)
		}
		c := dialPOP3From(t, ip, addr, nil)
		for range 3 {
			c.failLogin(alice)
		}
		if got := c.tryLogin(alice, alicePass); !strings.HasPrefix(got, "+OK") {
			t.Fatalf("alice from exempt %s after three wrong passwords: %q", ip, got)
		}
		loggedIn = append(loggedIn, c)
		silent = append(silent, dialPOP3From(t, ip, addr, nil))
	}

	// A client from elsewhere: alice's exempt sessions and failures did
	// not count, so she logs in; then the limits hold for that address.
	ctl := dialPOP3From(t, ctlIP, addr, nil)
	ctlStart := time.Now()
	if got := ctl.tryLogin(alice, alicePass); !strings.HasPrefix(got, "+OK") {
		t.Fatalf("alice from %s beside her exempt sessions and failures: %q", ctlIP, got)
	}
	ctl.ok("STAT")
	if c, l := firstLine(t, ctlIP, addr); l != replyTooManyConnections && l != replyTooManySessions {
		t.Errorf("a second connection from %s: %q, want the connections_per_ip or sessions_per_ip refusal", ctlIP, l)
	} else {
		c.expectClosed()
	}

	// Past max_session_lifetime and the input rate's window: the control
	// session is closed, the exempt ones live.
	time.Sleep(time.Until(ctlStart.Add(2500 * time.Millisecond)))
	closedWithin(t, ctl, 3*time.Second)
	for _, c := range loggedIn {
		c.ok("STAT")
		c.quit()
	}
	for _, c := range silent {
		if got := c.tryLogin(alice, alicePass); !strings.HasPrefix(got, "+OK") {
			t.Errorf("alice from exempt %s after 2.5s of silence: %q", c.tcp.LocalAddr(), got)
			continue
		}
		c.quit()
	}

	expectBlocks(t, a)
	for _, msg := range []string{"limit reached", "login blocked", "blocked"} {
		for _, e := range handlerEntries(a.caddyProc, msg, nil) {
			r, _ := e["remote"].(string)
			ad, _ := e["address"].(string)
			for _, ip := range exempt {
				if strings.HasPrefix(r, ip+":") || ad == ip {
					t.Errorf("%q for exempt %s: %v", msg, ip, e)
				}
			}
		}
	}
}

// --- 6. min_input_rate -----------------------------------------------------------

// TestEdgeMinInputRate: with min_input_rate 10 2s a client that drips a
// USER line at a byte a second is closed before it completes the line,
// with the -ERR, and so is one that sends nothing; a normal client logs in
// and, logged in, is not subject to the rate.
func TestEdgeMinInputRate(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-input-rate", edgeServer{addr: addr, limits: "min_input_rate 10 2s"})

	normal := dialPOP3From(t, "127.0.0.17", addr, nil)
	normal.login(alice, alicePass)

	silent := dialPOP3From(t, "127.0.0.19", addr, nil)
	silentStart := time.Now()
	drip := dialPOP3From(t, "127.0.0.18", addr, nil)
	start := time.Now()
	stop := dripBytes(drip.conn, []byte("USER "+alice+"\r\n"), time.Second)
	drip.deadline(20 * time.Second)
	l, err := drip.r.ReadString('\n')
	took := time.Since(start)
	stop()
	if err != nil {
		t.Fatalf("the dripping client after %v: %v (got %q), want %q", took.Round(time.Millisecond), err, l, replyTooSlow)
	}
	if got := sansID(strings.TrimSuffix(l, "\r\n")); got != replyTooSlow {
		t.Fatalf("the dripping client after %v: %q, want %q", took.Round(time.Millisecond), l, replyTooSlow)
	}
	if took < 1500*time.Millisecond || took > 8*time.Second {
		t.Errorf("the dripping client was closed after %v, want about the 2s window", took.Round(time.Millisecond))
	}
	if rest, _ := closedWithin(t, drip, 5*time.Second); len(rest) > 0 {
		t.Errorf("after %q: %q, want the close", replyTooSlow, rest)
	}
	expectEntry(t, a.caddyProc, "limit reached", map[string]string{"limit": "min_input_rate", "remote": remoteOf(drip)})

	// A client that sends nothing at all is as slow as one can be.
	silent.deadline(10 * time.Second)
	l, err = silent.r.ReadString('\n')
	took = time.Since(silentStart)
	if err != nil || sansID(strings.TrimSuffix(l, "\r\n")) != replyTooSlow {
		t.Errorf("a silent client after %v: %q, %v; want %q", took.Round(time.Millisecond), l, err, replyTooSlow)
	} else if took > 8*time.Second {
		t.Errorf("the silent client was closed after %v, want about the 2s window", took.Round(time.Millisecond))
	}

	// The normal session has been quiet for longer than the window.
	normal.ok("STAT")
	normal.quit()
	if got := limitMetric(t, a.metrics(t), "limit_refusals_total", "limit", "min_input_rate"); got != 2 {
		t.Errorf("caddy_pop3_limit_refusals_total{limit=min_input_rate} = %v, want 2", got)
	}
}

// TestEdgeMinInputRateTLSHandshake: before login the proxy also waits for
// the client during a TLS handshake, on an implicit TLS port or after
// STLS; a client that drips its ClientHello at two bytes a second, under
// min_input_rate 10 2s, must be closed like one that drips a command (with
// nothing written: no plaintext can go out once TLS started), not held
// until timeout.
func TestEdgeMinInputRateTLSHandshake(t *testing.T) {
	need(t)
	implicit, stls := freePortT(t), freePortT(t)
	const limits, extra = "min_input_rate 10 2s", "timeout 15s"
	a := startEdgeCaddy(t, "edge-input-rate-tls",
		edgeServer{addr: implicit, tls: true, limits: limits, extra: extra},
		edgeServer{addr: stls, stls: true, limits: limits, extra: extra})
	waitSTLS(t, a.caddyProc, stls)
	hello := clientHello(t)

	for _, tc := range []struct {
		name, addr string
		stls       bool
	}{{"implicit_tls", implicit, false}, {"STLS", stls, true}} {
		t.Run(tc.name, func(t *testing.T) {
			var c *client
			if tc.stls {
				c = dialPOP3From(t, "127.0.0.18", tc.addr, nil)
				c.ok("STLS")
			} else {
				c = connectFrom(t, "127.0.0.18", tc.addr)
			}
			start := time.Now()
			stop := dripBytes(c.conn, hello, 500*time.Millisecond)
			defer stop()
			c.deadline(8 * time.Second)
			got, err := io.ReadAll(c.r)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("a client dripping its ClientHello (%d of %d bytes sent) is still connected after %v, want a close after about 2s",
					min(int(time.Since(start)/(500*time.Millisecond))+1, len(hello)), len(hello), time.Since(start).Round(time.Millisecond))
			}
			if len(got) > 0 {
				t.Errorf("the dripping TLS client got %q before the close, want nothing", got)
			}
			if took := time.Since(start); took < 1500*time.Millisecond {
				t.Errorf("the dripping TLS client was closed after %v, want about the 2s window", took.Round(time.Millisecond))
			}
		})
	}
}

// dripBytes writes data to conn one byte at a time, every apart, until
// all is written, a write fails or the returned stop is called; stop
// returns once the writing has ended.
func dripBytes(conn net.Conn, data []byte, every time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, b := range data {
			if _, err := conn.Write([]byte{b}); err != nil {
				return
			}
			select {
			case <-done:
				return
			case <-time.After(every):
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		wg.Wait()
	}
}

// clientHello returns the first flight of a TLS client: a ClientHello
// record for localhost.
func clientHello(t *testing.T) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	go func() { _ = tls.Client(client, &tls.Config{ServerName: "localhost"}).Handshake() }()
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16<<10)
	n, err := server.Read(buf)
	server.Close()
	if err != nil || n < 5 || buf[0] != 0x16 {
		t.Fatalf("capturing a ClientHello: %d bytes %x, %v", n, buf[:min(n, 8)], err)
	}
	return buf[:n]
}

// --- 7. max_session_lifetime -------------------------------------------------------

// TestEdgeMaxSessionLifetime: with max_session_lifetime 2s a logged-in
// session that keeps sending commands is closed 2s after it began, so is
// a quiet one (parked by the relay after 1s), and one that has not logged
// in gets the -ERR and the close; their sessions_per_ip and
// sessions_per_user slots are free again afterwards.
func TestEdgeMaxSessionLifetime(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-lifetime", edgeServer{addr: addr, limits: "max_session_lifetime 2s\nsessions_per_ip 3\nsessions_per_user 1"})
	const ip = "127.0.0.19"

	start := time.Now()
	in := dialPOP3From(t, ip, addr, nil)
	in.login(alice, alicePass)
	quietStart := time.Now()
	quiet := dialPOP3From(t, ip, addr, nil)
	quiet.login(bob, bobPass)
	quiet.ok("STAT")
	preStart := time.Now()
	pre := dialPOP3From(t, ip, addr, nil)

	// Busy, so that only its age can end it.
	var closedAfter time.Duration
	for {
		_, err := io.WriteString(in.conn, "STAT\r\n")
		var l string
		if err == nil {
			l, err = in.r.ReadString('\n')
		}
		if err != nil {
			closedAfter = time.Since(start)
			break
		}
		if !strings.HasPrefix(l, "+OK") {
			t.Fatalf("STAT: %q", l)
		}
		if time.Since(start) > 8*time.Second {
			t.Fatal("the logged-in session is still open after 8s, with max_session_lifetime 2s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if closedAfter < 2*time.Second || closedAfter > 6*time.Second {
		t.Errorf("the busy logged-in session was closed %v after it began, want 2s", closedAfter.Round(time.Millisecond))
	}

	if rest, _ := closedWithin(t, quiet, 6*time.Second); len(rest) > 0 {
		t.Errorf("the quiet logged-in session got %q before its close, want nothing", rest)
	}
	if took := time.Since(quietStart); took < 2*time.Second {
		t.Errorf("the quiet logged-in session was closed %v after it began, want 2s", took.Round(time.Millisecond))
	}

	pre.deadline(10 * time.Second)
	l, err := pre.r.ReadString('\n')
	took := time.Since(preStart)
	if err != nil || sansID(strings.TrimSuffix(l, "\r\n")) != replyLifetime {
		t.Fatalf("the session before login after %v: %q, %v; want %q", took.Round(time.Millisecond), l, err, replyLifetime)
	}
	if took < 2*time.Second || took > 6*time.Second {
		t.Errorf("the session before login was ended %v after it began, want 2s", took.Round(time.Millisecond))
	}
	pre.expectClosed()
	expectEntry(t, a.caddyProc, "limit reached", map[string]string{"limit": "max_session_lifetime", "remote": remoteOf(pre)})

	// The slots of the ended sessions are free: three sessions from the
	// address, alice and bob logged in again.
	waitFor(t, 5*time.Second, "the ended sessions to leave the admin API's list", func() bool { return len(a.sessions(t, "")) == 0 })
	for _, u := range []struct{ user, pass string }{{alice, alicePass}, {bob, bobPass}, {dave, davePass}} {
		c := dialPOP3From(t, ip, addr, nil)
		if got := c.tryLogin(u.user, u.pass); !strings.HasPrefix(got, "+OK") {
			t.Errorf("%s from %s after the sessions ended: %q", u.user, ip, got)
		}
	}
}

// --- 8. password spray --------------------------------------------------------------

// TestEdgePasswordSpray: a spray of one password a round over 200 users
// from 20 addresses stays under any per-address limit, but with
// failures_per_user 3 1m 1m each user is blocked after the third round, so
// the fourth, which holds the victim's password, is refused for her like a
// wrong one and reaches no upstream. The victim still logs in from the
// address she logged in from before, and a user from an exempt address;
// from an unknown address both are refused.
func TestEdgePasswordSpray(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-spray", edgeServer{addr: addr, limits: "failures_per_user 3 1m 1m\nexempt 127.0.0.2"})
	victim, victimPass := alice, alicePass
	aliceLogins := func() int { return logLines(env.dc, "Login: user=<"+victim+">") }

	// The victim's usual address becomes known-good.
	n0 := aliceLogins()
	v := dialPOP3(t, addr, nil)
	v.login(victim, victimPass)
	v.quit()
	if got := waitLogLines(env.dc, "Login: user=<"+victim+">", n0+1); got != n0+1 {
		t.Fatalf("Dovecot logged %d logins of %s, want 1", got-n0, victim)
	}

	// The victim and bob exist in Dovecot; the other 198 do not, which
	// fails like a wrong password.
	users := []string{victim, bob}
	for i := len(users); i < 200; i++ {
		users = append(users, fmt.Sprintf("spray%03d", i))
	}
	rounds := []string{"Spring2026!", "Winter2025!", "Password123", victimPass}
	for _, p := range rounds[:3] {
		usedSecretValue(p, "spray password")
	}
	const sources = 20
	start := time.Now()
	for r, pass := range rounds {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var bad []string
		for w := range sources {
			wg.Add(1)
			go func() {
				defer wg.Done()
				local := fmt.Sprintf("127.0.0.%d", 10+w)
				for i := w; i < len(users); i += sources {
					reply, s, err := loginFrom(addr, users[i], pass, sessionOpts{local: local})
					if err == nil {
						err = s.quit()
						s.conn.Close()
					}
					if err != nil || sansID(reply) != replyAuthFailed {
						mu.Lock()
						bad = append(bad, fmt.Sprintf("%s from %s: %q %v", users[i], local, reply, err))
						mu.Unlock()
					}
				}
			}()
		}
		wg.Wait()
		if len(bad) > 0 {
			t.Fatalf("round %d: %d of %d attempts not refused as a wrong password, e.g. %s", r+1, len(bad), len(users), strings.Join(bad[:min(len(bad), 5)], "; "))
		}
	}
	t.Logf("%d rounds of %d attempts from %d addresses in %v", len(rounds), len(users), sources, time.Since(start).Round(time.Millisecond))

	// Every user is blocked, from every address that is not known-good.
	blocked := map[string]bool{}
	for _, b := range a.blocks(t) {
		if b.Limit == "failures_per_user" && b.Address == "" {
			blocked[b.User] = true
		} else {
			t.Errorf("unexpected block %+v", b)
		}
	}
	if len(blocked) != len(users) {
		t.Errorf("GET /pop3/blocks lists %d users blocked by failures_per_user, want %d", len(blocked), len(users))
	}
	isBlockedLogin := func(e map[string]any) bool {
		return e["logger"] == "layer4.handlers.pop3" && e["msg"] == "login blocked" && e["limit"] == "failures_per_user"
	}
	if n := len(waitCaddyEntries(a.caddyProc, len(users), isBlockedLogin)); n != len(users) {
		t.Errorf("%d \"login blocked\" entries for failures_per_user, want %d (the fourth round)", n, len(users))
	}
	expectEntry(t, a.caddyProc, "blocked", map[string]string{"limit": "failures_per_user", "user": victim})

	// The fourth round's right password reached no upstream: Dovecot has
	// only the logins below.
	v = dialPOP3(t, addr, nil)
	v.login(victim, victimPass)
	v.ok("STAT")
	v.quit()
	if got := waitLogLines(env.dc, "Login: user=<"+victim+">", n0+2); got != n0+2 {
		t.Errorf("Dovecot logged %d logins of %s, want 2: the sprayed right password reached it", got-n0, victim)
	}
	x := dialPOP3From(t, "127.0.0.2", addr, nil)
	x.login(bob, bobPass)
	x.ok("STAT")
	x.quit()
	for _, u := range []struct{ user, pass string }{{victim, victimPass}, {bob, bobPass}} {
		c := dialPOP3From(t, "127.0.0.51", addr, nil)
		c.expectBlocked(u.user, u.pass)
		c.quit()
	}
	// The admin lifts bob's block (by user and limit): he logs in from
	// anywhere again, the others stay blocked.
	if n := a.unblock(t, "user="+bob+"&limit=failures_per_user"); n != 1 {
		t.Errorf("DELETE ?user=%s&limit=failures_per_user: removed %d, want 1", bob, n)
	}
	c := dialPOP3From(t, "127.0.0.51", addr, nil)
	c.login(bob, bobPass)
	c.quit()
	if n := len(a.blocks(t)); n != len(users)-1 {
		t.Errorf("%d blocks after lifting bob's, want %d", n, len(users)-1)
	}
	if got := limitMetric(t, a.metrics(t), "blocks_total", "limit", "failures_per_user"); got != float64(len(users)) {
		t.Errorf("caddy_pop3_blocks_total{limit=failures_per_user} = %v, want %d", got, len(users))
	}
}

// --- 9. reload ---------------------------------------------------------------------

// TestEdgeReloadKeepsState: a config reload (another greeting) keeps a
// block, a failure count one short of a block, and the sessions counted
// toward sessions_per_ip, whose slots the old sessions give back when they
// end after the reload.
func TestEdgeReloadKeepsState(t *testing.T) {
	need(t)
	srv := edgeServer{addr: freePortT(t), greeting: "edge 1", extra: "max_errors 20",
		limits: "sessions_per_ip 2\nfailures_per_user_ip 2 1m 1m\nfailures_per_ip 3 1m 1m"}
	addr := srv.addr
	var admin string
	a := startAdminCaddy(t, "edge-reload", func(ad string) string { admin = ad; return edgeCaddyfile(ad, srv) }, listener{addr: addr})
	const blockedIP, sessionsIP, countedIP = "127.0.0.20", "127.0.0.21", "127.0.0.22"

	// carol blocked from blockedIP.
	c := dialPOP3From(t, blockedIP, addr, nil)
	c.failLogin(carol)
	c.failLogin(carol)
	c.expectBlocked(carol, carolPass)
	// sessionsIP at its two sessions.
	s1 := dialPOP3From(t, sessionsIP, addr, nil)
	s1.login(alice, alicePass)
	s2 := dialPOP3From(t, sessionsIP, addr, nil)
	expectRefused(t, sessionsIP, addr, replyTooManySessions)
	// countedIP one failure short of its block.
	f := dialPOP3From(t, countedIP, addr, nil)
	f.failLogin(alice)
	f.failLogin(bob)

	srv.greeting = "edge 2"
	a.loadCaddyfile(t, edgeCaddyfile(admin, srv))

	n := dialPOP3From(t, blockedIP, addr, nil)
	if n.greeting != "+OK edge 2" {
		t.Errorf("greeting after the reload: %q, want \"+OK edge 2\"", n.greeting)
	}
	n.expectBlocked(carol, carolPass)
	expectRefused(t, sessionsIP, addr, replyTooManySessions)
	f2 := dialPOP3From(t, countedIP, addr, nil)
	f2.failLogin(dave)
	f2.expectBlocked(dave, davePass)
	f2.expectBlocked(alice, alicePass)
	expectBlocks(t, a,
		blockView{Limit: "failures_per_user_ip", Address: blockedIP, User: carol},
		blockView{Limit: "failures_per_ip", Address: countedIP})

	// The old sessions give their slots back after the reload.
	s2.quit()
	s3, _ := waitAccepted(t, sessionsIP, addr, replyTooManySessions)
	if s3.greeting != "+OK edge 2" {
		t.Errorf("greeting after the reload: %q, want \"+OK edge 2\"", s3.greeting)
	}
	expectRefused(t, sessionsIP, addr, replyTooManySessions)
	s1.ok("STAT")
	s1.quit()
	s4, _ := waitAccepted(t, sessionsIP, addr, replyTooManySessions)
	s3.login(alice, alicePass)
	s4.login(bob, bobPass)
	expectRefused(t, sessionsIP, addr, replyTooManySessions)
	s3.quit()
	s4.quit()
}

// --- 10. JSON ------------------------------------------------------------------------

// TestEdgeJSONConfig loads a config whose limits hold every option in the
// JSON form, durations as strings and as nanoseconds, through the admin
// API; the limits act in their zone; a config with an invalid limits option
// is refused and the running one goes on.
func TestEdgeJSONConfig(t *testing.T) {
	need(t)
	addr := freePortT(t)
	a := startEdgeCaddy(t, "edge-json", edgeServer{addr: addr, limits: "sessions_per_ip 100"})
	limits := map[string]any{
		"zone": "j", "sessions_per_ip": 1, "sessions_per_user": 5, "sessions_per_user_ip": 3,
		"connections_per_ip":   map[string]any{"count": 20, "window": "1m"},
		"failures_per_user_ip": map[string]any{"count": 5, "window": "15m", "block": "15m"},
		"failures_per_ip":      map[string]any{"count": 1, "window": int64(time.Minute), "block": "1m"},
		"failures_per_user":    map[string]any{"count": 20, "window": "15m", "block": int64(15 * time.Minute)},
		"ipv6_prefix":          56,
		"exempt":               []string{"127.0.0.2", "10.0.0.0/8", "2001:db8::/32"},
		"min_input_rate":       map[string]any{"bytes": 1, "window": "10s"},
		"max_session_lifetime": "2h",
	}
	config := func() []byte {
		cfg := map[string]any{
			"admin":   map[string]any{"listen": a.admin},
			"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "DEBUG"}}},
			"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"edge": map[string]any{
				"listen": []string{addr},
				"routes": []any{map[string]any{"handle": []any{map[string]any{
					"handler":            "pop3",
					"upstream":           []any{map[string]any{"address": env.dc.POP3Addr}},
					"starttls":           "off",
					"auth_failure_delay": "1ms",
					"greeting":           "json",
					"limits":             limits,
				}}}},
			}}}},
		}
		b, err := json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a.load(t, "application/json", config())

	const ip = "127.0.0.30"
	var c *client
	waitFor(t, 5*time.Second, "the JSON config's greeting", func() bool {
		c = dialPOP3From(t, ip, addr, nil)
		if c.greeting == "+OK json" {
			return true
		}
		c.quit()
		return false
	})
	check := func(t *testing.T) {
		t.Helper()
		expectRefused(t, ip, addr, replyTooManySessions)
		expectBlocks(t, a, blockView{Zone: "j", Limit: "failures_per_ip", Address: ip})
		for range 2 { // exempt
			x := dialPOP3From(t, "127.0.0.2", addr, nil)
			x.login(alice, alicePass)
			defer x.quit()
		}
	}
	c.failLogin(alice)
	c.expectBlocked(alice, alicePass)
	check(t)

	// Invalid: refused, and the running config keeps its limits and state.
	for name, bad := range map[string]any{
		"exempt":      []string{"not-an-address"},
		"ipv6_prefix": 129,
	} {
		good := limits[name]
		limits[name] = bad
		if code, b := a.do(t, http.MethodPost, "/load", "application/json", config()); code == http.StatusOK {
			t.Errorf("POST /load with limits %s %v: 200, want an error", name, bad)
		} else if !strings.Contains(string(b), name) {
			t.Errorf("POST /load with limits %s %v: %d %s, want an error naming %s", name, bad, code, b, name)
		}
		limits[name] = good
	}
	check(t)
	c.quit()
}
