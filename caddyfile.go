package pop3

import (
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

// Bounds of the integer options, checked when the Caddyfile is adapted.
const (
	minMaxLineLength = 512
	maxMaxLineLength = 1 << 20
)

// UnmarshalCaddyfile sets up the Handler from Caddyfile tokens. Syntax:
//
//	pop3 [<upstreams...>] {
//		# multiple upstream options are supported
//		upstream <address>
//
//		auth <plain|apop|cram-md5|external|oauthbearer|xoauth2...>
//		auth_http <url> [<url>...] {  # more URLs: failover, in order
//			header <name> <value>     # repeatable
//			timeout <duration>
//			pass_client_cert <on|off>
//			tls_trust_pool <module> ...   # for https:// URLs, as upstream's
//			tls_client_auth <cert> <key> | <automate_name>
//			tls_server_name <name>
//			tls_insecure_skip_verify
//			resolve_auth_server <on|off>  # a host name in Auth-Server; default off
//		}
//		passwd_file <path> {         # repeatable: Dovecot passwd-file users
//			default_domain <domain>
//		}
//		authenticator <module> ...   # repeatable: any authenticator module, e.g. http <url> { ... }
//		master_login <user> <password> {
//			separator <sep>       # USER <user><sep><master> instead of AUTH PLAIN
//		}
//		auth_cache {
//			ttl <duration>            # default 5m
//			negative_ttl <duration>   # default 1m
//			size <n>                  # default 10000
//		}
//		auth_failure_delay <duration>
//		limits [<zone>] {            # handlers naming the same zone share counters
//			sessions_per_ip <n>
//			sessions_per_user <n>
//			sessions_per_user_ip <n>
//			connections_per_ip <n> <window>
//			failures_per_user_ip <n> <window> <block>
//			failures_per_ip <n> <window> <block>
//			failures_per_user <n> <window> <block>
//			ipv6_prefix <bits>          # default 64
//			exempt <cidr>...
//			min_input_rate <bytes> <window>
//			max_session_lifetime <duration>
//		}
//		drain_timeout <duration>
//		capabilities <extensions...>
//		starttls <off|on|only>
//		implicit_tls
//
//		# multiple connection_policy options are supported
//		connection_policy {
//			...
//		}
//
//		greeting <text>
//		timeout <duration>
//		login_timeout <duration>
//		proxy_timeout <duration>
//		pass_error_message <on|off>
//		max_errors <int>
//		max_line_length <bytes>
//		max_command_length <bytes>
//	}
//
// Each capabilities argument is one CAPA line; quote it when it holds a
// space, e.g. "EXPIRE 30". connection_policy takes the same options as the
// tls handler's connection_policy.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	_, wrapper := d.Next(), d.Val() // consume wrapper name

	// Treat all same-line options as upstream addresses
	for d.NextArg() {
		if err := h.addUpstream(d, wrapper, "upstream"); err != nil {
			return err
		}
	}

	seen := map[string]bool{} // options that may be given once
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		optionName := d.Val()
		if !slices.Contains([]string{"upstream", "connection_policy", "authenticator", "passwd_file"}, optionName) {
			if seen[optionName] {
				return d.Errf("duplicate %s option '%s'", wrapper, optionName)
			}
			seen[optionName] = true
		}
		switch optionName {
		case "upstream":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg() // consume option value
			if err := h.addUpstream(d, wrapper, optionName); err != nil {
				return err
			}
			if err := h.Upstream[len(h.Upstream)-1].unmarshalCaddyfile(d, wrapper); err != nil {
				return err
			}
			continue // its block is consumed
		case "lb_policy":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			if !slices.Contains(knownPolicies, d.Val()) {
				return d.Errf("parsing %s option '%s': unknown policy '%s' (want %s)", wrapper, optionName, d.Val(), strings.Join(knownPolicies, ", "))
			}
			h.LBPolicy = d.Val()
		case "lb_try_duration", "health_interval", "health_timeout", "fail_duration", "dial_timeout", "drain_timeout":
			dur, err := parsePositiveDuration(d, wrapper, optionName)
			if err != nil {
				return err
			}
			*map[string]*caddy.Duration{
				"lb_try_duration": &h.LBTryDuration, "health_interval": &h.HealthInterval,
				"health_timeout": &h.HealthTimeout, "fail_duration": &h.FailDuration, "dial_timeout": &h.DialTimeout,
				"drain_timeout": &h.DrainTimeout,
			}[optionName] = dur
		case "health_passes", "health_fails", "max_fails":
			val, err := parseIntInRange(d, wrapper, optionName, 1, math.MaxInt32)
			if err != nil {
				return err
			}
			*map[string]*int{"health_passes": &h.HealthPasses, "health_fails": &h.HealthFails, "max_fails": &h.MaxFails}[optionName] = val
		case "proxy_protocol":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			if v := d.Val(); v != "v1" && v != "v2" {
				return d.Errf("parsing %s option '%s': unknown version '%s' (want v1 or v2)", wrapper, optionName, v)
			}
			h.ProxyProtocol = d.Val()
		case "xclient":
			on, err := parseOnOff(d, wrapper, optionName)
			if err != nil {
				return err
			}
			h.XClient = on
		case "auth":
			if d.CountRemainingArgs() == 0 {
				return d.ArgErr()
			}
			for d.NextArg() {
				method := strings.ToLower(d.Val())
				if !isKnownAuthMethod(method) {
					return d.Errf("parsing %s option '%s': unknown method '%s' (want %s)",
						wrapper, optionName, d.Val(), strings.Join(knownAuthMethods, ", "))
				}
				for _, m := range h.Auth {
					if m == method {
						return d.Errf("parsing %s option '%s': method '%s' listed twice", wrapper, optionName, method)
					}
				}
				h.Auth = append(h.Auth, method)
			}
		case "capabilities":
			if d.CountRemainingArgs() == 0 {
				return d.ArgErr()
			}
			for d.NextArg() {
				if strings.TrimSpace(d.Val()) == "" || strings.ContainsAny(d.Val(), "\r\n\x00") {
					return d.Errf("parsing %s option '%s': invalid extension %q", wrapper, optionName, d.Val())
				}
				h.Capabilities = append(h.Capabilities, d.Val())
			}
		case "starttls":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg() // consume option value
			switch d.Val() {
			case StartTLSOff, StartTLSOn, StartTLSOnly:
			default:
				return d.Errf("parsing %s option '%s': unknown policy '%s' (want %s, %s or %s)",
					wrapper, optionName, d.Val(), StartTLSOff, StartTLSOn, StartTLSOnly)
			}
			h.StartTLS = d.Val()
		case "implicit_tls":
			if d.CountRemainingArgs() != 0 {
				return d.ArgErr()
			}
			h.ImplicitTLS = true
		case "connection_policy":
			cp := new(caddytls.ConnectionPolicy)
			if err := cp.UnmarshalCaddyfile(d.NewFromNextSegment()); err != nil {
				return err
			}
			h.ConnectionPolicy = append(h.ConnectionPolicy, cp)
		case "auth_http":
			a := new(AuthHTTP)
			if err := a.unmarshalCaddyfile(d, wrapper); err != nil {
				return err
			}
			if len(h.AuthenticatorsRaw) > 0 {
				// After other authenticators: it joins their list in order,
				// since the auth_http field runs first.
				h.AuthenticatorsRaw = append(h.AuthenticatorsRaw,
					caddyconfig.JSONModuleObject(&HTTPAuthenticator{AuthHTTP: *a}, "authenticator", "http", nil))
			} else {
				h.AuthHTTP = a
			}
			continue // its block is consumed
		case "auth_cache":
			c := new(AuthCache)
			if d.CountRemainingArgs() != 0 {
				return d.ArgErr()
			}
			subSeen := map[string]bool{}
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				sub := d.Val()
				if subSeen[sub] {
					return d.Errf("duplicate %s option '%s %s'", wrapper, optionName, sub)
				}
				subSeen[sub] = true
				switch sub {
				case "ttl", "negative_ttl":
					dur, err := parsePositiveDuration(d, wrapper, optionName+" "+sub)
					if err != nil {
						return err
					}
					if sub == "ttl" {
						c.TTL = dur
					} else {
						c.NegativeTTL = dur
					}
				case "size":
					n, err := parseIntInRange(d, wrapper, optionName+" "+sub, 1, 1<<24)
					if err != nil {
						return err
					}
					c.Size = n
				default:
					return d.Errf("unrecognized %s option '%s %s'", wrapper, optionName, sub)
				}
			}
			h.AuthCache = c
			continue // its block is consumed
		case "limits":
			l, err := unmarshalLimits(d, wrapper)
			if err != nil {
				return err
			}
			h.Limits = l
			continue // its block is consumed
		case "master_login":
			if d.CountRemainingArgs() != 2 {
				return d.ArgErr()
			}
			m := new(MasterLogin)
			d.NextArg()
			m.User = d.Val()
			d.NextArg()
			m.Password = d.Val()
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				switch d.Val() {
				case "separator":
					if m.Separator != "" {
						return d.Errf("duplicate %s option '%s separator'", wrapper, optionName)
					}
					if d.CountRemainingArgs() != 1 {
						return d.ArgErr()
					}
					d.NextArg()
					m.Separator = d.Val()
				default:
					return d.Errf("unrecognized %s option '%s %s'", wrapper, optionName, d.Val())
				}
			}
			h.MasterLogin = m
			continue // its block is consumed
		case "authenticator", "passwd_file":
			name := optionName // passwd_file <path> is the module's own shorthand
			if optionName == "authenticator" {
				if !d.NextArg() {
					return d.ArgErr()
				}
				name = d.Val()
			}
			unm, err := caddyfile.UnmarshalModule(d, "layer4.handlers.pop3.authenticators."+name)
			if err != nil {
				return err
			}
			h.AuthenticatorsRaw = append(h.AuthenticatorsRaw, caddyconfig.JSONModuleObject(unm, "authenticator", name, nil))
			continue // its block is consumed
		case "auth_failure_delay":
			dur, err := parsePositiveDuration(d, wrapper, optionName)
			if err != nil {
				return err
			}
			h.AuthFailureDelay = dur
		case "greeting":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg() // consume option value
			if d.Val() == "" {
				return d.Errf("parsing %s option '%s': text must not be empty", wrapper, optionName)
			}
			if strings.ContainsAny(d.Val(), "\r\n\x00") {
				return d.Errf("parsing %s option '%s': text must be a single line", wrapper, optionName)
			}
			h.Greeting = d.Val()
		case "timeout":
			dur, err := parsePositiveDuration(d, wrapper, optionName)
			if err != nil {
				return err
			}
			h.Timeout = dur
		case "login_timeout":
			dur, err := parsePositiveDuration(d, wrapper, optionName)
			if err != nil {
				return err
			}
			h.LoginTimeout = dur
		case "proxy_timeout":
			dur, err := parsePositiveDuration(d, wrapper, optionName)
			if err != nil {
				return err
			}
			h.ProxyTimeout = dur
		case "pass_error_message":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg() // consume option value
			switch d.Val() {
			case "on":
				h.PassErrorMessage = true
			case "off":
				h.PassErrorMessage = false
			default:
				return d.Errf("parsing %s option '%s': unknown value '%s' (want on or off)", wrapper, optionName, d.Val())
			}
		case "max_errors":
			val, err := parseIntInRange(d, wrapper, optionName, 1, math.MaxInt32)
			if err != nil {
				return err
			}
			h.MaxErrors = val
		case "max_line_length":
			val, err := parseIntInRange(d, wrapper, optionName, minMaxLineLength, maxMaxLineLength)
			if err != nil {
				return err
			}
			h.MaxLineLength = val
		case "max_command_length":
			// Validate checks it against max_line_length, which may come later.
			val, err := parseIntInRange(d, wrapper, optionName, defaultMaxCommandLength, maxMaxLineLength)
			if err != nil {
				return err
			}
			h.MaxCommandLength = val
		default:
			return d.Errf("unrecognized %s option '%s'", wrapper, optionName)
		}

		// No nested blocks are supported (connection_policy consumed its own)
		if d.NextBlock(nesting + 1) {
			return d.Errf("malformed %s option '%s': blocks are not supported", wrapper, optionName)
		}
	}

	if len(h.Upstream) == 0 && h.AuthHTTP == nil && len(h.AuthenticatorsRaw) == 0 {
		d.Reset() // point the error at the handler's own line
		d.Next()
		return d.Errf("%s: at least one upstream (or an authenticator such as auth_http) is required", wrapper)
	}
	return nil
}

// addUpstream appends the current token as an upstream address. The address
// is kept as given; Provision normalises it to host:port.
func (h *Handler) addUpstream(d *caddyfile.Dispenser, wrapper, optionName string) error {
	if strings.TrimSpace(d.Val()) == "" {
		return d.Errf("parsing %s option '%s': address must not be empty", wrapper, optionName)
	}
	h.Upstream = append(h.Upstream, &Upstream{Address: d.Val()})
	return nil
}

// parsePositiveDuration reads the option's single argument as a duration
// greater than zero (zero would silently mean the default).
func parsePositiveDuration(d *caddyfile.Dispenser, wrapper, optionName string) (caddy.Duration, error) {
	if d.CountRemainingArgs() != 1 {
		return 0, d.ArgErr()
	}
	d.NextArg() // consume option value
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return 0, d.Errf("parsing %s option '%s' duration: %v", wrapper, optionName, err)
	}
	if dur <= 0 {
		return 0, d.Errf("parsing %s option '%s' duration: must be greater than zero, got '%s'", wrapper, optionName, d.Val())
	}
	return caddy.Duration(dur), nil
}

// parseIntInRange reads the option's single argument as a decimal integer
// between lo and hi inclusive.
func parseIntInRange(d *caddyfile.Dispenser, wrapper, optionName string, lo, hi int) (int, error) {
	if d.CountRemainingArgs() != 1 {
		return 0, d.ArgErr()
	}
	d.NextArg() // consume option value
	val, err := strconv.Atoi(d.Val())
	if err != nil {
		return 0, d.Errf("parsing %s option '%s': %v", wrapper, optionName, err)
	}
	if val < lo || val > hi {
		if hi == math.MaxInt32 {
			return 0, d.Errf("parsing %s option '%s': must be at least %d, got %d", wrapper, optionName, lo, val)
		}
		return 0, d.Errf("parsing %s option '%s': must be between %d and %d, got %d", wrapper, optionName, lo, hi, val)
	}
	return val, nil
}

// unmarshalCaddyfile reads "auth_http <url> [<url>...] { ... }" at the dispenser's
// current token.
func (a *AuthHTTP) unmarshalCaddyfile(d *caddyfile.Dispenser, wrapper string) error {
	const optionName = "auth_http"
	if d.CountRemainingArgs() < 1 {
		return d.ArgErr()
	}
	d.NextArg()
	a.URL = d.Val()
	for d.NextArg() {
		a.URLs = append(a.URLs, d.Val()) // failover, in order
	}
	seen := map[string]bool{} // options that may be given once
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if sub != "header" {
			if seen[sub] {
				return d.Errf("duplicate %s option '%s %s'", wrapper, optionName, sub)
			}
			seen[sub] = true
		}
		switch sub {
		case "header":
			if d.CountRemainingArgs() != 2 {
				return d.ArgErr()
			}
			d.NextArg()
			name := d.Val()
			d.NextArg()
			if a.Header == nil {
				a.Header = map[string]string{}
			}
			if _, dup := a.Header[name]; dup {
				return d.Errf("parsing %s option '%s': header '%s' set twice", wrapper, optionName, name)
			}
			a.Header[name] = d.Val()
		case "timeout":
			dur, err := parsePositiveDuration(d, wrapper, optionName+" "+sub)
			if err != nil {
				return err
			}
			a.Timeout = dur
		case "resolve_auth_server":
			on, err := parseOnOff(d, wrapper, optionName+" "+sub)
			if err != nil {
				return err
			}
			a.ResolveAuthServer = on
		case "tls_insecure_skip_verify", "tls_server_name", "tls_client_auth", "tls_trust_pool":
			if a.TLS == nil {
				a.TLS = new(reverseproxy.TLSConfig)
			}
			if err := unmarshalTLSClientOption(d, wrapper, optionName+" "+sub, a.TLS); err != nil {
				return err
			}
		case "pass_client_cert":
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			switch d.Val() {
			case "on":
				a.PassClientCert = true
			case "off":
			default:
				return d.Errf("parsing %s option '%s %s': unknown value '%s' (want on or off)", wrapper, optionName, sub, d.Val())
			}
		default:
			return d.Errf("unrecognized %s option '%s %s'", wrapper, optionName, sub)
		}
	}
	return nil
}

// unmarshalTLSClientOption reads one of the tls_* options at the
// dispenser's current token into t, spelled as in reverse_proxy's http
// transport: tls_insecure_skip_verify, tls_server_name <name>,
// tls_client_auth <cert> <key> | <automate_name>, tls_trust_pool <module> ...
// opt names the option in errors.
func unmarshalTLSClientOption(d *caddyfile.Dispenser, wrapper, opt string, t *reverseproxy.TLSConfig) error {
	switch d.Val() {
	case "tls_insecure_skip_verify":
		if d.CountRemainingArgs() != 0 {
			return d.ArgErr()
		}
		t.InsecureSkipVerify = true
	case "tls_server_name":
		if d.CountRemainingArgs() != 1 {
			return d.ArgErr()
		}
		d.NextArg()
		t.ServerName = d.Val()
	case "tls_client_auth":
		switch d.CountRemainingArgs() {
		case 1:
			d.NextArg()
			t.ClientCertificateAutomate = d.Val()
		case 2:
			d.NextArg()
			t.ClientCertificateFile = d.Val()
			d.NextArg()
			t.ClientCertificateKeyFile = d.Val()
		default:
			return d.ArgErr()
		}
	case "tls_trust_pool":
		if !d.NextArg() {
			return d.ArgErr()
		}
		modStem := d.Val()
		modID := "tls.ca_pool.source." + modStem
		unm, err := caddyfile.UnmarshalModule(d, modID)
		if err != nil {
			return err
		}
		ca, ok := unm.(caddytls.CA)
		if !ok {
			return d.Errf("parsing %s option '%s': module %s is not a caddytls.CA", wrapper, opt, modID)
		}
		t.CARaw = caddyconfig.JSONModuleObject(ca, "provider", modStem, nil)
	default:
		return d.Errf("unrecognized %s option '%s'", wrapper, opt)
	}
	return nil
}

// parseOnOff reads the option's single argument, on or off.
func parseOnOff(d *caddyfile.Dispenser, wrapper, optionName string) (bool, error) {
	if d.CountRemainingArgs() != 1 {
		return false, d.ArgErr()
	}
	d.NextArg()
	switch d.Val() {
	case "on":
		return true, nil
	case "off":
		return false, nil
	}
	return false, d.Errf("parsing %s option '%s': unknown value '%s' (want on or off)", wrapper, optionName, d.Val())
}

// unmarshalCaddyfile reads an upstream's optional block. The tls_* options
// are spelled as in reverse_proxy's http transport and imply tls.
func (u *Upstream) unmarshalCaddyfile(d *caddyfile.Dispenser, wrapper string) error {
	tlsConfig := func() *reverseproxy.TLSConfig {
		if u.TLS == nil {
			u.TLS = new(reverseproxy.TLSConfig)
		}
		return u.TLS
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		opt := "upstream " + sub
		if seen[sub] {
			return d.Errf("duplicate %s option '%s'", wrapper, opt)
		}
		seen[sub] = true
		switch sub {
		case "tls", "starttls":
			if d.CountRemainingArgs() != 0 {
				return d.ArgErr()
			}
			tlsConfig()
			if sub == "starttls" {
				u.StartTLS = true
			}
		case "tls_insecure_skip_verify", "tls_server_name", "tls_client_auth", "tls_trust_pool":
			if err := unmarshalTLSClientOption(d, wrapper, opt, tlsConfig()); err != nil {
				return err
			}
		case "max_connections", "weight":
			val, err := parseIntInRange(d, wrapper, opt, 1, math.MaxInt32)
			if err != nil {
				return err
			}
			if sub == "weight" {
				u.Weight = val
			} else {
				u.MaxConnections = val
			}
		default:
			return d.Errf("unrecognized %s option '%s'", wrapper, opt)
		}
	}
	return nil
}

// unmarshalLimits reads "limits [<zone>] { ... }" at the dispenser's
// current token.
func unmarshalLimits(d *caddyfile.Dispenser, wrapper string) (*Limits, error) {
	l := new(Limits)
	switch d.CountRemainingArgs() {
	case 0:
	case 1:
		d.NextArg()
		l.Zone = d.Val()
	default:
		return nil, d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		name := "limits " + sub
		if seen[sub] && sub != "exempt" {
			return nil, d.Errf("duplicate %s option '%s'", wrapper, name)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		count := func(i int) (int64, error) {
			n, err := strconv.ParseInt(args[i], 10, 64)
			if err != nil || n < 1 {
				return 0, d.Errf("parsing %s option '%s': want a whole number of at least 1, got '%s'", wrapper, name, args[i])
			}
			return n, nil
		}
		duration := func(i int) (caddy.Duration, error) {
			dur, err := caddy.ParseDuration(args[i])
			if err != nil || dur <= 0 {
				return 0, d.Errf("parsing %s option '%s': want a duration greater than zero, got '%s'", wrapper, name, args[i])
			}
			return caddy.Duration(dur), nil
		}
		want := map[string]int{
			"sessions_per_ip": 1, "sessions_per_user": 1, "sessions_per_user_ip": 1,
			"connections_per_ip": 2, "min_input_rate": 2,
			"failures_per_user_ip": 3, "failures_per_ip": 3, "failures_per_user": 3,
			"ipv6_prefix": 1, "max_session_lifetime": 1,
		}
		if n, ok := want[sub]; ok && len(args) != n {
			return nil, d.Errf("parsing %s option '%s': want %d arguments, got %d", wrapper, name, n, len(args))
		}
		var err error
		switch sub {
		case "sessions_per_ip", "sessions_per_user", "sessions_per_user_ip":
			var n int64
			if n, err = count(0); err == nil {
				*map[string]*int64{"sessions_per_ip": &l.SessionsPerIP, "sessions_per_user": &l.SessionsPerUser, "sessions_per_user_ip": &l.SessionsPerUserIP}[sub] = n
			}
		case "connections_per_ip":
			r := new(RateLimit)
			if r.Count, err = count(0); err == nil {
				r.Window, err = duration(1)
			}
			l.ConnectionsPerIP = r
		case "min_input_rate":
			r := new(InputRate)
			if r.Bytes, err = count(0); err == nil {
				r.Window, err = duration(1)
			}
			l.MinInputRate = r
		case "failures_per_user_ip", "failures_per_ip", "failures_per_user":
			f := new(FailureLimit)
			if f.Count, err = count(0); err == nil {
				if f.Window, err = duration(1); err == nil {
					f.Block, err = duration(2)
				}
			}
			*map[string]**FailureLimit{"failures_per_user_ip": &l.FailuresPerUserIP, "failures_per_ip": &l.FailuresPerIP, "failures_per_user": &l.FailuresPerUser}[sub] = f
		case "ipv6_prefix":
			bits, perr := strconv.Atoi(args[0])
			if perr != nil || bits < 1 || bits > 128 {
				return nil, d.Errf("parsing %s option '%s': want a prefix length between 1 and 128, got '%s'", wrapper, name, args[0])
			}
			l.IPv6Prefix = bits
		case "max_session_lifetime":
			l.MaxSessionLifetime, err = duration(0)
		case "exempt":
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			for _, a := range args {
				if _, perr := parsePrefix(a); perr != nil {
					return nil, d.Errf("parsing %s option '%s': '%s' is no network or address", wrapper, name, a)
				}
			}
			l.Exempt = append(l.Exempt, args...)
		default:
			return nil, d.Errf("unrecognized %s option '%s'", wrapper, name)
		}
		if err != nil {
			return nil, err
		}
		if d.NextBlock(nesting + 1) {
			return nil, d.Errf("malformed %s option '%s': blocks are not supported", wrapper, name)
		}
	}
	return l, nil
}
