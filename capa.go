package pop3

import "strings"

// The predicates below decide both what CAPA lists and what the commands
// accept: what is not advertised is refused.

// canSTLS reports whether STLS is offered now.
func (s *session) canSTLS() bool { return !s.secure && s.h.tlsOn }

// loginAllowed reports whether credentials may be sent now: `starttls only`
// keeps them off a plaintext connection (RFC 2595 §2.1).
func (s *session) loginAllowed() bool { return s.secure || s.h.StartTLS != StartTLSOnly }

// allowsUser reports whether USER/PASS is accepted now.
func (s *session) allowsUser() bool { return s.loginAllowed() && s.h.hasAuth(AuthPlain) }

// mechanisms returns the SASL mechanisms AUTH accepts now.
func (s *session) mechanisms() []string {
	if !s.loginAllowed() {
		return nil
	}
	var m []string
	for _, a := range s.h.Auth {
		switch a {
		case AuthPlain:
			m = append(m, "PLAIN", "LOGIN")
		case AuthCRAMMD5:
			if (s.early == nil || s.early.mechs["CRAM-MD5"]) && s.h.digestsCheckable(AuthCRAMMD5) {
				m = append(m, "CRAM-MD5")
			}
		case AuthExternal:
			// Only a client that presented a certificate can use it.
			if st := s.tlsState(); st != nil && len(st.PeerCertificates) > 0 {
				m = append(m, "EXTERNAL")
			}
		case AuthOAuthBearer:
			m = append(m, "OAUTHBEARER")
		case AuthXOAuth2:
			m = append(m, "XOAUTH2")
		case AuthSCRAMSHA256:
			if s.channelBinding() != nil {
				m = append(m, "SCRAM-SHA-256-PLUS")
			}
			m = append(m, "SCRAM-SHA-256")
		case AuthSCRAMSHA1:
			m = append(m, "SCRAM-SHA-1")
		}
	}
	return m
}

// allowsMechanism reports whether AUTH <name> is accepted now.
func (s *session) allowsMechanism(name string) bool {
	for _, m := range s.mechanisms() {
		if strings.EqualFold(m, name) {
			return true
		}
	}
	return false
}

// capabilities returns the CAPA lines (RFC 2449): the configured ones, USER
// while plain login is allowed, SASL, STLS while it may be used, and the
// response-code extensions the proxy itself speaks.
func (s *session) capabilities() []string {
	var caps []string
	for _, c := range s.h.Capabilities {
		if strings.EqualFold(c, "USER") && !s.allowsUser() {
			continue
		}
		caps = append(caps, c)
	}
	if m := s.mechanisms(); len(m) > 0 {
		caps = append(caps, "SASL "+strings.Join(m, " "))
	}
	if s.canSTLS() {
		caps = append(caps, "STLS")
	}
	return append(caps, "RESP-CODES", "AUTH-RESP-CODE")
}

func (s *session) handleCapa() error {
	if err := s.writeLine("+OK Capability list follows"); err != nil {
		return err
	}
	for _, c := range s.capabilities() {
		if err := s.writeLine(c); err != nil {
			return err
		}
	}
	return s.writeLine(".")
}
