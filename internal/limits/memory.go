package limits

import (
	"cmp"
	"context"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"time"
)

// DefaultMaxEntries bounds each table of a [Memory] made with a max of 0.
const DefaultMaxEntries = 100_000

// Memory is a [Store] inside one process. Each of its four tables (sessions,
// buckets, failures, blocks) holds at most the configured number of entries;
// a full table evicts its least recently used entry (used means acquired,
// released, allowed, failed, blocked or looked up), never all of them.
// Expired entries are dropped when they are next touched or listed, or
// evicted like any other. A session counter whose last holder is released
// is deleted.
//
// Memory ignores session leases: the process that holds a slot is the one
// that keeps it, and it cannot die without its memory, so a slot is held
// until Release. Renew only reports the slots that are gone.
//
// Evicting a live session counter forgets its sessions: later Acquires for
// that key admit up to max again, Releases of the forgotten holders do
// nothing and Renew reports them lost. The bound protects memory first;
// size it above the number of keys with live sessions.
//
// Large tables are split into shards of at least 1024 entries, each with its
// own lock and its own LRU list, so eviction is least recently used within a
// shard. Tables of up to 2047 entries have one shard and exact LRU order.
//
// An entry costs about 115 bytes of heap with a 16-byte key (measured by
// TestMemoryBytesPerEntry on 100,000 failure entries: 115 bytes, the key
// included; the map's growth moves it a little), in each table it is in. A
// session counter adds its map of holders: about 250 bytes for up to 8
// holders (measured apart; the names are the sessions' own strings).
type Memory struct {
	sessions, buckets, failures, blocks table
}

// NewMemory returns a Memory whose tables hold at most maxEntries entries
// each; 0 or less means [DefaultMaxEntries].
func NewMemory(maxEntries int) *Memory {
	if maxEntries <= 0 {
		maxEntries = DefaultMaxEntries
	}
	m := new(Memory)
	for _, t := range []*table{&m.sessions, &m.buckets, &m.failures, &m.blocks} {
		t.init(maxEntries)
	}
	return m
}

// Acquire implements [Store]; the lease is checked and otherwise ignored.
func (m *Memory) Acquire(_ context.Context, key, holder string, max int64, _ time.Time, lease time.Duration) (bool, error) {
	if err := CheckLease(holder, lease); err != nil {
		return false, err
	}
	if max < 1 {
		return false, nil
	}
	s := m.sessions.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(key, 0)
	if e == nil {
		e = s.put(key)
		e.holders = make(map[string]struct{}, 1)
	}
	if e.holds(holder) {
		return true, nil
	}
	if int64(len(e.holders)) >= max {
		return false, nil
	}
	e.holders[holder] = struct{}{}
	return true, nil
}

// Release implements [Store].
func (m *Memory) Release(_ context.Context, key, holder string) error {
	s := m.sessions.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.get(key, 0); e != nil {
		if delete(e.holders, holder); len(e.holders) == 0 {
			s.del(e)
		}
	}
	return nil
}

// Renew implements [Store]: the leases are not kept, so it only reports
// the holders that are gone.
func (m *Memory) Renew(_ context.Context, leases []Lease, _ time.Time, lease time.Duration) ([]Lease, error) {
	if lease <= 0 {
		return nil, fmt.Errorf("renewing for %v: %w", lease, ErrInvalid)
	}
	var lost []Lease
	for _, l := range leases {
		s := m.sessions.shard(l.Key)
		s.mu.Lock()
		if !s.get(l.Key, 0).holds(l.Holder) {
			lost = append(lost, l)
		}
		s.mu.Unlock()
	}
	return lost, nil
}

// Allow implements [Store]. The bucket is kept as the generic cell rate
// algorithm keeps it: one time, at which the bucket is full again, moved on
// by window/rate per token taken.
func (m *Memory) Allow(_ context.Context, key string, rate int64, window time.Duration, now time.Time) (bool, error) {
	if rate < 1 || window <= 0 {
		return false, fmt.Errorf("allowing %d per %v: %w", rate, window, ErrInvalid)
	}
	step := max(int64(window)/rate, 1)
	t := now.UnixNano()
	s := m.buckets.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(key, t)
	full := t // a missing or expired entry is a full bucket
	if e != nil {
		full = max(e.t, t)
	}
	if full+step-t > int64(window) {
		return false, nil
	}
	if e == nil {
		e = s.put(key)
	}
	e.t = full + step
	return true, nil
}

// Fail implements [Store].
func (m *Memory) Fail(_ context.Context, key string, window time.Duration, now time.Time) (int64, error) {
	if window <= 0 {
		return 0, fmt.Errorf("counting failures per %v: %w", window, ErrInvalid)
	}
	t := now.UnixNano()
	s := m.failures.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(key, t)
	if e == nil {
		e = s.put(key)
		e.t = t + int64(window)
	}
	e.n++
	return e.n, nil
}

// Reset implements [Store].
func (m *Memory) Reset(_ context.Context, key string) error {
	m.failures.delete(key)
	return nil
}

// Block implements [Store].
func (m *Memory) Block(_ context.Context, key string, until, now time.Time) error {
	u := until.UnixNano()
	if u <= 0 { // 0 means "never expires" in an entry
		return fmt.Errorf("blocking until %v: %w", until, ErrInvalid)
	}
	if !until.After(now) {
		m.blocks.delete(key)
		return nil
	}
	s := m.blocks.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(key, 0)
	if e == nil {
		e = s.put(key)
	}
	e.t = u
	return nil
}

// Blocked implements [Store].
func (m *Memory) Blocked(_ context.Context, key string, now time.Time) (time.Time, bool, error) {
	s := m.blocks.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.get(key, now.UnixNano()); e != nil {
		return time.Unix(0, e.t), true, nil
	}
	return time.Time{}, false, nil
}

// Unblock implements [Store].
func (m *Memory) Unblock(_ context.Context, key string) error {
	m.blocks.delete(key)
	return nil
}

// Blocks implements [Store]. It drops the expired blocks it meets and
// leaves the LRU order as it is.
func (m *Memory) Blocks(_ context.Context, now time.Time) ([]Block, error) {
	t := now.UnixNano()
	var list []Block
	for i := range m.blocks.shards {
		s := &m.blocks.shards[i]
		s.mu.Lock()
		for e := s.head.next; e != &s.head; {
			next := e.next
			if t >= e.t {
				s.del(e)
			} else {
				list = append(list, Block{Key: e.key, Until: time.Unix(0, e.t)})
			}
			e = next
		}
		s.mu.Unlock()
	}
	slices.SortFunc(list, func(a, b Block) int { return cmp.Compare(a.Key, b.Key) })
	return list, nil
}

// entry is one key of a table. Which fields mean what depends on the table:
// holders are the sessions of a session counter; n counts failures; t is
// when the entry expires, in Unix nanoseconds (0: never), which is also when
// a bucket is full again, when a failure window ends and when a block ends.
type entry struct {
	key        string
	n, t       int64
	holders    map[string]struct{}
	prev, next *entry // LRU list: toward the most and the least recently used
}

// holds reports whether a session counter, which may be nil, has holder.
func (e *entry) holds(holder string) bool {
	if e == nil {
		return false
	}
	_, ok := e.holders[holder]
	return ok
}

// table is a map bounded by LRU eviction, in shards.
type table struct {
	seed   maphash.Seed
	shards []shard
}

type shard struct {
	mu   sync.Mutex
	m    map[string]*entry
	head entry // sentinel: head.next is the most recently used, head.prev the least
	max  int
}

const minShardEntries = 1024

func (t *table) init(maxEntries int) {
	n := min(max(maxEntries/minShardEntries, 1), 32)
	t.seed = maphash.MakeSeed()
	t.shards = make([]shard, n)
	for i := range t.shards {
		s := &t.shards[i]
		s.m = make(map[string]*entry)
		s.head.prev, s.head.next = &s.head, &s.head
		s.max = maxEntries / n // the shards together never exceed maxEntries
	}
}

func (t *table) shard(key string) *shard {
	if len(t.shards) == 1 {
		return &t.shards[0]
	}
	return &t.shards[maphash.String(t.seed, key)%uint64(len(t.shards))]
}

func (t *table) delete(key string) {
	s := t.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.m[key]; e != nil {
		s.del(e)
	}
}

// len counts the entries, expired ones included; for tests.
func (t *table) len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// get returns key's entry and marks it most recently used. An entry expired
// at now is deleted and not returned; now 0 keeps it.
func (s *shard) get(key string, now int64) *entry {
	e := s.m[key]
	if e == nil {
		return nil
	}
	if now != 0 && e.t != 0 && now >= e.t {
		s.del(e)
		return nil
	}
	s.unlink(e)
	s.pushFront(e)
	return e
}

// put adds a zero entry for key, which must be missing, evicting the least
// recently used entry of a full shard.
func (s *shard) put(key string) *entry {
	if len(s.m) >= s.max {
		s.del(s.head.prev)
	}
	e := &entry{key: key}
	s.m[key] = e
	s.pushFront(e)
	return e
}

func (s *shard) del(e *entry) {
	s.unlink(e)
	delete(s.m, e.key)
}

func (s *shard) unlink(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func (s *shard) pushFront(e *entry) {
	e.prev, e.next = &s.head, s.head.next
	e.next.prev = e
	s.head.next = e
}

var _ Store = (*Memory)(nil)

// has reports whether key has an entry, expired or not, without using it;
// for tests.
func (t *table) has(key string) bool {
	s := t.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[key] != nil
}
