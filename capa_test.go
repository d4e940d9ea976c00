package pop3

import (
	"slices"
	"strings"
	"testing"
)

func TestCapabilities(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		mod      func(*Handler)
		secure   bool
		want     []string
		wantAuth []string
	}{
		{"starttls only before TLS", func(h *Handler) { h.StartTLS = StartTLSOnly }, false,
			[]string{"TOP", "UIDL", "STLS", "RESP-CODES", "AUTH-RESP-CODE"}, nil},
		{"starttls only after TLS", func(h *Handler) { h.StartTLS = StartTLSOnly }, true,
			[]string{"TOP", "USER", "UIDL", "SASL PLAIN LOGIN", "RESP-CODES", "AUTH-RESP-CODE"}, []string{"PLAIN", "LOGIN"}},
		{"starttls on", func(h *Handler) { h.StartTLS = StartTLSOn }, false,
			[]string{"TOP", "USER", "UIDL", "SASL PLAIN LOGIN", "STLS", "RESP-CODES", "AUTH-RESP-CODE"}, []string{"PLAIN", "LOGIN"}},
		{"starttls off", nil, false,
			[]string{"TOP", "USER", "UIDL", "SASL PLAIN LOGIN", "RESP-CODES", "AUTH-RESP-CODE"}, []string{"PLAIN", "LOGIN"}},
		{"configured capabilities", func(h *Handler) { h.Capabilities = []string{"TOP", "EXPIRE 30", "PIPELINING"} }, false,
			[]string{"TOP", "EXPIRE 30", "PIPELINING", "SASL PLAIN LOGIN", "RESP-CODES", "AUTH-RESP-CODE"}, []string{"PLAIN", "LOGIN"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := fakeUpstream(t, nil)
			h, logs := newTestHandler(t, addr, tc.mod)
			ts := startSession(t, h, logs, false)
			if tc.secure {
				ts.startTLS()
			}
			ts.send("CAPA")
			ts.expect("+OK")
			if got := ts.multiline(); !slices.Equal(got, tc.want) {
				t.Errorf("CAPA = %q, want %q", got, tc.want)
			}
			ts.send("AUTH")
			ts.expect("+OK")
			if got := ts.multiline(); !slices.Equal(got, tc.wantAuth) {
				t.Errorf("AUTH = %q, want %q", got, tc.wantAuth)
			}
		})
	}
}

func TestGreetingAndCaseInsensitivity(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, nil)
	ts := startSession(t, h, logs, false)
	ts.send("capa")
	ts.expect("+OK Capability")
	if got := ts.multiline(); !slices.Contains(got, "USER") {
		t.Errorf("lower-case capa: %q", got)
	}
	ts.send("NoOp")
	ts.expect("+OK")
	ts.send("quit")
	ts.expect("+OK")
	ts.closed()
}

func TestAPOPGreetingTimestamp(t *testing.T) {
	t.Parallel()
	ts := newAPOPTimestamp()
	if !strings.HasPrefix(ts, "<") || !strings.HasSuffix(ts, ">") || !strings.Contains(ts, "@") {
		t.Errorf("timestamp %q is not an RFC 1939 msg-id", ts)
	}
	if ts == newAPOPTimestamp() {
		t.Error("two timestamps are equal")
	}
}

func TestValidateRefusesBadCapabilities(t *testing.T) {
	t.Parallel()
	for _, c := range []string{"", " ", "TOP\r\nX", "STLS", "sasl PLAIN"} {
		h := &Handler{Upstream: []*Upstream{{Address: "127.0.0.1:110"}}, Capabilities: []string{c}}
		if err := h.setup(); err == nil || !strings.Contains(err.Error(), "capabilities") {
			t.Errorf("capability %q: got %v", c, err)
		}
	}
}

func TestValidateAuthMethods(t *testing.T) {
	t.Parallel()
	one := []*Upstream{{Address: "127.0.0.1:110"}}
	two := []*Upstream{{Address: "127.0.0.1:110"}, {Address: "127.0.0.2:110"}}
	auth := &AuthHTTP{URL: "http://127.0.0.1:9000/auth"}
	tests := []struct {
		name     string
		h        Handler
		wantErr  string
		relaying bool
	}{
		{"external needs auth_http", Handler{Upstream: one, Auth: []string{AuthExternal}}, `"external" needs auth_http`, false},
		{"oauthbearer needs auth_http", Handler{Upstream: one, Auth: []string{AuthOAuthBearer}}, `"oauthbearer" needs auth_http`, false},
		{"apop relays with one upstream", Handler{Upstream: one, Auth: []string{AuthPlain, AuthAPOP}}, "", true},
		{"cram-md5 relays with one upstream", Handler{Upstream: one, Auth: []string{AuthCRAMMD5}}, "", true},
		{"apop with user_hash over two upstreams", Handler{Upstream: two, Auth: []string{AuthAPOP}}, "set lb_policy", false},
		{"apop with round_robin over two upstreams", Handler{Upstream: two, Auth: []string{AuthAPOP}, LBPolicy: PolicyRoundRobin}, "", true},
		{"apop with a {pop3.domain} upstream", Handler{Upstream: []*Upstream{{Address: "pop.{pop3.domain}"}}, Auth: []string{AuthAPOP}}, "known only at login", false},
		{"apop via auth_http, no upstream", Handler{AuthHTTP: auth, Auth: []string{AuthAPOP, AuthExternal, AuthXOAuth2}}, "", false},
		{"no upstream, no auth_http", Handler{}, "at least one upstream", false},
		{"bad auth_http url", Handler{AuthHTTP: &AuthHTTP{URL: "ftp://x/"}}, "auth_http", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h
			err := h.setup()
			if tc.wantErr == "" {
				if err != nil || h.relayChallenges != tc.relaying {
					t.Fatalf("setup: %v, relayChallenges %v", err, h.relayChallenges)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want %q", err, tc.wantErr)
			}
		})
	}
}
