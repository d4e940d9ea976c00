package pop3

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

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

// sessionView is what the admin API shows of a session, like doveadm who.
type sessionView struct {
	ID   string `json:"id"`
	User string `json:"user,omitempty"`
	// UpstreamUser is whose mailbox the session acts as, when that is not
	// User: an authzid, or the auth server's Auth-User.
	UpstreamUser string    `json:"upstream_user,omitempty"`
	Remote       string    `json:"remote"`
	Upstream     string    `json:"upstream,omitempty"`
	State        string    `json:"state"`
	TLS          bool      `json:"tls"`
	Start        time.Time `json:"start"`
	FromClient   int64     `json:"bytes_from_client"`
	ToClient     int64     `json:"bytes_to_client"`
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

func (s *session) view() sessionView {
	s.shared.mu.Lock()
	defer s.shared.mu.Unlock()
	v := sessionView{
		ID: s.id, User: s.shared.user, Remote: s.remote, Upstream: s.shared.upstream, State: "authorization",
		TLS: s.shared.tls, Start: s.start, FromClient: s.shared.fromClient.Load(), ToClient: s.shared.toClient.Load(),
		UpstreamUser: s.shared.upstreamUser,
	}
	if s.shared.relaying {
		v.State = "relay"
		// The relay's own counts grow in chunks; the kernel's are live (on
		// the wire, so TLS records count whole).
		if in, out, ok := wireBytes(s.raw); ok && s.shared.wireOK {
			v.FromClient, v.ToClient = max(v.FromClient, in-s.shared.wireIn), max(v.ToClient, out-s.shared.wireOut)
		}
	}
	return v
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

// adminAPI serves /pop3/sessions on Caddy's admin endpoint: GET lists the
// live sessions; DELETE with id, user (login or upstream user) or remote
// (client IP) closes them, as doveadm who and doveadm kick do.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.pop3",
		New: func() caddy.Module { return adminAPI{} },
	}
}

// Routes implements caddy.AdminRouter.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/pop3/sessions", Handler: caddy.AdminHandlerFunc(handleSessions)}}
}

func handleSessions(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	id, user, remote := q.Get("id"), q.Get("user"), q.Get("remote")
	views := []sessionView{}
	filter := func(s *session) bool {
		v := s.view()
		host, _, _ := net.SplitHostPort(v.Remote)
		// user matches the login name or the mailbox acted as: kicking a
		// mailbox's sessions must reach those that logged in for it.
		if (id == "" || v.ID == id) && (user == "" || v.User == user || v.UpstreamUser == user) && (remote == "" || host == remote || v.Remote == remote) {
			views = append(views, v)
			return true
		}
		return false
	}
	switch r.Method {
	case http.MethodGet:
		liveSessions.matching(filter)
		sort.Slice(views, func(i, j int) bool { return views[i].Start.Before(views[j].Start) })
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(views)
	case http.MethodDelete:
		if id == "" && user == "" && remote == "" {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("name the sessions to close with id, user or remote")}
		}
		kicked := liveSessions.matching(filter)
		for _, s := range kicked {
			s.kick("Session closed by the administrator")
		}
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(map[string]int{"closed": len(kicked)})
	}
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
}

// Interface guards
var _ caddy.AdminRouter = adminAPI{}
