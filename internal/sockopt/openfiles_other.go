//go:build !unix

package sockopt

// OpenFilesLimit: no per-process descriptor limit is known here.
func OpenFilesLimit() uint64 { return 0 }
