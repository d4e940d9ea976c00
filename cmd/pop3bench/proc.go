package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// procStat is what pop3bench reads from /proc/<pid>/stat.
type procStat struct {
	ppid       int
	utime      uint64 // clock ticks
	stime      uint64
	numThreads int
}

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	// "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): field n is f[n-3].
	if len(f) < 18 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var s procStat
	s.ppid, _ = strconv.Atoi(f[1])
	s.utime, _ = strconv.ParseUint(f[11], 10, 64)
	s.stime, _ = strconv.ParseUint(f[12], 10, 64)
	s.numThreads, _ = strconv.Atoi(f[17])
	return s, nil
}

// cpuTicks is the sum of utime+stime of pids.
func cpuTicks(pids []int) (uint64, error) {
	var sum uint64
	for _, pid := range pids {
		s, err := readStat(pid)
		if err != nil {
			return 0, err
		}
		sum += s.utime + s.stime
	}
	return sum, nil
}

// rssKiB is the sum of VmRSS of pids, from /proc/<pid>/status.
func rssKiB(pids []int) (uint64, error) {
	var sum uint64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return 0, err
		}
		found := false
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				f := strings.Fields(rest) // "12345 kB"
				if len(f) == 0 {
					break
				}
				v, err := strconv.ParseUint(f[0], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("/proc/%d/status VmRSS: %w", pid, err)
				}
				sum += v
				found = true
				break
			}
		}
		if !found {
			return 0, fmt.Errorf("/proc/%d/status: no VmRSS (zombie?)", pid)
		}
	}
	return sum, nil
}

// fdCount is what file descriptors a set of processes has open.
type fdCount struct{ total, sockets, pipes int }

// openFDs counts the open file descriptors of pids, by kind.
func openFDs(pids []int) (fdCount, error) {
	var c fdCount
	for _, pid := range pids {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		ents, err := os.ReadDir(dir)
		if err != nil {
			return c, err
		}
		c.total += len(ents)
		for _, e := range ents {
			target, err := os.Readlink(filepath.Join(dir, e.Name()))
			if err != nil {
				continue // closed meanwhile
			}
			switch {
			case strings.HasPrefix(target, "socket:"):
				c.sockets++
			case strings.HasPrefix(target, "pipe:"):
				c.pipes++
			}
		}
	}
	return c, nil
}

// children lists the direct children of pid.
func children(pid int) []int {
	// /proc/<pid>/task/<pid>/children is cheap but only lists children of
	// that thread; nginx's master is single-threaded, so it is complete.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err == nil {
		var out []int
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
		return out
	}
	// Fallback: scan /proc.
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if s, err := readStat(c); err == nil && s.ppid == pid {
			out = append(out, c)
		}
	}
	return out
}

// fdLimit is this process's RLIMIT_NOFILE (soft, hard).
func fdLimit() (uint64, uint64) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0
	}
	return rl.Cur, rl.Max
}

// procFDLimit reads "Max open files" (soft) of pid.
func procFDLimit(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "limits"))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "Max open files") {
			f := strings.Fields(strings.TrimPrefix(line, "Max open files"))
			if len(f) > 0 {
				return f[0]
			}
		}
	}
	return "?"
}

// machineBusyTicks is the CPU time the whole machine spent busy (user,
// nice, system, irq, softirq, steal), in clock ticks summed over CPUs, from
// the first line of /proc/stat.
func machineBusyTicks() (uint64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	// cpu user nice system idle iowait irq softirq steal ...
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		busy += v
	}
	return busy, nil
}
