// Package limits holds the state behind the proxy's edge limits: sessions
// per key, new connections per window, failed logins per window, and blocks.
//
// Keys are opaque strings chosen by the caller ("ip:192.0.2.1", "user:alice",
// "userip:alice|192.0.2.1"); grouping addresses is the caller's job (see
// [AddressKey]). Times come from the caller's clock, so one clock decides and
// tests need no sleeps. Every [Store] method is one atomic step on one key,
// so a shared implementation can run each as a single Redis script; a
// shared store then assumes that the clocks of the proxies sharing it agree
// (NTP) to well within the shortest window, lease or block.
package limits

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrInvalid reports an argument no limit can be built from (a zero rate or
// window, a zero block time, a lease of no length, an empty holder).
var ErrInvalid = errors.New("limits: invalid argument")

// Store keeps limit state. Each method is atomic on its key: no caller needs
// to read and then write, so several proxies may share one Store.
//
// The four kinds of state (sessions, buckets, failures, blocks) live in
// separate namespaces: the same key may be used in each.
type Store interface {
	// Acquire takes one of max session slots of key for holder, a name
	// unique to one session (the session id; an instance name and the id
	// where several proxies share the store), leased until now+lease: a
	// slot whose holder neither renews nor releases it is free again once
	// its lease ends, so a proxy that dies does not hold its sessions'
	// slots for ever. It reports whether holder has the slot. A holder
	// already present is renewed and counted once. A max below 1 admits
	// nobody.
	Acquire(ctx context.Context, key, holder string, max int64, now time.Time, lease time.Duration) (ok bool, err error)
	// Release gives back holder's slot of key. A key whose last slot is
	// released is deleted; releasing an unknown key or holder does nothing.
	Release(ctx context.Context, key, holder string) error
	// Renew moves the end of each lease's slot to now+lease, in one round
	// trip for the lot: a proxy calls it every fraction of lease with the
	// slots of all its live sessions. It returns the leases it could not
	// renew, which are gone (released, expired, or evicted): Renew does not
	// take them again, since that could exceed a max that others filled
	// meanwhile; the caller may Acquire them anew or end their sessions.
	Renew(ctx context.Context, leases []Lease, now time.Time, lease time.Duration) (lost []Lease, err error)

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
	// an admin may shorten one as well as lengthen it; an until not after
	// now lifts the block. A shared store needs now to expire the entry by
	// a time to live rather than by its own clock.
	Block(ctx context.Context, key string, until, now time.Time) error
	// Blocked reports whether key is blocked at now, and until when. A block
	// ends at until: at now == until it no longer holds.
	Blocked(ctx context.Context, key string, now time.Time) (until time.Time, blocked bool, err error)
	// Unblock lifts key's block; unblocking an unblocked key does nothing.
	Unblock(ctx context.Context, key string) error
	// Blocks lists the blocks that hold at now, sorted by key. A store may
	// cap the number of entries it returns, and says so in its doc.
	Blocks(ctx context.Context, now time.Time) ([]Block, error)
}

// Lease names one slot of [Store.Renew]: the key and the holder that
// acquired it.
type Lease struct {
	Key    string
	Holder string
}

// CheckLease returns an [ErrInvalid] error for an Acquire argument no store
// can keep: an empty holder or a lease of no length.
func CheckLease(holder string, lease time.Duration) error {
	if holder == "" || lease <= 0 {
		return fmt.Errorf("acquiring a slot for a lease of %v (holder %q): %w", lease, holder, ErrInvalid)
	}
	return nil
}

// Block is one entry of [Store.Blocks].
type Block struct {
	Key   string    `json:"key"`
	Until time.Time `json:"until"`
}
