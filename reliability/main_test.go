package reliability

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

var (
	fullFlag    = flag.Bool("reliability.full", false, "full load: 10,000 concurrent connections (also LATCH_FULL=1)")
	summaryFlag = flag.Bool("summary", false, "print the figures table after the run")
)

// full reports whether the long variants were asked for.
func full() bool { return *fullFlag || os.Getenv("LATCH_FULL") == "1" }

// fdLimit is the RLIMIT_NOFILE soft limit after TestMain raised it.
var fdLimit uint64

// raiseFDLimit lifts the soft RLIMIT_NOFILE to the hard limit and, when the
// process may (root), the hard limit as well: every proxied connection costs
// six descriptors in this single process (client, two per sidecar, app), so
// 10,000 connections need about 60,000. The kernel's fs.nr_open bounds it.
func raiseFDLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	want := uint64(1 << 17)
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < want {
			want = n
		}
	}
	if lim.Max < want {
		try := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &try); err == nil {
			return want, nil
		}
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	return lim.Cur, nil
}

func TestMain(m *testing.M) {
	flag.Parse()
	n, err := raiseFDLimit()
	if err != nil {
		fmt.Fprintln(os.Stderr, "reliability: raising RLIMIT_NOFILE:", err)
	}
	fdLimit = n
	figure("environment", "RLIMIT_NOFILE (soft, after raise)", strconv.FormatUint(n, 10))
	figure("environment", "GOMAXPROCS", strconv.Itoa(runtime.GOMAXPROCS(0)))
	start := time.Now()
	code := m.Run()
	if code == 0 {
		// Every sidecar, app and source was shut down by its test's
		// cleanup: nothing of theirs may still run.
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "reliability: goroutines leaked:", err)
			code = 1
		}
	}
	figure("environment", "suite wall time", time.Since(start).Round(time.Second).String())
	headlines()
	if *summaryFlag {
		printFigures()
	}
	os.Exit(code)
}

// --- figures ---------------------------------------------------------------

type fig struct {
	section, name, value string
	order                int
}

var figures struct {
	sync.Mutex
	rows []fig
}

// figure records one line of the summary table. The same section and name
// recorded twice keeps the last value.
func figure(section, name, value string) {
	figures.Lock()
	defer figures.Unlock()
	for i, r := range figures.rows {
		if r.section == section && r.name == name {
			figures.rows[i].value = value
			return
		}
	}
	figures.rows = append(figures.rows, fig{section, name, value, len(figures.rows)})
}

func figuref(section, name, format string, args ...any) {
	figure(section, name, fmt.Sprintf(format, args...))
}

var sectionOrder = []string{"headline", "load", "faults", "hostile input", "scanner", "soak", "environment"}

func printFigures() {
	figures.Lock()
	rows := append([]fig(nil), figures.rows...)
	figures.Unlock()
	rank := func(s string) int {
		for i, x := range sectionOrder {
			if x == s {
				return i
			}
		}
		return len(sectionOrder)
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if a, b := rank(rows[i].section), rank(rows[j].section); a != b {
			return a < b
		}
		return rows[i].order < rows[j].order
	})
	fmt.Println()
	fmt.Println("| area | figure | value |")
	fmt.Println("|---|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s |\n", r.section, r.name, r.value)
	}
}

// --- headline ----------------------------------------------------------------

var (
	// bytesLost sums, over every test, the bytes sent that did not arrive
	// intact: corrupted, missing, or cut without the client being told.
	bytesLost atomic.Int64
	// silentCuts counts streams cut by a failure or a revocation that the
	// client saw end with a clean EOF.
	silentCuts atomic.Int64
	// verdicts: per area, how many tests passed and ran.
	verdicts sync.Map // area → *[2]atomic.Int64 {passed, ran}
)

// lose records n bytes lost; n ≤ 0 records nothing.
func lose(n int64) {
	if n > 0 {
		bytesLost.Add(n)
	}
}

// verdict counts t, when it ends, as one test of area, passed or not.
func verdict(t *testing.T, area string) {
	v, _ := verdicts.LoadOrStore(area, new([2]atomic.Int64))
	c := v.(*[2]atomic.Int64)
	t.Cleanup(func() {
		c[1].Add(1)
		if !t.Failed() && !t.Skipped() {
			c[0].Add(1)
		}
	})
}

func headlines() {
	for _, area := range []string{"load", "faults", "hostile input", "scanner", "soak"} {
		if v, ok := verdicts.Load(area); ok {
			c := v.(*[2]atomic.Int64)
			figuref("headline", area+": tests passed", "%d / %d", c[0].Load(), c[1].Load())
		}
	}
	figuref("headline", "bytes lost (sent on an allowed connection, not delivered intact)", "%d", bytesLost.Load())
	figuref("headline", "streams cut by a reset or revocation that the client saw end cleanly", "%d", silentCuts.Load())
}

// --- process figures -------------------------------------------------------

// rssKiB reads VmRSS of this process from /proc/self/status.
func rssKiB() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return -1
}

// openFDs counts this process's open file descriptors.
func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }
