package pop3

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// processState is what every pop3 handler of the process shares and what
// outlives a config reload: the live sessions (for the admin API and
// draining), the session slots, the login penalty, upstream state by
// address, the upstreams' CAPA answers, the metrics and the events in
// flight. Handlers use theProcess; a test gives its handler a fresh one
// (newProcessState), so that tests that do not share a Caddy config do not
// share counts either and may run in parallel.
type processState struct {
	sessions  *sessionRegistry
	slots     *slotCounter
	penalties *penaltyTable
	peers     *caddy.UsagePool // *peer by upstream address, as caddy-l4's proxy keeps its hosts
	capas     *capaCache
	metrics   *pop3Metrics
	events    *eventQueue
	zones     *zones // the limits option's state by zone name
	// cluster is the running config's pop3 app, which shares the sessions
	// with other instances; nil: none. token tells this process's kick
	// messages from other instances'.
	cluster atomic.Pointer[App]
	token   string
	// lookupHost resolves configured upstream host names for auth_http's
	// named upstreams.
	lookupHost func(ctx context.Context, network, host string) ([]netip.Addr, error)
}

func newProcessState() *processState {
	return &processState{
		sessions:   &sessionRegistry{m: make(map[string]*session)},
		slots:      new(slotCounter),
		penalties:  newPenaltyTable(),
		peers:      caddy.NewUsagePool(),
		capas:      &capaCache{m: make(map[capaKey]capaEntry)},
		metrics:    newPOP3Metrics(),
		events:     newEventQueue(),
		zones:      new(zones),
		token:      newSessionID(),
		lookupHost: net.DefaultResolver.LookupNetIP,
	}
}

// theProcess is the state of the process's handlers, the admin API's and
// the metrics registered with Caddy.
var theProcess = newProcessState()
