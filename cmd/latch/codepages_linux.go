package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// unmapStartupCode drops this process's mappings of its own executable's
// read-only segments (code, read-only data, the function tables) and returns
// how many bytes they span.
//
// Why: a page fault on a file mapping maps the 64 KiB around it (the
// kernel's fault-around), and package initialisation runs code from nearly
// every package of the binary, so by the end of start-up about 20 MB of code
// and tables are mapped that the sidecar never runs again: most of an idle
// sidecar's resident set, and mapped executable pages are the last the
// kernel reclaims. After MADV_DONTNEED the pages the proxy does run come back
// on first use as minor faults from the page cache (no I/O: the file stays
// cached, and it is one copy for every latch on the node).
//
// Only read-only mappings are touched: MADV_DONTNEED on a written private
// page would throw the write away, so writable ones (.data, .bss, the heap)
// are skipped by construction.
func unmapStartupCode() (int, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("finding the executable: %w", err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("reading the memory map: %w", err)
	}
	defer f.Close()
	total := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// address perms offset dev inode pathname
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || strings.Join(fields[5:], " ") != exe || strings.ContainsRune(fields[1], 'w') {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if !ok || err1 != nil || err2 != nil || end <= start {
			return total, fmt.Errorf("reading the memory map: bad range %q", fields[0])
		}
		// unix.Madvise wants a []byte; building one over our own code from
		// an integer address is what the raw call avoids.
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_DONTNEED); errno != 0 {
			return total, fmt.Errorf("unmapping %s %s: %w", fields[0], fields[1], errno)
		}
		total += int(end - start)
	}
	if err := sc.Err(); err != nil {
		return total, fmt.Errorf("reading the memory map: %w", err)
	}
	return total, nil
}
