package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDefaultResultsPath: inside the repository the results go to
// bench/results, which git ignores; outside it, to the temporary directory.
// Never into the working directory itself.
func TestDefaultResultsPath(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(wd, "..", "..")
	started := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct{ wd, want string }{
		{root, filepath.Join(root, "bench", "results", "latch-bench-20260102-030405.json")},
		{wd, filepath.Join(root, "bench", "results", "latch-bench-20260102-030405.json")},
		{t.TempDir(), filepath.Join(os.TempDir(), "latch-bench-20260102-030405.json")},
	} {
		if got := defaultResultsPath(filepath.Clean(tc.wd), started); filepath.Clean(got) != filepath.Clean(tc.want) {
			t.Errorf("defaultResultsPath(%s) = %s, want %s", tc.wd, got, tc.want)
		}
	}
	// The repository's default is ignored by git.
	out, err := exec.Command("git", "-C", root, "check-ignore", "-q", "bench/results/latch-bench-20260102-030405.json").CombinedOutput()
	if err != nil {
		if _, isExit := err.(*exec.ExitError); !isExit {
			t.Skipf("git: %v", err)
		}
		t.Errorf("bench/results is not ignored by git: %v %s", err, strings.TrimSpace(string(out)))
	}
}
