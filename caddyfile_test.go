package pop3

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	up := func(addrs ...string) []*Upstream {
		var us []*Upstream
		for _, a := range addrs {
			us = append(us, &Upstream{Address: a})
		}
		return us
	}
	cases := []struct {
		name  string
		input string
		want  Handler
	}{
		{
			name:  "same-line upstream",
			input: "pop3 mail.internal:110",
			want:  Handler{Upstream: up("mail.internal:110")},
		},
		{
			name:  "same-line upstreams kept as given",
			input: "pop3 mail.internal 10.0.0.2:1110 [::1]:110",
			want:  Handler{Upstream: up("mail.internal", "10.0.0.2:1110", "[::1]:110")},
		},
		{
			name:  "upstream repeatable and mixed with same-line",
			input: "pop3 a:110 {\n\tupstream b:110\n\tupstream c\n}",
			want:  Handler{Upstream: up("a:110", "b:110", "c")},
		},
		{
			name:  "auth",
			input: "pop3 a {\n\tauth plain apop CRAM-MD5 external\n}",
			want:  Handler{Upstream: up("a"), Auth: []string{AuthPlain, AuthAPOP, AuthCRAMMD5, AuthExternal}},
		},
		{
			name:  "auth_http",
			input: "pop3 {\n\tauth plain oauthbearer xoauth2\n\tauth_http http://127.0.0.1:9000/auth {\n\t\theader X-Auth-Key {env.KEY}\n\t\theader X-Site mail\n\t\ttimeout 5s\n\t\tpass_client_cert on\n\t}\n\tauth_failure_delay 2s\n}",
			want: Handler{
				Auth: []string{AuthPlain, AuthOAuthBearer, AuthXOAuth2},
				AuthHTTP: &AuthHTTP{
					URL:            "http://127.0.0.1:9000/auth",
					Header:         map[string]string{"X-Auth-Key": "{env.KEY}", "X-Site": "mail"},
					Timeout:        caddy.Duration(5 * time.Second),
					PassClientCert: true,
				},
				AuthFailureDelay: caddy.Duration(2 * time.Second),
			},
		},
		{
			name: "auth_http tls",
			input: `pop3 {
	auth_http https://auth.example:8443/auth {
		tls_trust_pool file /etc/ssl/auth-ca.pem
		tls_client_auth /c.pem /k.pem
		tls_server_name auth.internal
		tls_insecure_skip_verify
	}
}`,
			want: Handler{AuthHTTP: &AuthHTTP{
				URL: "https://auth.example:8443/auth",
				TLS: &reverseproxy.TLSConfig{
					CARaw:                    json.RawMessage(`{"pem_files":["/etc/ssl/auth-ca.pem"],"provider":"file"}`),
					ClientCertificateFile:    "/c.pem",
					ClientCertificateKeyFile: "/k.pem",
					ServerName:               "auth.internal",
					InsecureSkipVerify:       true,
				},
			}},
		},
		{
			name:  "auth_http resolve_auth_server",
			input: "pop3 {\n\tauth_http http://a/ {\n\t\tresolve_auth_server on\n\t}\n}",
			want:  Handler{AuthHTTP: &AuthHTTP{URL: "http://a/", ResolveAuthServer: true}},
		},
		{
			name:  "auth_http failover",
			input: "pop3 {\n\tauth_http http://10.0.0.1/auth http://10.0.0.2/auth https://auth.example/auth\n}",
			want:  Handler{AuthHTTP: &AuthHTTP{URL: "http://10.0.0.1/auth", URLs: []string{"http://10.0.0.2/auth", "https://auth.example/auth"}}},
		},
		{
			name:  "auth_http tls_client_auth automate",
			input: "pop3 {\n\tauth_http https://a/ {\n\t\ttls_client_auth proxy.example.com\n\t}\n}",
			want:  Handler{AuthHTTP: &AuthHTTP{URL: "https://a/", TLS: &reverseproxy.TLSConfig{ClientCertificateAutomate: "proxy.example.com"}}},
		},
		{
			name:  "auth_http without block, with upstream",
			input: "pop3 a {\n\tauth_http http://auth/\n}",
			want:  Handler{Upstream: up("a"), AuthHTTP: &AuthHTTP{URL: "http://auth/"}},
		},
		{
			name: "upstream pool",
			input: `pop3 {
	upstream 10.0.0.1:995 {
		tls
		tls_server_name pop.example.com
		tls_client_auth /c.pem /k.pem
		max_connections 100
		weight 3
	}
	upstream 10.0.0.2 {
		starttls
		tls_insecure_skip_verify
	}
	upstream pop.{pop3.domain}:110
	lb_policy round_robin
	lb_try_duration 3s
	health_interval 10s
	health_timeout 2s
	health_passes 2
	health_fails 3
	fail_duration 30s
	max_fails 4
	dial_timeout 4s
	proxy_protocol v2
	xclient on
	drain_timeout 30s
}`,
			want: Handler{
				Upstream: []*Upstream{
					{Address: "10.0.0.1:995", TLS: &reverseproxy.TLSConfig{ServerName: "pop.example.com", ClientCertificateFile: "/c.pem", ClientCertificateKeyFile: "/k.pem"}, MaxConnections: 100, Weight: 3},
					{Address: "10.0.0.2", TLS: &reverseproxy.TLSConfig{InsecureSkipVerify: true}, StartTLS: true},
					{Address: "pop.{pop3.domain}:110"},
				},
				LBPolicy:       PolicyRoundRobin,
				LBTryDuration:  caddy.Duration(3 * time.Second),
				HealthInterval: caddy.Duration(10 * time.Second),
				HealthTimeout:  caddy.Duration(2 * time.Second),
				HealthPasses:   2,
				HealthFails:    3,
				FailDuration:   caddy.Duration(30 * time.Second),
				MaxFails:       4,
				DialTimeout:    caddy.Duration(4 * time.Second),
				ProxyProtocol:  "v2",
				XClient:        true,
				DrainTimeout:   caddy.Duration(30 * time.Second),
			},
		},
		{
			name:  "capabilities",
			input: "pop3 a {\n\tcapabilities TOP UIDL \"EXPIRE 30\"\n}",
			want:  Handler{Upstream: up("a"), Capabilities: []string{"TOP", "UIDL", "EXPIRE 30"}},
		},
		{
			name:  "starttls off",
			input: "pop3 a {\n\tstarttls off\n}",
			want:  Handler{Upstream: up("a"), StartTLS: StartTLSOff},
		},
		{
			name:  "starttls on",
			input: "pop3 a {\n\tstarttls on\n}",
			want:  Handler{Upstream: up("a"), StartTLS: StartTLSOn},
		},
		{
			name:  "starttls only",
			input: "pop3 a {\n\tstarttls only\n}",
			want:  Handler{Upstream: up("a"), StartTLS: StartTLSOnly},
		},
		{
			name:  "implicit_tls",
			input: "pop3 a {\n\timplicit_tls\n\tconnection_policy {\n\t\tdefault_sni mail.example.com\n\t}\n}",
			want: Handler{
				Upstream:         up("a"),
				ImplicitTLS:      true,
				ConnectionPolicy: caddytls.ConnectionPolicies{{DefaultSNI: "mail.example.com"}},
			},
		},
		{
			name:  "connection_policy",
			input: "pop3 a {\n\tconnection_policy {\n\t\talpn pop3\n\t\tdefault_sni mail.example.com\n\t}\n\tgreeting hi\n}",
			want: Handler{
				Upstream:         up("a"),
				ConnectionPolicy: caddytls.ConnectionPolicies{{ALPN: []string{"pop3"}, DefaultSNI: "mail.example.com"}},
				Greeting:         "hi",
			},
		},
		{
			name:  "connection_policy repeatable",
			input: "pop3 a {\n\tconnection_policy {\n\t\tdefault_sni one.example.com\n\t}\n\tconnection_policy {\n\t\tdefault_sni two.example.com\n\t}\n}",
			want: Handler{
				Upstream: up("a"),
				ConnectionPolicy: caddytls.ConnectionPolicies{
					{DefaultSNI: "one.example.com"},
					{DefaultSNI: "two.example.com"},
				},
			},
		},
		{
			name:  "greeting",
			input: "pop3 a {\n\tgreeting \"Mail proxy ready\"\n}",
			want:  Handler{Upstream: up("a"), Greeting: "Mail proxy ready"},
		},
		{
			name:  "timeout",
			input: "pop3 a {\n\ttimeout 30s\n}",
			want:  Handler{Upstream: up("a"), Timeout: caddy.Duration(30 * time.Second)},
		},
		{
			name:  "login_timeout",
			input: "pop3 a {\n\tlogin_timeout 2m\n}",
			want:  Handler{Upstream: up("a"), LoginTimeout: caddy.Duration(2 * time.Minute)},
		},
		{
			name:  "proxy_timeout in days",
			input: "pop3 a {\n\tproxy_timeout 1d\n}",
			want:  Handler{Upstream: up("a"), ProxyTimeout: caddy.Duration(24 * time.Hour)},
		},
		{
			name:  "pass_error_message on",
			input: "pop3 a {\n\tpass_error_message on\n}",
			want:  Handler{Upstream: up("a"), PassErrorMessage: true},
		},
		{
			name:  "pass_error_message off",
			input: "pop3 a {\n\tpass_error_message off\n}",
			want:  Handler{Upstream: up("a"), PassErrorMessage: false},
		},
		{
			name:  "max_errors",
			input: "pop3 a {\n\tmax_errors 3\n}",
			want:  Handler{Upstream: up("a"), MaxErrors: 3},
		},
		{
			name:  "max_errors 1",
			input: "pop3 a {\n\tmax_errors 1\n}",
			want:  Handler{Upstream: up("a"), MaxErrors: 1},
		},
		{
			name:  "max_line_length lower bound",
			input: "pop3 a {\n\tmax_line_length 512\n}",
			want:  Handler{Upstream: up("a"), MaxLineLength: 512},
		},
		{
			name:  "max_command_length lower bound",
			input: "pop3 a {\n\tmax_command_length 255\n}",
			want:  Handler{Upstream: up("a"), MaxCommandLength: 255},
		},
		{
			name:  "max_command_length",
			input: "pop3 a {\n\tmax_command_length 4096\n\tmax_line_length 4096\n}",
			want:  Handler{Upstream: up("a"), MaxCommandLength: 4096, MaxLineLength: 4096},
		},
		{
			name:  "max_line_length upper bound",
			input: "pop3 a {\n\tmax_line_length 1048576\n}",
			want:  Handler{Upstream: up("a"), MaxLineLength: 1048576},
		},
		{
			name: "all options",
			input: `pop3 {
				upstream mail.internal:110
				auth plain
				capabilities TOP USER UIDL "EXPIRE 30"
				starttls on
				connection_policy {
					alpn pop3
				}
				greeting "POP3 proxy ready"
				timeout 45s
				proxy_timeout 30m
				pass_error_message on
				max_errors 10
				max_line_length 4096
			}`,
			want: Handler{
				Upstream:         up("mail.internal:110"),
				Auth:             []string{AuthPlain},
				Capabilities:     []string{"TOP", "USER", "UIDL", "EXPIRE 30"},
				StartTLS:         StartTLSOn,
				ConnectionPolicy: caddytls.ConnectionPolicies{{ALPN: []string{"pop3"}}},
				Greeting:         "POP3 proxy ready",
				Timeout:          caddy.Duration(45 * time.Second),
				ProxyTimeout:     caddy.Duration(30 * time.Minute),
				PassErrorMessage: true,
				MaxErrors:        10,
				MaxLineLength:    4096,
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(h, tc.want) {
				t.Errorf("got  %+v\nwant %+v", h, tc.want)
			}
		})
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	cases := []struct {
		name  string
		input string
		want  []string // substrings of the error message
	}{
		// general
		{"unknown option", "pop3 a {\n\tfoo bar\n}", []string{"unrecognized pop3 option 'foo'"}},
		{"no upstream", "pop3", []string{"upstream", "at least one upstream"}},
		{"no upstream in block", "pop3 {\n\ttimeout 5s\n}", []string{"at least one upstream", "Testfile:1"}},
		{"nested block", "pop3 a {\n\ttimeout 5s {\n\t\tfoo\n\t}\n}", []string{"malformed pop3 option 'timeout'"}},

		// authenticators
		{"unknown authenticator", "pop3 a {\n\tauthenticator nosuch\n}", []string{"nosuch"}},
		{"authenticator without module", "pop3 a {\n\tauthenticator\n}", []string{"wrong argument count"}},
		{"passwd_file without path", "pop3 a {\n\tpasswd_file\n}", []string{"wrong argument count"}},
		{"passwd_file unknown option", "pop3 a {\n\tpasswd_file /x {\n\t\tfoo bar\n\t}\n}", []string{"unrecognized passwd_file option 'foo'"}},
		{"master_login one argument", "pop3 a {\n\tmaster_login m\n}", []string{"wrong argument count"}},
		{"master_login twice", "pop3 a {\n\tmaster_login m p\n\tmaster_login m p\n}", []string{"duplicate pop3 option 'master_login'"}},
		{"master_login unknown option", "pop3 a {\n\tmaster_login m p {\n\t\tfoo\n\t}\n}", []string{"unrecognized pop3 option 'master_login foo'"}},

		// auth_http
		{"auth_http without url", "pop3 {\n\tauth_http\n}", []string{"'auth_http'"}},
		{"auth_http twice", "pop3 {\n\tauth_http http://a/\n\tauth_http http://b/\n}", []string{"duplicate pop3 option 'auth_http'"}},
		{"auth_http unknown sub-option", "pop3 {\n\tauth_http http://a/ {\n\t\tfoo\n\t}\n}", []string{"unrecognized pop3 option 'auth_http foo'"}},
		{"auth_http bad timeout", "pop3 {\n\tauth_http http://a/ {\n\t\ttimeout soon\n\t}\n}", []string{"'auth_http timeout'"}},
		{"auth_http header twice", "pop3 {\n\tauth_http http://a/ {\n\t\theader X-A 1\n\t\theader X-A 2\n\t}\n}", []string{"option 'auth_http'", "'X-A' set twice"}},
		{"auth_http header without value", "pop3 {\n\tauth_http http://a/ {\n\t\theader X-A\n\t}\n}", []string{"'header'"}},
		{"auth_http tls_server_name twice", "pop3 {\n\tauth_http https://a/ {\n\t\ttls_server_name x\n\t\ttls_server_name y\n\t}\n}", []string{"duplicate pop3 option 'auth_http tls_server_name'"}},
		{"auth_http tls_client_auth three args", "pop3 {\n\tauth_http https://a/ {\n\t\ttls_client_auth a b c\n\t}\n}", []string{"wrong argument count"}},
		{"auth_http tls_trust_pool without module", "pop3 {\n\tauth_http https://a/ {\n\t\ttls_trust_pool\n\t}\n}", []string{"wrong argument count"}},
		{"auth_http tls_insecure_skip_verify with arg", "pop3 {\n\tauth_http https://a/ {\n\t\ttls_insecure_skip_verify on\n\t}\n}", []string{"wrong argument count"}},
		{"auth_http bad resolve_auth_server", "pop3 {\n\tauth_http http://a/ {\n\t\tresolve_auth_server yes\n\t}\n}", []string{"'auth_http resolve_auth_server'", "'yes'"}},
		{"auth_http resolve_auth_server twice", "pop3 {\n\tauth_http http://a/ {\n\t\tresolve_auth_server on\n\t\tresolve_auth_server off\n\t}\n}", []string{"duplicate pop3 option 'auth_http resolve_auth_server'"}},
		{"auth_http bad pass_client_cert", "pop3 {\n\tauth_http http://a/ {\n\t\tpass_client_cert yes\n\t}\n}", []string{"'auth_http pass_client_cert'", "'yes'"}},
		{"auth_failure_delay bad", "pop3 a {\n\tauth_failure_delay x\n}", []string{"'auth_failure_delay'"}},
		{"auth_failure_delay twice", "pop3 a {\n\tauth_failure_delay 1s\n\tauth_failure_delay 2s\n}", []string{"duplicate pop3 option 'auth_failure_delay'"}},

		// pool
		{"bad lb_policy", "pop3 a {\n\tlb_policy hash\n}", []string{"option 'lb_policy'", "unknown policy 'hash'"}},
		{"lb_policy twice", "pop3 a {\n\tlb_policy first\n\tlb_policy first\n}", []string{"duplicate pop3 option 'lb_policy'"}},
		{"bad health_interval", "pop3 a {\n\thealth_interval often\n}", []string{"'health_interval'"}},
		{"max_fails 0", "pop3 a {\n\tmax_fails 0\n}", []string{"'max_fails'", "at least 1"}},
		{"bad proxy_protocol", "pop3 a {\n\tproxy_protocol v3\n}", []string{"'proxy_protocol'", "'v3'"}},
		{"bad drain_timeout", "pop3 a {\n\tdrain_timeout never\n}", []string{"'drain_timeout'"}},
		{"bad xclient", "pop3 a {\n\txclient yes\n}", []string{"'xclient'", "'yes'"}},
		{"upstream unknown sub-option", "pop3 {\n\tupstream a {\n\t\tssl\n\t}\n}", []string{"unrecognized pop3 option 'upstream ssl'"}},
		{"upstream tls twice", "pop3 {\n\tupstream a {\n\t\ttls\n\t\ttls\n\t}\n}", []string{"duplicate pop3 option 'upstream tls'"}},
		{"upstream weight 0", "pop3 {\n\tupstream a {\n\t\tweight 0\n\t}\n}", []string{"'upstream weight'"}},
		{"upstream tls_client_auth three args", "pop3 {\n\tupstream a {\n\t\ttls_client_auth a b c\n\t}\n}", []string{"'tls_client_auth'"}},

		// upstream
		{"upstream without address", "pop3 {\n\tupstream\n}", []string{"'upstream'"}},
		{"upstream with two addresses", "pop3 {\n\tupstream a b\n}", []string{"'upstream'"}},
		{"upstream empty", "pop3 {\n\tupstream \"\"\n}", []string{"option 'upstream'", "empty"}},
		{"same-line upstream empty", "pop3 \"\"", []string{"option 'upstream'", "empty"}},

		// auth
		{"auth without methods", "pop3 a {\n\tauth\n}", []string{"'auth'"}},
		{"auth unknown method", "pop3 a {\n\tauth plain digest-md5\n}", []string{"option 'auth'", "unknown method 'digest-md5'"}},
		{"auth method twice", "pop3 a {\n\tauth plain PLAIN\n}", []string{"option 'auth'", "'plain' listed twice"}},
		{"auth duplicate", "pop3 a {\n\tauth plain\n\tauth apop\n}", []string{"duplicate pop3 option 'auth'"}},

		// capabilities
		{"capabilities without args", "pop3 a {\n\tcapabilities\n}", []string{"'capabilities'"}},
		{"capabilities blank", "pop3 a {\n\tcapabilities TOP \" \"\n}", []string{"option 'capabilities'", "invalid extension"}},
		{"capabilities multi-line", "pop3 a {\n\tcapabilities \"TOP\nUIDL\"\n}", []string{"option 'capabilities'", "invalid extension"}},
		{"capabilities duplicate", "pop3 a {\n\tcapabilities TOP\n\tcapabilities UIDL\n}", []string{"duplicate pop3 option 'capabilities'"}},

		// starttls
		{"starttls without arg", "pop3 a {\n\tstarttls\n}", []string{"'starttls'"}},
		{"starttls two args", "pop3 a {\n\tstarttls on only\n}", []string{"'starttls'"}},
		{"starttls bad value", "pop3 a {\n\tstarttls yes\n}", []string{"option 'starttls'", "unknown policy 'yes'"}},
		{"starttls duplicate", "pop3 a {\n\tstarttls on\n\tstarttls off\n}", []string{"duplicate pop3 option 'starttls'"}},
		// implicit_tls
		{"implicit_tls with arg", "pop3 a {\n\timplicit_tls on\n}", []string{"after 'implicit_tls'"}},
		{"implicit_tls duplicate", "pop3 a {\n\timplicit_tls\n\timplicit_tls\n}", []string{"duplicate pop3 option 'implicit_tls'"}},
		{"implicit_tls block", "pop3 a {\n\timplicit_tls {\n\t\tfoo\n\t}\n}", []string{"option 'implicit_tls': blocks are not supported"}},

		// connection_policy
		{"connection_policy same-line arg", "pop3 a {\n\tconnection_policy x {\n\t}\n}", []string{"'connection_policy'"}},
		{"connection_policy bad option", "pop3 a {\n\tconnection_policy {\n\t\tbogus\n\t}\n}", []string{"bogus"}},

		// greeting
		{"greeting without arg", "pop3 a {\n\tgreeting\n}", []string{"'greeting'"}},
		{"greeting unquoted words", "pop3 a {\n\tgreeting hello there\n}", []string{"'greeting'"}},
		{"greeting empty", "pop3 a {\n\tgreeting \"\"\n}", []string{"option 'greeting'", "empty"}},
		{"greeting multi-line", "pop3 a {\n\tgreeting \"hello\nthere\"\n}", []string{"option 'greeting'", "single line"}},
		{"greeting duplicate", "pop3 a {\n\tgreeting a\n\tgreeting b\n}", []string{"duplicate pop3 option 'greeting'"}},

		// timeout
		{"timeout without arg", "pop3 a {\n\ttimeout\n}", []string{"'timeout'"}},
		{"timeout bad duration", "pop3 a {\n\ttimeout soon\n}", []string{"option 'timeout' duration"}},
		{"timeout zero", "pop3 a {\n\ttimeout 0s\n}", []string{"option 'timeout' duration", "greater than zero"}},
		{"timeout negative", "pop3 a {\n\ttimeout -5s\n}", []string{"option 'timeout' duration", "greater than zero"}},
		{"timeout duplicate", "pop3 a {\n\ttimeout 1s\n\ttimeout 2s\n}", []string{"duplicate pop3 option 'timeout'"}},

		// login_timeout
		{"login_timeout without arg", "pop3 a {\n\tlogin_timeout\n}", []string{"'login_timeout'"}},
		{"login_timeout zero", "pop3 a {\n\tlogin_timeout 0s\n}", []string{"option 'login_timeout' duration", "greater than zero"}},
		{"login_timeout duplicate", "pop3 a {\n\tlogin_timeout 1m\n\tlogin_timeout 2m\n}", []string{"duplicate pop3 option 'login_timeout'"}},

		// proxy_timeout
		{"proxy_timeout without arg", "pop3 a {\n\tproxy_timeout\n}", []string{"'proxy_timeout'"}},
		{"proxy_timeout bad duration", "pop3 a {\n\tproxy_timeout 10x\n}", []string{"option 'proxy_timeout' duration"}},
		{"proxy_timeout duplicate", "pop3 a {\n\tproxy_timeout 1m\n\tproxy_timeout 2m\n}", []string{"duplicate pop3 option 'proxy_timeout'"}},

		// pass_error_message
		{"pass_error_message without arg", "pop3 a {\n\tpass_error_message\n}", []string{"'pass_error_message'"}},
		{"pass_error_message bad bool", "pop3 a {\n\tpass_error_message yes\n}", []string{"option 'pass_error_message'", "unknown value 'yes'"}},
		{"pass_error_message true", "pop3 a {\n\tpass_error_message true\n}", []string{"option 'pass_error_message'"}},
		{"pass_error_message duplicate", "pop3 a {\n\tpass_error_message on\n\tpass_error_message off\n}", []string{"duplicate pop3 option 'pass_error_message'"}},

		// max_errors
		{"max_errors without arg", "pop3 a {\n\tmax_errors\n}", []string{"'max_errors'"}},
		{"max_errors not a number", "pop3 a {\n\tmax_errors many\n}", []string{"option 'max_errors'"}},
		{"max_errors zero", "pop3 a {\n\tmax_errors 0\n}", []string{"option 'max_errors'", "must be at least 1"}},
		{"max_errors negative", "pop3 a {\n\tmax_errors -1\n}", []string{"option 'max_errors'", "must be at least 1"}},
		{"max_errors duplicate", "pop3 a {\n\tmax_errors 1\n\tmax_errors 2\n}", []string{"duplicate pop3 option 'max_errors'"}},

		// max_line_length
		{"max_line_length without arg", "pop3 a {\n\tmax_line_length\n}", []string{"'max_line_length'"}},
		{"max_line_length not a number", "pop3 a {\n\tmax_line_length 16k\n}", []string{"option 'max_line_length'"}},
		{"max_line_length too small", "pop3 a {\n\tmax_line_length 511\n}", []string{"option 'max_line_length'", "between 512 and 1048576"}},
		{"max_line_length too large", "pop3 a {\n\tmax_line_length 1048577\n}", []string{"option 'max_line_length'", "between 512 and 1048576"}},
		{"max_line_length duplicate", "pop3 a {\n\tmax_line_length 1024\n\tmax_line_length 2048\n}", []string{"duplicate pop3 option 'max_line_length'"}},

		// max_command_length
		{"max_command_length without arg", "pop3 a {\n\tmax_command_length\n}", []string{"'max_command_length'"}},
		{"max_command_length not a number", "pop3 a {\n\tmax_command_length 1k\n}", []string{"option 'max_command_length'"}},
		{"max_command_length too small", "pop3 a {\n\tmax_command_length 254\n}", []string{"option 'max_command_length'", "between 255 and 1048576"}},
		{"max_command_length too large", "pop3 a {\n\tmax_command_length 1048577\n}", []string{"option 'max_command_length'", "between 255 and 1048576"}},
		{"max_command_length duplicate", "pop3 a {\n\tmax_command_length 300\n\tmax_command_length 400\n}", []string{"duplicate pop3 option 'max_command_length'"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("UnmarshalCaddyfile(%q) = nil, want an error", tc.input)
			}
			for _, s := range tc.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
			// Every error carries the Caddyfile position.
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Errorf("error %q has no file:line", err)
			}
		})
	}
}
