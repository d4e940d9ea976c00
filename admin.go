package pop3

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-pop3/caddy-pop3/internal/sockopt"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// sessionInfo is what the admin API shows of a session in this process's
// list and in the cluster's.
type sessionInfo struct {
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
}

// sessionView is what the admin API shows of a session of this process,
// like doveadm who.
type sessionView struct {
	sessionInfo
	FromClient int64 `json:"bytes_from_client"`
	ToClient   int64 `json:"bytes_to_client"`
}

// info is what the admin API shows of s, without the socket's byte
// counts that view asks the kernel for.
func (s *session) info() sessionInfo {
	s.shared.mu.Lock()
	defer s.shared.mu.Unlock()
	return s.infoLocked()
}

// infoLocked is info with s.shared.mu held.
func (s *session) infoLocked() sessionInfo {
	i := sessionInfo{
		ID: s.id, User: s.shared.user, UpstreamUser: s.shared.upstreamUser, Remote: s.remote,
		Upstream: s.shared.upstream, State: "authorization", TLS: s.shared.tls, Start: s.start,
	}
	if s.shared.relaying {
		i.State = "relay"
	}
	return i
}

func (s *session) view() sessionView {
	s.shared.mu.Lock()
	defer s.shared.mu.Unlock()
	v := sessionView{sessionInfo: s.infoLocked(), FromClient: s.shared.fromClient.Load(), ToClient: s.shared.toClient.Load()}
	if s.shared.relaying {
		// The relay's own counts grow in chunks; the kernel's are live (on
		// the wire, so TLS records count whole).
		if in, out, ok := sockopt.WireBytes(s.raw); ok && s.shared.wireOK {
			v.FromClient, v.ToClient = max(v.FromClient, in-s.shared.wireIn), max(v.ToClient, out-s.shared.wireOut)
		}
	}
	return v
}

// kickReason is what the client of a session closed through the admin
// API reads before login.
const kickReason = "Session closed by the administrator"

// sessionFilter is the admin API's id, user and remote: a session matches
// when it matches every one given.
type sessionFilter struct {
	ID     string `json:"id,omitempty"`
	User   string `json:"user,omitempty"`   // the login or the upstream user
	Remote string `json:"remote,omitempty"` // the client's IP, or IP and port
}

func (f sessionFilter) empty() bool { return f.ID == "" && f.User == "" && f.Remote == "" }

// matches: user matches the login name or the mailbox acted as, since
// kicking a mailbox's sessions must reach those that logged in for it.
func (f sessionFilter) matches(i sessionInfo) bool {
	host, _, _ := net.SplitHostPort(i.Remote)
	return (f.ID == "" || i.ID == f.ID) &&
		(f.User == "" || i.User == f.User || i.UpstreamUser == f.User) &&
		(f.Remote == "" || host == f.Remote || i.Remote == f.Remote)
}

// kickLocal kicks this process's sessions that match f and returns how
// many.
func kickLocal(proc *processState, f sessionFilter) int {
	kicked := proc.sessions.matching(func(s *session) bool { return f.matches(s.info()) })
	for _, s := range kicked {
		s.kick(kickReason)
	}
	return len(kicked)
}

// adminAPI serves /pop3/sessions on Caddy's admin endpoint: GET lists the
// live sessions; DELETE with id, user (login or upstream user) or remote
// (client IP) closes them, as doveadm who and doveadm kick do.
type adminAPI struct {
	proc *processState // nil: theProcess
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.pop3",
		New: func() caddy.Module { return adminAPI{} },
	}
}

// Routes implements caddy.AdminRouter.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/pop3/sessions", Handler: caddy.AdminHandlerFunc(a.handleSessions)},
		{Pattern: "/pop3/blocks", Handler: caddy.AdminHandlerFunc(a.handleBlocks)},
	}
}

func (a adminAPI) process() *processState {
	if a.proc == nil {
		return theProcess
	}
	return a.proc
}

func (a adminAPI) handleSessions(w http.ResponseWriter, r *http.Request) error {
	proc := a.process()
	q := r.URL.Query()
	f := sessionFilter{ID: q.Get("id"), User: q.Get("user"), Remote: q.Get("remote")}
	if r.Method != http.MethodGet && r.Method != http.MethodDelete {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	if r.Method == http.MethodDelete && f.empty() {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("name the sessions to close with id, user or remote")}
	}
	if q.Has("cluster") {
		cluster, err := strconv.ParseBool(q.Get("cluster"))
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("cluster: want 1 or 0, got %q", q.Get("cluster"))}
		}
		if cluster {
			return a.handleClusterSessions(w, r, f)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if r.Method == http.MethodDelete {
		return json.NewEncoder(w).Encode(map[string]int{"closed": kickLocal(proc, f)})
	}
	views := []sessionView{}
	proc.sessions.matching(func(s *session) bool {
		if v := s.view(); f.matches(v.sessionInfo) {
			views = append(views, v)
		}
		return false
	})
	sort.Slice(views, func(i, j int) bool { return views[i].Start.Before(views[j].Start) })
	return json.NewEncoder(w).Encode(views)
}

// handleClusterSessions serves /pop3/sessions?cluster=1: the sessions of
// every instance that shares the pop3 app's Redis. Without a redis block
// (or without a pop3 app) the process is the whole cluster and the answer
// is its own sessions, with the instance's name, so that a script works
// the same against one proxy or several.
func (a adminAPI) handleClusterSessions(w http.ResponseWriter, r *http.Request, f sessionFilter) error {
	proc := a.process()
	app := proc.cluster.Load()
	if app == nil {
		app = &App{Instance: hostname, proc: proc}
	}
	w.Header().Set("Content-Type", "application/json")
	if r.Method == http.MethodDelete {
		n, err := app.kickCluster(r.Context(), f)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("closing the cluster's sessions: %w; none was closed (without cluster=1 this instance's close)", err)}
		}
		return json.NewEncoder(w).Encode(map[string]int{"closed": n})
	}
	list, err := app.clusterSessions(r.Context(), f)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("listing the cluster's sessions: %w (without cluster=1 this instance's are listed)", err)}
	}
	if list == nil {
		list = []clusterSession{}
	}
	return json.NewEncoder(w).Encode(list)
}

// blockView is what the admin API shows of a block of the limits option.
type blockView struct {
	Zone    string    `json:"zone"`
	Limit   string    `json:"limit"`
	Address string    `json:"address,omitempty"`
	User    string    `json:"user,omitempty"`
	Until   time.Time `json:"until"`
}

// handleBlocks serves /pop3/blocks: GET lists the blocks that hold now in
// every zone; DELETE lifts those that match every filter given (address,
// user, limit, zone; at least one of the first three).
func (a adminAPI) handleBlocks(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	address, user, limit, zone := q.Get("address"), strings.ToLower(q.Get("user")), q.Get("limit"), q.Get("zone")
	_, zoneGiven := q["zone"]
	if address != "" {
		// An address names its own entry: an IPv6 address its prefix's.
		if ip, err := netip.ParseAddr(address); err == nil {
			address = ip.Unmap().String()
		}
	}
	if r.Method == http.MethodDelete && address == "" && user == "" && limit == "" {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("name the blocks to lift with address, user or limit")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodDelete {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	views, removed := []blockView{}, 0
	for _, z := range a.process().zones.all() {
		if zoneGiven && z.name != zone {
			continue
		}
		blocks, err := z.store.Blocks(r.Context(), now())
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
		for _, b := range blocks {
			v := blockView{Zone: z.name, Until: b.Until}
			v.Limit, v.Address, v.User = blockSubject(b.Key)
			if address != "" && !addressMatches(v.Address, address) || user != "" && v.User != user || limit != "" && v.Limit != limit {
				continue
			}
			if r.Method == http.MethodDelete {
				if err := z.unblock(r.Context(), b.Key); err != nil {
					return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
				}
				removed++
				z.unblocked(b.Key, "admin")
				continue
			}
			views = append(views, v)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if r.Method == http.MethodDelete {
		return json.NewEncoder(w).Encode(map[string]int{"removed": removed})
	}
	sort.Slice(views, func(i, j int) bool { return views[i].Until.Before(views[j].Until) })
	return json.NewEncoder(w).Encode(views)
}

// addressMatches reports whether a block's address (an IPv4 address or an
// IPv6 prefix) and the address or network the admin named overlap: the
// network holds the blocked address, or the blocked prefix holds the
// address.
func addressMatches(blocked, named string) bool {
	if blocked == named {
		return true
	}
	b, err1 := parsePrefix(blocked)
	n, err2 := parsePrefix(named)
	if err1 != nil || err2 != nil {
		return false
	}
	return n.Bits() <= b.Bits() && n.Contains(b.Addr()) || b.Bits() <= n.Bits() && b.Contains(n.Addr())
}

// Interface guards
var _ caddy.AdminRouter = adminAPI{}
