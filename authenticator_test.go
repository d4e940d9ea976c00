package pop3

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

func init() {
	caddy.RegisterModule(&tableAuthenticator{})
}

// tableAuthenticator is an Authenticator as a third party would write one:
// a module of the namespace that knows the users of its table.
type tableAuthenticator struct {
	Users map[string]tableUser `json:"users,omitempty"`
	// Upstream replaces "{upstream}" in every user's address.
	Upstream string `json:"upstream,omitempty"`

	calls atomic.Int64
}

type tableUser struct {
	Password   string `json:"password,omitempty"`
	Address    string `json:"address,omitempty"`
	AsUser     string `json:"as_user,omitempty"`
	AsPassword string `json:"as_password,omitempty"`
	Refuse     string `json:"refuse,omitempty"` // a response code
	Down       bool   `json:"down,omitempty"`   // cannot decide now
}

func (*tableAuthenticator) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.pop3.authenticators.test_table",
		New: func() caddy.Module { return new(tableAuthenticator) },
	}
}

func (a *tableAuthenticator) Authenticate(ctx context.Context, req AuthRequest) (AuthTarget, error) {
	a.calls.Add(1)
	u, ok := a.Users[req.User]
	switch {
	case !ok:
		return AuthTarget{}, ErrUnknownUser
	case u.Down:
		return AuthTarget{}, errors.New("directory unreachable")
	case u.Refuse != "":
		return AuthTarget{}, &Refusal{Code: u.Refuse, Text: "Not now"}
	case req.Method == AuthPlain && req.Password != u.Password:
		return AuthTarget{}, &Refusal{Code: codeAuth, Text: "Authentication failed"}
	}
	return AuthTarget{Address: strings.ReplaceAll(u.Address, "{upstream}", a.Upstream), User: u.AsUser, Password: u.AsPassword}, nil
}

// authenticatorsHandler provisions a handler whose authenticators list
// holds mods (JSON objects), as Caddy would from a config, with mod (if
// any) applied before setup.
func authenticatorsHandler(t *testing.T, upstream string, mod func(*Handler), mods ...any) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	h := &Handler{
		StartTLS:         StartTLSOff,
		Timeout:          caddy.Duration(5 * time.Second),
		AuthFailureDelay: caddy.Duration(time.Millisecond),
		proc:             newTestProcess(),
	}
	if upstream != "" {
		h.Upstream = []*Upstream{{Address: upstream}}
	}
	for _, m := range mods {
		raw, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		h.AuthenticatorsRaw = append(h.AuthenticatorsRaw, raw)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	core, logs := observer.New(zap.DebugLevel)
	h.logger = zap.New(core)
	// Provision's part that needs no running Caddy config.
	if err := h.loadAuthenticators(ctx); err != nil {
		t.Fatalf("loading authenticators: %v", err)
	}
	if mod != nil {
		mod(h)
	}
	if err := h.setup(); err != nil {
		t.Fatalf("setup: %v", err)
	}
	t.Cleanup(h.pool.release)
	return h, logs
}

// TestAuthenticatorChain: authenticators decide in order, the first that
// knows the user deciding; a user none knows fails like a wrong password
// (penalised, counted failed); a refusal keeps its code; an authenticator
// that cannot decide gets the client [SYS/TEMP]; the target's user and
// password are what the upstream sees, never the client's.
func TestAuthenticatorChain(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	first := map[string]any{"authenticator": "test_table", "upstream": addr, "users": map[string]tableUser{
		"carol": {Refuse: "IN-USE"},
		"dave":  {Down: true},
	}}
	second := map[string]any{"authenticator": "test_table", "upstream": addr, "users": map[string]tableUser{
		"bob":   {Password: "bob-pw", Address: "{upstream}", AsUser: "alice", AsPassword: "secret-pw"},
		"carol": {Password: "never-asked"},
	}}
	h, logs := authenticatorsHandler(t, "", nil, first, second)

	ts := startSession(t, h, logs, false)
	ts.send("USER bob", "PASS bob-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
	if lines := strings.Join(up.Lines(), "\n"); !strings.Contains(lines, "AUTH PLAIN "+b64("\x00alice\x00secret-pw")) {
		t.Errorf("upstream saw %q, want alice's login with the target's password", lines)
	}

	for _, tc := range []struct{ user, want, result string }{
		{"eve", "-ERR [AUTH] Authentication failed", "failed"},
		{"bob", "-ERR [AUTH] Authentication failed", "failed"}, // wrong password
		{"carol", "-ERR [IN-USE] Not now", "in_use"},
		{"dave", "-ERR [SYS/TEMP] Authentication service temporarily unavailable", "unavailable"},
	} {
		before := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", tc.result))
		ts := startSession(t, h, logs, false)
		ts.send("USER "+tc.user, "PASS wrong-pw")
		ts.expect("+OK")
		ts.expect(tc.want)
		ts.send("QUIT")
		ts.expect("+OK")
		ts.closed()
		if d := testutil.ToFloat64(h.proc.metrics.logins.WithLabelValues("plain", tc.result)) - before; d != 1 {
			t.Errorf("%s: logins_total{result=%s} +%v, want 1", tc.user, tc.result, d)
		}
	}
	ts.assertNoSecret("bob-pw", "wrong-pw", "secret-pw")
}

// TestAuthenticatorNeverForwardsDigests: a module that accepts an APOP or
// CRAM-MD5 login without naming upstream credentials cannot have the
// digest sent upstream as a password.
func TestAuthenticatorNeverForwardsDigests(t *testing.T) {
	t.Parallel()
	up, addr := fakeUpstream(t, nil)
	table := map[string]any{"authenticator": "test_table", "users": map[string]tableUser{"alice": {}}}
	h, logs := authenticatorsHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthAPOP} }, table)
	ts := startSession(t, h, logs, false)
	ts.send("APOP alice 0123456789abcdef0123456789abcdef")
	ts.expect("-ERR [SYS/TEMP]")
	ts.send("QUIT")
	ts.expect("+OK")
	for _, l := range up.Lines() {
		if strings.Contains(l, "0123456789abcdef") {
			t.Errorf("upstream got the digest: %q", l)
		}
	}
}

// TestHTTPAuthenticatorModule: the auth_http client as a module of the
// list decides as the auth_http option does, after a module that does not
// know the user.
func TestHTTPAuthenticatorModule(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	as := &pop3test.AuthServer{Users: map[string]pop3test.AuthUser{"alice": {Password: "secret-pw", Server: addr}}}
	url := as.Start(t)
	table := map[string]any{"authenticator": "test_table", "users": map[string]tableUser{}}
	httpAuth := map[string]any{"authenticator": "http", "url": url, "timeout": "2s"}
	h, logs := authenticatorsHandler(t, "", nil, table, httpAuth)
	ts := startSession(t, h, logs, false)
	ts.send("USER alice", "PASS secret-pw")
	ts.expect("+OK")
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK")
	ts.closed()
	if reqs := as.Requests(); len(reqs) != 1 {
		t.Errorf("auth server asked %d times, want 1", len(reqs))
	}
}

// TestAuthenticatorsValidate: a list that loads no authenticator is a
// provision error naming its index.
func TestAuthenticatorsValidate(t *testing.T) {
	t.Parallel()
	h := &Handler{AuthenticatorsRaw: []json.RawMessage{json.RawMessage(`{"authenticator":"no_such"}`)}, proc: newTestProcess()}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.loadAuthenticators(ctx); err == nil || !strings.Contains(err.Error(), "authenticators") {
		t.Errorf("provision: %v, want an error about authenticators", err)
	}
}
