package pop3

import (
	"context"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/caddy-pop3/caddy-pop3/internal/passwdfile"
	"github.com/caddy-pop3/caddy-pop3/internal/sasl"
)

func init() {
	caddy.RegisterModule(&PasswdFile{})
}

// passwdPollInterval is how often a passwd-file is checked for changes.
const passwdPollInterval = 2 * time.Second

// PasswdFile checks logins against a Dovecot passwd-file
// (layer4.handlers.pop3.authenticators.passwd_file), so that an existing
// Dovecot proxy's file works unchanged: user:{SCHEME}password:uid:gid:
// gecos:home:shell:extra fields. The extra fields host, port, destuser,
// master, pass, ssl, starttls, nologin and reason have Dovecot's meanings;
// a user without host goes to the handler's upstreams. The file is read
// again when it changes; a new file that does not parse leaves the old
// table in place.
type PasswdFile struct {
	// Path of the passwd-file.
	Path string `json:"path"`
	// A user name without @ gets @default_domain before the lookup.
	DefaultDomain string `json:"default_domain,omitempty"`

	table atomic.Pointer[passwdfile.Table]
	// digests: the table has an entry that can check APOP (clear) or
	// CRAM-MD5 (clear or CRAM-MD5) digests; set with the table.
	apopOK, cramOK atomic.Bool
	loaded         fileStamp // of the table in use; only the watcher changes it
	logger         *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*PasswdFile) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.pop3.authenticators.passwd_file",
		New: func() caddy.Module { return new(PasswdFile) },
	}
}

// Provision reads the file (an error names the line) and watches it.
func (p *PasswdFile) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	if err := p.load(); err != nil {
		return err
	}
	go p.watch(ctx)
	return nil
}

// load reads the file into a new table. It fails, keeping the table in
// use, when the file does not parse or changed while it was read (a
// writer not done yet).
func (p *PasswdFile) load() error {
	if p.Path == "" {
		return errors.New("passwd_file: path is required")
	}
	before, err := stampOf(p.Path)
	if err != nil {
		return fmt.Errorf("passwd_file: %w", err)
	}
	t, err := passwdfile.Load(p.Path)
	if err != nil {
		return fmt.Errorf("passwd_file: %w", err)
	}
	if after, err := stampOf(p.Path); err != nil || after != before {
		return fmt.Errorf("passwd_file: %s changed while it was read", p.Path)
	}
	apopOK, cramOK := false, false
	for e := range t.All() {
		_, clear := e.ClearPassword()
		_, cram := e.CRAMMD5()
		apopOK, cramOK = apopOK || clear, cramOK || cram
	}
	p.table.Store(t)
	p.apopOK.Store(apopOK)
	p.cramOK.Store(cramOK)
	p.loaded = before
	return nil
}

// watch reads the file again when its inode, size or modification time
// changes, until ctx ends (a reload or stop).
func (p *PasswdFile) watch(ctx context.Context) {
	defer func() {
		if r := recover(); r != nil {
			p.logger.Error("passwd_file watcher panicked", zap.Any("panic", r))
		}
	}()
	t := time.NewTicker(passwdPollInterval)
	defer t.Stop()
	var failed fileStamp // a broken file is reported once, not every tick
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := stampOf(p.Path)
		if err != nil || st == p.loaded || st == failed {
			continue
		}
		if err := p.load(); err != nil {
			failed = st
			p.logger.Error("passwd_file not reloaded: keeping the users read before", zap.String("path", p.Path), zap.Error(err))
			continue
		}
		p.logger.Info("passwd_file reloaded", zap.String("path", p.Path), zap.Int("users", p.table.Load().Len()))
	}
}

// fileStamp tells one version of a file from another.
type fileStamp struct {
	ino, size int64
	mtime     time.Time
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = int64(sys.Ino)
	}
	return st, nil
}

// lookup finds a login name's entry: lower case, as Dovecot's default
// auth_username_format=%Lu, with default_domain added to a bare name.
func (p *PasswdFile) lookup(user string) (*passwdfile.Entry, bool) {
	user = strings.ToLower(user)
	if p.DefaultDomain != "" && !strings.Contains(user, "@") {
		user += "@" + strings.ToLower(p.DefaultDomain)
	}
	return p.table.Load().Lookup(user)
}

// checksDigests reports whether any entry can check method's digests
// (apop, cram-md5).
func (p *PasswdFile) checksDigests(method string) bool {
	if method == AuthAPOP {
		return p.apopOK.Load()
	}
	return p.cramOK.Load()
}

// cacheVersion tells one version of user's entry from another, for the
// auth cache: a changed password or extra field misses.
func (p *PasswdFile) cacheVersion(user string) string {
	e, ok := p.lookup(user)
	if !ok {
		return "absent"
	}
	keys := slices.Sorted(maps.Keys(e.Extra))
	var b strings.Builder
	b.WriteString(e.Stored())
	for _, k := range keys {
		b.WriteString("\x00" + k + "=" + e.Extra[k])
	}
	return b.String()
}

func (p *PasswdFile) authenticate(_ context.Context, req loginRequest) (loginTarget, error) {
	e, ok := p.lookup(req.creds.Username)
	if !ok {
		if req.method == AuthPlain {
			// As long as a user's check: the file's first entry, whose
			// scheme is likely everyone's (bcrypt costs ~100x SHA-crypt),
			// so the time does not tell which users exist.
			for first := range p.table.Load().All() {
				first.Verify(req.creds.Password)
				break
			}
		}
		return loginTarget{}, ErrUnknownUser
	}
	if req.creds.Identity != "" && req.creds.Identity != req.creds.Username {
		return loginTarget{}, errAuthzidRefused // no master users among clients
	}
	if !req.verified && !p.verify(e, req) {
		return loginTarget{}, &Refusal{Code: codeAuth, Text: errAuthFailed.text}
	}
	if _, off := e.Extra["nologin"]; off {
		// The password was right: the reason (e.g. a move) is for this user.
		text := sanitizeReplyText(e.Extra["reason"])
		if text == "" {
			text = "Login disabled"
		}
		return loginTarget{}, &Refusal{Code: "SYS/PERM", Text: text}
	}
	target := loginTarget{checked: true, creds: sasl.Credentials{Username: e.User}}
	if req.method == AuthPlain {
		target.creds.Password = req.creds.Password
	}
	if u := e.Extra["destuser"]; u != "" {
		target.creds.Username = u
	}
	if pw, ok := e.Extra["pass"]; ok {
		target.creds.Password = pw
	}
	target.master = e.Extra["master"]
	if host := e.Extra["host"]; host != "" {
		tlsMode, startTLS := e.Extra["ssl"], false
		if v, ok := e.Extra["starttls"]; ok {
			tlsMode, startTLS = v, true
		}
		port := e.Extra["port"]
		if port == "" {
			port = "110"
			if tlsMode != "" && !startTLS {
				port = "995"
			}
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return loginTarget{}, fmt.Errorf("%w: passwd_file line %d: port %q is no port", errAuthServer, e.Line, port)
		}
		target.address = net.JoinHostPort(host, port)
		if tlsMode != "" && tlsMode != "no" {
			target.tls = &tls.Config{ServerName: host, InsecureSkipVerify: tlsMode == "any-cert"} //nolint:gosec // any-cert is the operator's explicit choice, as in Dovecot
			target.startTLS = startTLS
		}
	}
	return target, nil
}

// verify checks the client's credentials against the entry: a password
// by its scheme; an APOP or CRAM-MD5 digest against the clear password,
// the only secret both can be computed from.
func (p *PasswdFile) verify(e *passwdfile.Entry, req loginRequest) bool {
	switch req.method {
	case AuthPlain:
		return e.Verify(req.creds.Password)
	case AuthAPOP:
		clear, ok := e.ClearPassword()
		if !ok {
			return false
		}
		sum := md5.Sum([]byte(req.salt + clear))
		return subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(strings.ToLower(req.creds.Password))) == 1
	case AuthCRAMMD5:
		c, ok := e.CRAMMD5() // a stored HMAC-MD5 context, or from a clear password
		return ok && c.VerifyResponse(req.salt, strings.ToLower(req.creds.Password))
	}
	return false
}

// scramKeys gives SCRAM keys for user: the stored ones of a SCRAM entry
// of the same hash, or keys derived from a clear password with a salt that
// is the same for the user at every login.
func (p *PasswdFile) scramKeys(user string, newHash func() hash.Hash) (sasl.SCRAMKeys, error) {
	e, ok := p.lookup(user)
	if !ok {
		return sasl.SCRAMKeys{}, ErrUnknownUser
	}
	want := newHash().Size()
	if s, ok := e.SCRAM(); ok && s.Hash()().Size() == want {
		return sasl.SCRAMKeys{Iterations: s.Iterations, Salt: s.Salt, StoredKey: s.StoredKey, ServerKey: s.ServerKey}, nil
	}
	clear, ok := e.ClearPassword()
	if !ok {
		return sasl.SCRAMKeys{}, fmt.Errorf("%w: passwd_file line %d has scheme %s", errNoSCRAMSecret, e.Line, e.Scheme)
	}
	mac := hmac.New(sha256.New, scramSaltKey())
	mac.Write([]byte(e.User))
	return sasl.DeriveSCRAMKeys(newHash, clear, mac.Sum(nil)[:16], sasl.MinSCRAMIterations)
}

// scramSaltKey makes the salts of keys derived from clear passwords: per
// process, so that nothing outside can compute them in advance.
var scramSaltKey = sync.OnceValue(func() []byte {
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	return k
})

// UnmarshalCaddyfile reads "passwd_file <path> { default_domain <domain> }".
func (p *PasswdFile) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.CountRemainingArgs() != 1 {
		return d.ArgErr()
	}
	d.NextArg()
	p.Path = d.Val()
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "default_domain":
			if p.DefaultDomain != "" {
				return d.Errf("duplicate passwd_file option 'default_domain'")
			}
			if d.CountRemainingArgs() != 1 {
				return d.ArgErr()
			}
			d.NextArg()
			p.DefaultDomain = d.Val()
		default:
			return d.Errf("unrecognized passwd_file option '%s'", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ scramSource           = (*PasswdFile)(nil)
	_ cacheVersioner        = (*PasswdFile)(nil)
	_ caddy.Provisioner     = (*PasswdFile)(nil)
	_ caddyfile.Unmarshaler = (*PasswdFile)(nil)
)
