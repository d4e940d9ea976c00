package pop3_test

import (
	"context"
	"testing"

	"github.com/caddyserver/caddy/v2"

	pop3 "github.com/caddy-pop3/caddy-pop3"
)

// The README's "Writing an authenticator" example, kept compiling and
// working from another package, with only the exported API.

func init() { caddy.RegisterModule(Static{}) }

// Static knows one user; a real module would ask LDAP or SQL here.
type Static struct {
	User     string `json:"user"`
	Password string `json:"password"`
	Upstream string `json:"upstream"`
}

func (Static) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "layer4.handlers.pop3.authenticators.static", New: func() caddy.Module { return new(Static) }}
}

func (s Static) Authenticate(ctx context.Context, req pop3.AuthRequest) (pop3.AuthTarget, error) {
	switch {
	case req.User != s.User:
		return pop3.AuthTarget{}, pop3.ErrUnknownUser // the next authenticator decides
	case req.Method != "plain" || req.Password != s.Password:
		return pop3.AuthTarget{}, &pop3.Refusal{Code: "AUTH", Text: "Authentication failed"}
	}
	return pop3.AuthTarget{Address: s.Upstream}, nil // the client's credentials go there
}

func TestReadmeAuthenticator(t *testing.T) {
	t.Parallel()
	var a pop3.Authenticator = Static{User: "alice", Password: "pw", Upstream: "10.0.0.1:110"}
	if got, err := a.Authenticate(context.Background(), pop3.AuthRequest{Method: "plain", User: "alice", Password: "pw"}); err != nil || got.Address != "10.0.0.1:110" {
		t.Errorf("alice: %+v, %v", got, err)
	}
	if _, err := a.Authenticate(context.Background(), pop3.AuthRequest{Method: "plain", User: "bob"}); err != pop3.ErrUnknownUser {
		t.Errorf("bob: %v", err)
	}
	if mod, err := caddy.GetModule("layer4.handlers.pop3.authenticators.static"); err != nil || mod.New() == nil {
		t.Errorf("module not registered: %v", err)
	}
}
