package pop3

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

// errAuthServer marks a login the auth server could not decide: down, slow
// or answering garbage. The client gets [SYS/TEMP] and may retry.
var errAuthServer = errors.New("auth server unavailable")

// errAuthzidRefused answers an AUTH PLAIN whose authorization identity is
// not its user when an auth server decides: it could not approve it.
var errAuthzidRefused = &replyError{code: codeAuth, text: "Authorization identity not allowed"}

// authHTTPAuthenticator asks the auth server about each login (NGINX's
// auth_http) and logs in where it says, with the credentials it gives.
type authHTTPAuthenticator struct {
	a            *AuthHTTP
	verifyClient bool // a connection policy asks for client certificates
}

// maxAuthHTTPRetries bounds Auth-Status: WAIT answers for one login; NGINX
// has no bound.
const maxAuthHTTPRetries = 5

func (x authHTTPAuthenticator) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	if req.creds.Identity != "" && req.creds.Identity != req.creds.Username {
		// The auth server approves Auth-User alone (NGINX's protocol has no
		// field for an authorization identity); sent upstream with its
		// Auth-User and Auth-Pass, which may be master credentials, it would
		// open another user's mailbox.
		return loginTarget{}, errAuthzidRefused
	}
	clientIP := ""
	if host, _, err := net.SplitHostPort(req.remote.String()); err == nil {
		clientIP = host
	}
	areq := authHTTPRequest{
		Method:       req.method,
		User:         req.creds.Username,
		Pass:         req.creds.Password,
		Salt:         req.salt,
		Attempt:      req.attempt,
		ClientIP:     clientIP,
		TLS:          req.tls,
		VerifyClient: x.verifyClient || (req.tls != nil && len(req.tls.PeerCertificates) > 0),
	}
	var res authHTTPResult
	for retry := 0; ; retry++ {
		var err error
		res, err = x.a.check(ctx, areq)
		if err != nil {
			return loginTarget{}, fmt.Errorf("%w: %w", errAuthServer, err)
		}
		if !res.Retry {
			break
		}
		if retry == maxAuthHTTPRetries {
			return loginTarget{}, fmt.Errorf("%w: still WAIT after %d retries", errAuthServer, retry)
		}
		t := time.NewTimer(min(res.Wait, maxFailureDelay))
		select {
		case <-t.C:
		case <-ctx.Done(): // the session was kicked or ran out of time
			t.Stop()
			return loginTarget{}, fmt.Errorf("%w: %w", errAuthServer, ctx.Err())
		}
	}
	if !res.OK {
		return loginTarget{}, refusalFromAuthServer(res)
	}
	creds := sasl.Credentials{Username: req.creds.Username, Password: req.creds.Password}
	if res.User != "" {
		creds.Username = res.User
	}
	switch {
	case res.Pass != "":
		creds.Password = res.Pass
	case req.method != AuthPlain:
		// A digest, token or certificate is no password for the upstream;
		// NGINX refuses the same way.
		return loginTarget{}, fmt.Errorf("%w: no Auth-Pass for method %s", errAuthServer, req.method)
	}
	if creds.Username == "" {
		return loginTarget{}, fmt.Errorf("%w: no Auth-User for a login without a user name", errAuthServer)
	}
	return loginTarget{address: res.Address, creds: creds}, nil
}

// refusalFromAuthServer turns Auth-Status and Auth-Error-Code into the
// client's -ERR. The text is the auth server's, as NGINX shows it; an RFC
// 2449 code comes from Auth-Error-Code or a leading "[CODE]" in the text,
// else [AUTH].
func refusalFromAuthServer(res authHTTPResult) *authRefusal {
	text := sanitizeReplyText(res.ErrorText)
	code := ""
	if strings.HasPrefix(text, "[") {
		if end := strings.IndexByte(text, ']'); end > 1 {
			code, text = text[1:end], strings.TrimSpace(text[end+1:])
		}
	}
	if c := strings.Trim(sanitizeReplyText(res.ErrorCode), "[] "); isResponseCode(c) {
		code = c
	}
	if !isResponseCode(code) {
		code = codeAuth
	}
	if text == "" {
		text = errAuthFailed.text
	}
	return &authRefusal{code: code, text: text, wait: res.Wait, hasWait: res.HasWait}
}

// isResponseCode accepts RFC 2449 §8 response codes: atoms joined by "/".
func isResponseCode(c string) bool {
	if c == "" || len(c) > 40 {
		return false
	}
	for _, r := range c {
		if !(r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '/') {
			return false
		}
	}
	return true
}
