//go:build unix

package sockopt

import "golang.org/x/sys/unix"

// OpenFilesLimit is the soft RLIMIT_NOFILE (Go raises it to the hard limit
// at start-up); 0 when unknown or unlimited.
func OpenFilesLimit() uint64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == unix.RLIM_INFINITY {
		return 0
	}
	return uint64(rl.Cur)
}
