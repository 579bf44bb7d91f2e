package latch_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// helmVersion is what the tests install when no helm is found (the Makefile's
// `tools` target installs the same).
const helmVersion = "v3.22.0"

var (
	helmOnce sync.Once
	helmPath string
	helmErr  string
)

// helm returns the path of a helm binary: on PATH, in $(go env GOPATH)/bin,
// or freshly installed there with `go install`. Without one the test is
// skipped locally, but fails in CI, where a silently skipped chart test
// would pass a broken chart.
func helm(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		if p, err := exec.LookPath("helm"); err == nil {
			helmPath = p
			return
		}
		gopath, err := exec.Command("go", "env", "GOPATH").Output()
		if err != nil {
			helmErr = "go env GOPATH: " + err.Error()
			return
		}
		bin := filepath.Join(strings.Split(strings.TrimSpace(string(gopath)), string(os.PathListSeparator))[0], "bin")
		cand := filepath.Join(bin, "helm")
		if _, err := os.Stat(cand); err == nil {
			helmPath = cand
			return
		}
		cmd := exec.Command("go", "install", "helm.sh/helm/v3/cmd/helm@"+helmVersion)
		cmd.Env = append(os.Environ(), "GOBIN="+bin)
		if out, err := cmd.CombinedOutput(); err != nil {
			helmErr = "go install helm " + helmVersion + ": " + err.Error() + "\n" + string(out)
			return
		}
		helmPath = cand
	})
	if helmPath == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("helm is required in CI: %s", helmErr)
		}
		t.Skipf("helm not available: %s", helmErr)
	}
	return helmPath
}

// runHelm runs helm with args in the chart's directory.
func runHelm(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command(helm(t), args...)
	cmd.Dir = chartDir(t)
	// Keep helm away from the user's repositories, caches and kubeconfig.
	home := t.TempDir()
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "kubeconfig"),
	)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

func chartDir(t *testing.T) string {
	t.Helper()
	return filepath.Join(repoRoot(t), "charts", "latch")
}
