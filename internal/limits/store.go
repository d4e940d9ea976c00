// Package limits holds the state behind the proxy's edge limits: sessions
// per key, new connections per window, failed logins per window, and blocks.
//
// Keys are opaque strings chosen by the caller ("ip:192.0.2.1", "user:alice",
// "userip:alice|192.0.2.1"); grouping addresses is the caller's job (see
// [AddressKey]). Times come from the caller's clock, so one clock decides and
// tests need no sleeps. Every [Store] method is one atomic step on one key,
// so a shared implementation can run each as a single Redis script.
package limits

import (
	"context"
	"errors"
	"time"
)

// ErrInvalid reports an argument no limit can be built from (a zero rate or
// window, a zero block time).
var ErrInvalid = errors.New("limits: invalid argument")

// Store keeps limit state. Each method is atomic on its key: no caller needs
// to read and then write, so several proxies may share one Store.
//
// The four kinds of state (sessions, buckets, failures, blocks) live in
// separate namespaces: the same key may be used in each.
type Store interface {
	// Acquire takes one of max session slots for key: it increments the
	// counter only if it is below max and reports whether it did. A max
	// below 1 admits nobody.
	Acquire(ctx context.Context, key string, max int64) (ok bool, err error)
	// Release gives back a slot taken by Acquire. A counter that falls to
	// zero is deleted; releasing an unknown key does nothing.
	Release(ctx context.Context, key string) error

	// Allow takes one token from key's bucket, which holds rate tokens and
	// refills rate tokens per window (burst rate), and reports whether there
	// was one. A refused call takes nothing.
	Allow(ctx context.Context, key string, rate int64, window time.Duration, now time.Time) (ok bool, err error)

	// Fail counts one failure for key and returns the failures counted in
	// the current window. The window is fixed and starts at the first
	// failure after the previous window ended (like Redis INCR plus PEXPIRE
	// on the first increment), so a count reaches 0 at once, window after
	// its first failure, rather than one by one.
	Fail(ctx context.Context, key string, window time.Duration, now time.Time) (count int64, err error)
	// Reset forgets key's failures (a good login may reset a user+address).
	Reset(ctx context.Context, key string) error

	// Block blocks key until the given time, replacing any block it has, so
	// an admin may shorten one as well as lengthen it.
	Block(ctx context.Context, key string, until time.Time) error
	// Blocked reports whether key is blocked at now, and until when. A block
	// ends at until: at now == until it no longer holds.
	Blocked(ctx context.Context, key string, now time.Time) (until time.Time, blocked bool, err error)
	// Unblock lifts key's block; unblocking an unblocked key does nothing.
	Unblock(ctx context.Context, key string) error
	// Blocks lists the blocks that hold at now, sorted by key.
	Blocks(ctx context.Context, now time.Time) ([]Block, error)
}

// Block is one entry of [Store.Blocks].
type Block struct {
	Key   string    `json:"key"`
	Until time.Time `json:"until"`
}
