package pop3

import (
	"crypto/hmac"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-pop3/caddy-pop3/internal/pop3test"
)

const upstreamTimestamp = "<1896.697170952@dbc.mtview.ca.us>"

func apopDigest(timestamp, password string) string {
	sum := md5.Sum([]byte(timestamp + password))
	return hex.EncodeToString(sum[:])
}

func cramResponse(user, password, challenge string) string {
	mac := hmac.New(md5.New, []byte(password))
	mac.Write([]byte(challenge))
	return b64(user + " " + hex.EncodeToString(mac.Sum(nil)))
}

func challengeUpstream(t *testing.T) (*pop3test.Upstream, string) {
	return fakeUpstream(t, func(u *pop3test.Upstream) {
		u.Timestamp = upstreamTimestamp
		u.SASL = []string{"PLAIN", "CRAM-MD5"}
	})
}

func TestAPOPRelaysUpstreamTimestamp(t *testing.T) {
	t.Parallel()
	up, addr := challengeUpstream(t)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthAPOP} })
	ts := startSessionGreeting(t, h, logs)
	if !strings.HasSuffix(ts.greeting, " "+upstreamTimestamp) {
		t.Fatalf("greeting %q does not carry the upstream's timestamp", ts.greeting)
	}
	ts.send("APOP alice " + apopDigest(upstreamTimestamp, "wrong"))
	ts.expect("-ERR [AUTH] Authentication failed")
	ts.send("USER alice") // plain is not enabled
	ts.expect("-ERR")
	ts.send("APOP alice " + apopDigest(upstreamTimestamp, "secret-pw"))
	ts.expect("+OK Logged in.")
	ts.send("STAT", "QUIT")
	ts.expect("+OK 1 ")
	ts.expect("+OK bye")
	ts.closed()
	ts.assertNoSecret("secret-pw", apopDigest(upstreamTimestamp, "secret-pw"))
	if n := strings.Count(strings.Join(up.Lines(), "\n"), "APOP alice"); n != 2 {
		t.Errorf("upstream saw %d APOP commands on one connection: %q", n, up.Lines())
	}
}

func TestCRAMMD5RelaysUpstreamChallenge(t *testing.T) {
	t.Parallel()
	_, addr := challengeUpstream(t)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthCRAMMD5} })
	ts := startSessionGreeting(t, h, logs)
	ts.send("CAPA")
	ts.expect("+OK")
	if caps := ts.multiline(); !slices.Contains(caps, "SASL PLAIN LOGIN CRAM-MD5") {
		t.Fatalf("CAPA %q", caps)
	}
	// Cancel, fail, then succeed on the same connection.
	ts.send("AUTH CRAM-MD5")
	ts.expect("+ " + base64.StdEncoding.EncodeToString([]byte(upstreamTimestamp)))
	ts.send("*")
	ts.expect("-ERR [AUTH] Authentication cancelled")
	ts.send("AUTH CRAM-MD5")
	ts.expect("+ ")
	ts.send(cramResponse("alice", "wrong", upstreamTimestamp))
	ts.expect("-ERR [AUTH] Authentication failed")
	ts.send("AUTH CRAM-MD5")
	ts.expect("+ ")
	ts.send(cramResponse("alice", "secret-pw", upstreamTimestamp))
	ts.expect("+OK Logged in.")
	ts.send("QUIT")
	ts.expect("+OK bye")
	ts.closed()
	ts.assertNoSecret("secret-pw", cramResponse("alice", "secret-pw", upstreamTimestamp))
}

func TestPlainLoginReusesEarlyUpstream(t *testing.T) {
	t.Parallel()
	up, addr := challengeUpstream(t)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthAPOP} })
	ts := startSessionGreeting(t, h, logs)
	ts.loginAndQuit()
	if n := strings.Count(strings.Join(up.Lines(), "\n"), "CAPA"); n != 1 {
		t.Errorf("upstream was connected %d times: %q", n, up.Lines())
	}
}

func TestChallengeRelayUpstreamDown(t *testing.T) {
	t.Parallel()
	h, logs := newTestHandler(t, closedPort(t), func(h *Handler) { h.Auth = []string{AuthAPOP} })
	ts := startSessionGreeting(t, h, logs)
	if !strings.HasPrefix(ts.greeting, "-ERR [SYS/TEMP]") {
		t.Fatalf("greeting %q", ts.greeting)
	}
	ts.closed()
}

func TestAPOPWithoutUpstreamTimestamp(t *testing.T) {
	t.Parallel()
	_, addr := fakeUpstream(t, nil)
	h, logs := newTestHandler(t, addr, func(h *Handler) { h.Auth = []string{AuthPlain, AuthAPOP} })
	ts := startSessionGreeting(t, h, logs)
	if strings.Contains(ts.greeting, "<") {
		t.Fatalf("greeting %q has a timestamp the upstream did not give", ts.greeting)
	}
	ts.send("APOP alice " + apopDigest("<x@y>", "secret-pw"))
	ts.expect("-ERR APOP is not enabled")
}
