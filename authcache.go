package pop3

import (
	"container/list"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Defaults of auth_cache, Dovecot's auth_cache_ttl and
// auth_cache_negative_ttl among them.
const (
	defaultAuthCacheTTL         = 5 * time.Minute
	defaultAuthCacheNegativeTTL = time.Minute
	defaultAuthCacheSize        = 10000
)

// AuthCache remembers the authenticators' answers to USER/PASS, AUTH
// PLAIN and LOGIN logins, as Dovecot's auth cache does: a bcrypt or argon2
// check (50-100 ms) or an auth server's round trip is done once per TTL.
// An entry is found only by the same user, authorization identity and
// password: its key is an HMAC of them under a key made at start, and the
// cache never holds a password of the client. A changed passwd_file entry
// misses (its key includes the entry).
type AuthCache struct {
	// How long an accepted login is remembered. Default: 5m.
	TTL caddy.Duration `json:"ttl,omitempty"`
	// How long a refused one is remembered (a wrong password, a user no
	// authenticator knows). Default: 1m.
	NegativeTTL caddy.Duration `json:"negative_ttl,omitempty"`
	// Entries at most; the least recently used go first. Default: 10000.
	Size int `json:"size,omitempty"`
}

// authCache is the LRU table of an AuthCache.
type authCache struct {
	key         []byte
	ttl, negTTL time.Duration
	size        int
	metrics     *pop3Metrics

	mu      sync.Mutex
	entries map[[sha256.Size]byte]*list.Element
	lru     *list.List // of *authCacheEntry, most recently used first
}

type authCacheEntry struct {
	key     [sha256.Size]byte
	expires time.Time
	target  loginTarget // without the client's password
	// clientPassword: the target logs in upstream with the client's own
	// password, which the entry does not hold.
	clientPassword bool
	err            error // a *Refusal or ErrUnknownUser; nil: accepted
}

func (c *AuthCache) newCache(metrics *pop3Metrics) (*authCache, error) {
	if c.TTL < 0 || c.NegativeTTL < 0 || c.Size < 0 {
		return nil, errors.New("auth_cache: ttl, negative_ttl and size must not be negative")
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	ac := &authCache{key: key, ttl: time.Duration(c.TTL), negTTL: time.Duration(c.NegativeTTL), size: c.Size,
		metrics: metrics, entries: map[[sha256.Size]byte]*list.Element{}, lru: list.New()}
	if ac.ttl == 0 {
		ac.ttl = defaultAuthCacheTTL
	}
	if ac.negTTL == 0 {
		ac.negTTL = defaultAuthCacheNegativeTTL
	}
	if ac.size == 0 {
		ac.size = defaultAuthCacheSize
	}
	return ac, nil
}

// cacheVersioner is an authenticator whose answer for a user depends only
// on its data, which the version tells apart: the version goes into the
// key, so a change misses. Other authenticators' answers are keyed by the
// client too (clientOf).
type cacheVersioner interface {
	cacheVersion(user string) string
}

// cachedAuthenticator answers from the cache where it can.
type cachedAuthenticator struct {
	a     authenticator
	index int // in the chain: the same login gets different answers from each
	cache *authCache
}

func (c cachedAuthenticator) authenticate(ctx context.Context, req loginRequest) (loginTarget, error) {
	if req.method != AuthPlain || req.verified || req.creds.Password == "" {
		return c.a.authenticate(ctx, req) // a digest or a SCRAM proof is never the same twice
	}
	var version string
	if v, ok := c.a.(cacheVersioner); ok {
		version = v.cacheVersion(req.creds.Username)
	} else {
		// An auth server (or another package's module) may decide by the
		// client's address and TLS, as NGINX's Client-IP and Auth-SSL let
		// it: its answer holds for that client and connection kind only.
		version = clientOf(req)
	}
	key := c.cache.keyOf(c.index, version, req)
	if e, ok := c.cache.get(key); ok {
		if e.err != nil {
			c.cache.metrics.authCacheLookup("negative_hit")
			return loginTarget{}, e.err
		}
		c.cache.metrics.authCacheLookup("hit")
		target := e.target
		if e.clientPassword {
			target.creds.Password = req.creds.Password
		}
		return target, nil
	}
	c.cache.metrics.authCacheLookup("miss")
	target, err := c.a.authenticate(ctx, req)
	var refused *Refusal
	switch {
	case err == nil:
		e := &authCacheEntry{key: key, expires: now().Add(c.cache.ttl), target: target}
		if target.creds.Password == req.creds.Password {
			e.target.creds.Password, e.clientPassword = "", true
		}
		c.cache.put(e)
	case errors.Is(err, ErrUnknownUser),
		errors.As(err, &refused) && isCredentialCode(refused.Code) && !refused.HasWait:
		// Only what blames the credentials: IN-USE or SYS/TEMP may pass.
		c.cache.put(&authCacheEntry{key: key, expires: now().Add(c.cache.negTTL), err: err})
	}
	return target, err
}

// clientOf is the client address and whether the connection is TLS.
func clientOf(req loginRequest) string {
	s := "plain "
	if req.tls != nil {
		s = "tls "
	}
	if req.remote != nil {
		if ap, err := netip.ParseAddrPort(req.remote.String()); err == nil {
			s += ap.Addr().Unmap().String()
		}
	}
	return s
}

// keyOf is an HMAC of everything the answer depends on. Names are length
// prefixed, so no two logins share a key.
func (c *authCache) keyOf(index int, version string, req loginRequest) [sha256.Size]byte {
	mac := hmac.New(sha256.New, c.key)
	var n [8]byte
	for _, s := range []string{version, req.method, req.creds.Username, req.creds.Identity, req.creds.Password} {
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		mac.Write(n[:])
		mac.Write([]byte(s))
	}
	binary.BigEndian.PutUint64(n[:], uint64(index))
	mac.Write(n[:])
	var key [sha256.Size]byte
	copy(key[:], mac.Sum(nil))
	return key
}

func (c *authCache) get(key [sha256.Size]byte) (*authCacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[key]
	if !ok {
		return nil, false
	}
	e := el.Value.(*authCacheEntry)
	if !now().Before(e.expires) {
		c.lru.Remove(el)
		delete(c.entries, key)
		return nil, false
	}
	c.lru.MoveToFront(el)
	return e, true
}

func (c *authCache) put(e *authCacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[e.key]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
		return
	}
	c.entries[e.key] = c.lru.PushFront(e)
	for c.lru.Len() > c.size {
		oldest := c.lru.Back()
		c.lru.Remove(oldest)
		delete(c.entries, oldest.Value.(*authCacheEntry).key)
	}
}

// len is the number of entries, expired ones included.
func (c *authCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}
