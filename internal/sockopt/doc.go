// Package sockopt reads what the kernel knows of a socket or the process:
// bytes queued, TCP_INFO byte counts and state, the open files limit; and it
// duplicates a socket. Everything has a fallback for systems without it.
package sockopt
