//go:build !unix

package pop3

// openFilesLimit: no per-process descriptor limit is known here.
func openFilesLimit() uint64 { return 0 }
