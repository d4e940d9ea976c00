package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// mode is how a client reaches the POP3 service.
type mode int

const (
	modePlain mode = iota // port 110 style, no TLS
	modeTLS               // port 995 style, TLS from the first byte
	modeSTLS              // port 110 style, STLS before the login
	numModes
)

func (m mode) String() string {
	return [...]string{"plain", "TLS (995)", "STLS"}[m]
}

// short is the mode's name in file names.
func (m mode) short() string {
	return [...]string{"plain", "tls", "stls"}[m]
}

// target is one way to the mailbox: Dovecot directly, caddy-pop3 or NGINX.
type target struct {
	name  string
	addrs [numModes]string
	// tlsConf is the client's TLS configuration for this target (roots,
	// server name, key exchange); a session cache is added per mode.
	tlsConf *tls.Config
	caches  [numModes]tls.ClientSessionCache
	// pids returns the processes whose CPU and memory count as the proxy's;
	// nil for Dovecot directly.
	pids func() ([]int, error)
	// restart, when set, starts the proxy afresh (memory measurements).
	restart func() error
	// store, when set, reads what the proxy's shared store (redis-server)
	// did so far; its CPU is counted apart from the proxy's.
	store func() (storeStats, error)
}

// tlsConfig is the configuration for one TLS connection in mode m: with
// the target's per-mode session cache when resume is on.
func (t *target) tlsConfig(m mode, resume bool) *tls.Config {
	c := t.tlsConf.Clone()
	if resume {
		c.ClientSessionCache = t.caches[m]
	}
	return c
}

// popConn is a client connection after the greeting (and TLS, if any).
type popConn struct {
	c       net.Conn
	r       *bufio.Reader
	resumed bool
	state   *tls.ConnectionState
}

// dialPOP3 connects to t in mode m, does TLS or STLS as the mode says and
// reads the greeting. deadline bounds the whole exchange, and stays set.
func dialPOP3(t *target, m mode, resume bool, deadline time.Time) (*popConn, error) {
	d := net.Dialer{Deadline: deadline}
	raw, err := d.Dial("tcp", t.addrs[m])
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(deadline)
	pc := &popConn{c: raw, r: bufio.NewReader(raw)}
	fail := func(err error) (*popConn, error) {
		_ = raw.Close()
		return nil, err
	}
	handshake := func() error {
		tc := tls.Client(raw, t.tlsConfig(m, resume))
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("TLS handshake: %w", err)
		}
		st := tc.ConnectionState()
		pc.c, pc.r, pc.resumed, pc.state = tc, bufio.NewReader(tc), st.DidResume, &st
		return nil
	}
	if m == modeTLS {
		if err := handshake(); err != nil {
			return fail(err)
		}
	}
	if _, err := pc.expectOK(); err != nil {
		return fail(fmt.Errorf("greeting: %w", err))
	}
	if m == modeSTLS {
		if _, err := pc.cmd("STLS"); err != nil {
			return fail(err)
		}
		if pc.r.Buffered() > 0 {
			return fail(errors.New("data after the STLS reply"))
		}
		if err := handshake(); err != nil {
			return fail(err)
		}
	}
	return pc, nil
}

// cpu is the CPU time of the target's processes so far, in clock ticks.
func (t *target) cpu() (uint64, error) {
	pids, err := t.pids()
	if err != nil {
		return 0, err
	}
	return cpuTicks(pids)
}

func (pc *popConn) expectOK() (string, error) {
	line, err := pc.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(line, "+OK") {
		return "", fmt.Errorf("got %q", strings.TrimSpace(line))
	}
	return line, nil
}

// cmd sends one command line and expects +OK.
func (pc *popConn) cmd(line string) (string, error) {
	if _, err := io.WriteString(pc.c, line+"\r\n"); err != nil {
		return "", err
	}
	reply, err := pc.expectOK()
	if err != nil {
		verb, _, _ := strings.Cut(line, " ")
		return "", fmt.Errorf("%s: %w", verb, err)
	}
	return reply, nil
}

// login sends USER and PASS, one round trip each.
func (pc *popConn) login(user, pass string) error {
	if _, err := pc.cmd("USER " + user); err != nil {
		return err
	}
	_, err := pc.cmd("PASS " + pass)
	return err
}

func (pc *popConn) Close() error { return pc.c.Close() }

// loginSession is one measured session: connect (and TLS), USER/PASS,
// STAT, QUIT. It returns whether TLS resumed a session.
func loginSession(t *target, m mode, resume bool, user, pass string) (bool, error) {
	pc, err := dialPOP3(t, m, resume, time.Now().Add(15*time.Second))
	if err != nil {
		return false, err
	}
	defer pc.Close()
	if err := pc.login(user, pass); err != nil {
		return pc.resumed, err
	}
	if _, err := pc.cmd("STAT"); err != nil {
		return pc.resumed, err
	}
	if _, err := pc.cmd("QUIT"); err != nil {
		return pc.resumed, err
	}
	return pc.resumed, nil
}

// loadResult is one login-rate run of one target in one mode.
type loadResult struct {
	sessions int
	elapsed  time.Duration
	lat      []time.Duration // one per successful session
	errors   int
	firstErr error
	resumed  int
	tls      string // negotiated TLS parameters of one session
}

func (r loadResult) rate() float64 { return float64(r.sessions) / r.elapsed.Seconds() }

// runLoad keeps conc clients doing loginSession against t until dur has
// passed (count == 0) or count sessions have been started.
func runLoad(t *target, m mode, resume bool, conc int, dur time.Duration, count int, users []userCred) loadResult {
	var (
		mu      sync.Mutex
		res     loadResult
		started atomic.Int64
		wg      sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(dur)
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			u := users[w%len(users)]
			var lat []time.Duration
			var errs, resumed int
			var firstErr error
			for {
				if count > 0 {
					if started.Add(1) > int64(count) {
						break
					}
				} else if !time.Now().Before(deadline) {
					break
				}
				t0 := time.Now()
				r, err := loginSession(t, m, resume, u.name, u.pass)
				if err != nil {
					errs++
					if firstErr == nil {
						firstErr = err
					}
					time.Sleep(10 * time.Millisecond) // no busy loop against a broken server
					continue
				}
				lat = append(lat, time.Since(t0))
				if r {
					resumed++
				}
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.errors += errs
			res.resumed += resumed
			if res.firstErr == nil {
				res.firstErr = firstErr
			}
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.sessions = len(res.lat)
	if m != modePlain {
		res.tls = tlsInfo(t, m, resume)
	}
	return res
}

// tlsInfo describes what one session in mode m negotiates with t.
func tlsInfo(t *target, m mode, resume bool) string {
	pc, err := dialPOP3(t, m, resume, time.Now().Add(10*time.Second))
	if err != nil {
		return "?"
	}
	defer pc.Close()
	_, _ = pc.cmd("QUIT")
	st := pc.state
	return fmt.Sprintf("%s %s %s", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite), st.CurveID)
}

// userCred is a mailbox login.
type userCred struct{ name, pass string }

// retr logs in on the plain port of t, fetches message 1 and returns the
// bytes of the RETR response and how long it took; the message must hash to
// want.
func retr(t *target, u userCred, want [32]byte) (int, time.Duration, error) {
	pc, err := dialPOP3(t, modePlain, false, time.Now().Add(5*time.Minute))
	if err != nil {
		return 0, 0, err
	}
	defer pc.Close()
	pc.r = bufio.NewReaderSize(pc.c, 64*1024)
	if err := pc.login(u.name, u.pass); err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if _, err := pc.cmd("RETR 1"); err != nil {
		return 0, 0, err
	}
	h := sha256.New()
	var n int
	for {
		line, err := pc.r.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return 0, 0, err
		}
		h.Write(line)
		n += len(line)
		if string(line) == ".\r\n" {
			break
		}
	}
	elapsed := time.Since(start)
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return 0, 0, errors.New("message differs from what was stored (sha256)")
	}
	_, _ = pc.cmd("QUIT")
	return n, elapsed, nil
}

// maxOpenErrors stops openIdle early: a proxy out of file descriptors
// would otherwise keep every remaining session waiting for its deadline.
const maxOpenErrors = 10

// forEach runs do(0) ... do(n-1), conc at a time, and returns how many
// calls failed and the first error. It hands out no more work once maxErrs
// calls have failed (0: no limit).
func forEach(n, conc int, maxErrs int64, do func(i int) error) (int, error) {
	var next, errs atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if maxErrs > 0 && errs.Load() >= maxErrs {
					return
				}
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := do(i); err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		}()
	}
	wg.Wait()
	var err error
	if p := firstErr.Load(); p != nil {
		err = *p
	}
	return int(errs.Load()), err
}

// openIdle opens n logged-in sessions to t (plain), conc at a time, and
// returns them; on errors it returns what it opened, the number of sessions
// not opened and the first error.
func openIdle(t *target, m mode, n, conc int, users []userCred) ([]*popConn, int, error) {
	conns := make([]*popConn, n)
	_, err := forEach(n, conc, maxOpenErrors, func(i int) error {
		u := users[i%len(users)]
		pc, err := dialPOP3(t, m, false, time.Now().Add(15*time.Second))
		if err == nil {
			if err = pc.login(u.name, u.pass); err != nil {
				_ = pc.Close()
			}
		}
		if err != nil {
			return fmt.Errorf("session %d: %w", i, err)
		}
		_ = pc.c.SetDeadline(time.Time{})
		conns[i] = pc
		return nil
	})
	var open []*popConn
	for _, c := range conns {
		if c != nil {
			open = append(open, c)
		}
	}
	return open, n - len(open), err
}

// checkIdle sends NOOP on every session: each must still be logged in.
func checkIdle(conns []*popConn, conc int) (int, error) {
	return forEach(len(conns), conc, 0, func(i int) error {
		pc := conns[i]
		_ = pc.c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := pc.cmd("NOOP"); err != nil {
			return fmt.Errorf("NOOP on idle session %d: %w", i, err)
		}
		return nil
	})
}

// closeAll sends QUIT to every session and closes it, conc at a time.
func closeAll(conns []*popConn, conc int) {
	_, _ = forEach(len(conns), conc, 0, func(i int) error {
		pc := conns[i]
		_ = pc.c.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = pc.cmd("QUIT")
		return pc.Close()
	})
}
