package pop3

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
	"sync/atomic"
)

// liveSessions is every open session of every pop3 handler, for the admin
// API and for draining a replaced config.
var liveSessions = &sessionRegistry{m: make(map[string]*session)}

type sessionRegistry struct {
	mu sync.Mutex
	m  map[string]*session
}

func (r *sessionRegistry) add(s *session) {
	r.mu.Lock()
	r.m[s.id] = s
	r.mu.Unlock()
}

func (r *sessionRegistry) remove(s *session) {
	r.mu.Lock()
	delete(r.m, s.id)
	r.mu.Unlock()
}

// matching returns the sessions for which keep is true. keep runs after
// the lock is released: it may be slow (view asks the kernel for the
// socket's counts), and every session start and end waits for the lock.
func (r *sessionRegistry) matching(keep func(*session) bool) []*session {
	r.mu.Lock()
	all := make([]*session, 0, len(r.m))
	for _, s := range r.m {
		all = append(all, s)
	}
	r.mu.Unlock()
	out := all[:0]
	for _, s := range all {
		if keep(s) {
			out = append(out, s)
		}
	}
	return out
}

func newSessionID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// shared is the part of a session other goroutines may read or change.
type shared struct {
	mu           sync.Mutex
	user         string
	upstreamUser string // only when it differs from user
	upstream     string
	relaying     bool
	tls          bool

	fromClient atomic.Int64
	toClient   atomic.Int64
	// TCP_INFO counts of the client socket at login; wireOK says they exist.
	wireIn, wireOut int64
	wireOK          bool
	kickReason      atomic.Pointer[string]
	relay           atomic.Pointer[relay] // set once relaying, for kick
}

// kick ends the session from another goroutine, whatever it waits for.
// Before login the session answers -ERR [SYS/TEMP] with reason and closes;
// after it both connections are closed.
func (s *session) kick(reason string) {
	if !s.shared.kickReason.CompareAndSwap(nil, &reason) {
		return
	}
	if r := s.shared.relay.Load(); r != nil {
		r.end("closed_by_admin")
		return
	}
	// The deadlines wake a read, or a write that a client which stopped
	// reading holds up; the context ends auth_http, the failure delay,
	// upstream dials and logins and TLS handshakes. In this order: the
	// session's last -ERR moves the write deadline again.
	s.shared.mu.Lock()
	raw := s.raw
	s.shared.mu.Unlock()
	_ = raw.SetDeadline(aLongTimeAgo)
	s.cancel()
}

func (s *session) kicked() (string, bool) {
	if r := s.shared.kickReason.Load(); r != nil {
		return *r, true
	}
	return "", false
}
