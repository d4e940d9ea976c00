package pop3test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/md5"
	"encoding/hex"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// AuthServer is a fake auth server that answers as NGINX's auth_http
// protocol expects. It checks plain passwords, APOP digests and CRAM-MD5
// responses against Users and records every request with its header fields
// exactly as they came over the wire.
type AuthServer struct {
	// Users maps user names (as the client sent them) to accounts.
	Users map[string]AuthUser
	// FailText is the Auth-Status of a refusal. Default: "Invalid login or
	// password".
	FailText string
	// Wait goes out as Auth-Wait (whole seconds) with a refusal. NGINX
	// closes the session on a refusal with Auth-Wait absent or 0, and lets
	// the client retry after a longer one.
	Wait time.Duration
	// NoWait leaves Auth-Wait out of refusals.
	NoWait bool
	// ErrorCode, when set, goes out as Auth-Error-Code with a refusal.
	ErrorCode string
	// Status is the HTTP status of every answer. Default: 200.
	Status int
	// Delay holds every answer back this long (for timeout tests).
	Delay time.Duration

	srv  *httptest.Server
	mu   sync.Mutex
	reqs []AuthRequest
}

// AuthUser is one account of the fake auth server.
type AuthUser struct {
	// Password checks plain logins and APOP and CRAM-MD5 digests; it is
	// the expected token for oauthbearer and xoauth2.
	Password string
	// Server is the upstream, host:port with an IP host, sent as
	// Auth-Server and Auth-Port.
	Server string
	// RewriteUser and RewritePass, when set, go out as Auth-User and
	// Auth-Pass. For apop, cram-md5 and external, where NGINX needs
	// Auth-Pass, Password goes out when RewritePass is empty.
	RewriteUser, RewritePass string
	// CertSubject, when set, must equal Auth-SSL-Subject for external.
	CertSubject string
}

// AuthRequest is one request as received.
type AuthRequest struct {
	// RequestLine is e.g. "GET /auth HTTP/1.1".
	RequestLine string
	// Fields are the header fields in wire order and spelling.
	Fields []AuthField
}

// AuthField is one header field.
type AuthField struct{ Name, Value string }

// Get returns the value of the first field named exactly name
// (case-sensitive, as sent) and whether there was one.
func (r AuthRequest) Get(name string) (string, bool) {
	for _, f := range r.Fields {
		if f.Name == name {
			return f.Value, true
		}
	}
	return "", false
}

// Value returns Get's value alone.
func (r AuthRequest) Value(name string) string {
	v, _ := r.Get(name)
	return v
}

// Names returns the field names in wire order.
func (r AuthRequest) Names() []string {
	names := make([]string, len(r.Fields))
	for i, f := range r.Fields {
		names[i] = f.Name
	}
	return names
}

type connKey struct{}

// Start serves on a loopback port until the test ends and returns the URL
// to configure, ending in /auth.
func (s *AuthServer) Start(t testing.TB) string {
	t.Helper()
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serveHTTP))
	s.srv.Listener = &recordingListener{Listener: s.srv.Listener}
	s.srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, connKey{}, c)
	}
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	return s.srv.URL + "/auth"
}

// Requests returns every request received so far, in order.
func (s *AuthServer) Requests() []AuthRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]AuthRequest(nil), s.reqs...)
}

// Last returns the latest request; it fails the test when there is none.
func (s *AuthServer) Last(t testing.TB) AuthRequest {
	t.Helper()
	reqs := s.Requests()
	if len(reqs) == 0 {
		t.Fatal("auth server got no request")
	}
	return reqs[len(reqs)-1]
}

func (s *AuthServer) serveHTTP(w http.ResponseWriter, r *http.Request) {
	var req AuthRequest
	if c, ok := r.Context().Value(connKey{}).(*recordingConn); ok {
		req = parseRawRequest(c.takeHead())
	}
	s.mu.Lock()
	s.reqs = append(s.reqs, req)
	s.mu.Unlock()
	if s.Delay > 0 {
		select {
		case <-time.After(s.Delay):
		case <-r.Context().Done():
			return
		}
	}

	h := w.Header()
	// Direct assignment keeps the spelling; the names here are canonical anyway.
	set := func(name, value string) { h[name] = append(h[name], value) }
	status := s.Status
	if status == 0 {
		status = http.StatusOK
	}
	user, server, pass, ok := s.verify(req)
	if !ok {
		text := s.FailText
		if text == "" {
			text = "Invalid login or password"
		}
		set("Auth-Status", text)
		if !s.NoWait {
			set("Auth-Wait", strconv.Itoa(int(s.Wait/time.Second)))
		}
		if s.ErrorCode != "" {
			set("Auth-Error-Code", s.ErrorCode)
		}
		w.WriteHeader(status)
		return
	}
	host, port, _ := net.SplitHostPort(server)
	set("Auth-Status", "OK")
	set("Auth-Server", host)
	set("Auth-Port", port)
	if user != "" {
		set("Auth-User", user)
	}
	if pass != "" {
		set("Auth-Pass", pass)
	}
	w.WriteHeader(status)
}

// verify checks a request against Users and returns what to answer.
func (s *AuthServer) verify(req AuthRequest) (user, server, pass string, ok bool) {
	name, err1 := url.PathUnescape(req.Value("Auth-User"))
	given, err2 := url.PathUnescape(req.Value("Auth-Pass"))
	if err1 != nil || err2 != nil {
		return "", "", "", false
	}
	account, found := s.Users[name]
	if !found {
		return "", "", "", false
	}
	salt := req.Value("Auth-Salt")
	method := req.Value("Auth-Method")
	switch method {
	case "plain", "oauthbearer", "xoauth2":
		ok = given == account.Password
	case "apop":
		sum := md5.Sum([]byte(salt + account.Password))
		ok = salt != "" && hmac.Equal([]byte(given), []byte(hex.EncodeToString(sum[:])))
	case "cram-md5":
		mac := hmac.New(md5.New, []byte(account.Password))
		mac.Write([]byte(salt))
		ok = salt != "" && hmac.Equal([]byte(given), []byte(hex.EncodeToString(mac.Sum(nil))))
	case "external":
		ok = req.Value("Auth-SSL-Verify") == "SUCCESS" &&
			(account.CertSubject == "" || req.Value("Auth-SSL-Subject") == account.CertSubject)
	}
	if !ok {
		return "", "", "", false
	}
	pass = account.RewritePass
	if pass == "" && method != "plain" {
		pass = account.Password
	}
	return account.RewriteUser, account.Server, pass, true
}

// parseRawRequest splits a raw request head into its line and fields.
func parseRawRequest(head []byte) AuthRequest {
	var req AuthRequest
	sc := bufio.NewScanner(bytes.NewReader(head))
	first := true
	for sc.Scan() {
		line := strings.TrimSuffix(sc.Text(), "\r")
		if first {
			req.RequestLine, first = line, false
			continue
		}
		if line == "" {
			break
		}
		name, value, _ := strings.Cut(line, ":")
		req.Fields = append(req.Fields, AuthField{Name: name, Value: strings.TrimLeft(value, " \t")})
	}
	return req
}

// recordingListener keeps what each connection read so that requests can
// be seen as sent: net/http canonicalises field names (Auth-SSL-Verify
// becomes Auth-Ssl-Verify) and forgets their order.
type recordingListener struct{ net.Listener }

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c}, nil
}

type recordingConn struct {
	net.Conn
	mu  sync.Mutex
	buf []byte
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.buf = append(c.buf, p[:n]...)
	c.mu.Unlock()
	return n, err
}

// takeHead removes and returns the first request head read so far. The
// handler runs only once the whole head has been read.
func (c *recordingConn) takeHead() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := bytes.Index(c.buf, []byte("\r\n\r\n"))
	if i < 0 {
		head := c.buf
		c.buf = nil
		return head
	}
	head := c.buf[:i+4]
	c.buf = append([]byte(nil), c.buf[i+4:]...)
	return head
}
