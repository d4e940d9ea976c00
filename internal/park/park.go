// Package park lets a quiet TCP connection wait for its peer without a
// goroutine of its own: one epoll set and one goroutine serve every
// connection parked in a Parker, so a parked connection costs a map entry
// instead of a goroutine stack, which is most of what an idle proxied
// session would otherwise hold. Only Linux has it (see Supported);
// elsewhere Park fails and callers keep their goroutines.
package park

// Waker is what a Parker wakes, once, when a parked connection has data or
// its peer hung up. Wake runs on the Parker's one goroutine, which every
// other parked connection waits on: it must hand the connection to a
// goroutine of its own rather than read from it.
type Waker interface {
	Wake()
}
