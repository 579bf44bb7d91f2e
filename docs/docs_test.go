// Package docs holds no code: its tests keep the repository consistent with
// itself. The Markdown stands alone (no references to anything outside the
// repository, no planning vocabulary) and its relative links point at files
// that exist; the Makefile's fuzz step names every fuzz target there is.
package docs

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// outside matches references to material that is not part of the
// repository: documents kept outside it, and issue numbers.
var outside = regexp.MustCompile(`\.\./shared|shared/[s]eeds|DESIGN\.md|[Tt]he seed (TLS )?policy|issue's cadence|\b[Ii]ssue #?[0-9]+\b`)

// link matches a Markdown inline link's target.
var link = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// trackedFiles lists the repository's tracked files with the given suffix.
func trackedFiles(t *testing.T, suffix string) []string {
	t.Helper()
	out, err := exec.Command("git", "-C", "..", "ls-files", "-z").Output()
	if err != nil {
		t.Skipf("git ls-files: %v (not a git checkout)", err)
	}
	var files []string
	for _, f := range strings.Split(string(out), "\x00") {
		if strings.HasSuffix(f, suffix) {
			files = append(files, filepath.Join("..", f))
		}
	}
	return files
}

func TestDocsStandAlone(t *testing.T) {
	var files []string
	for _, suffix := range []string{".md", ".go", ".yaml", ".tpl", "Makefile", "Dockerfile"} {
		files = append(files, trackedFiles(t, suffix)...)
	}
	if len(files) == 0 {
		t.Fatal("no files found")
	}
	for _, f := range files {
		if strings.HasSuffix(f, "docs_test.go") {
			continue // the patterns themselves
		}
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for n := 1; sc.Scan(); n++ {
			if m := outside.FindString(sc.Text()); m != "" {
				t.Errorf("%s:%d: refers to something outside the repository (%q): say it in the repository's own words", f, n, m)
			}
		}
		fh.Close()
	}
}

func TestMarkdownLinksResolve(t *testing.T) {
	for _, f := range trackedFiles(t, ".md") {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		inFence := false
		for n, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "```") {
				inFence = !inFence
			}
			if inFence {
				continue
			}
			for _, m := range link.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "#") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				target, _, _ = strings.Cut(target, "#")
				p := filepath.Join(filepath.Dir(f), target)
				if _, err := os.Stat(p); err != nil {
					t.Errorf("%s:%d: link %q: %v", f, n+1, m[1], err)
				}
				if rel, err := filepath.Rel("..", p); err != nil || strings.HasPrefix(rel, "..") {
					t.Errorf("%s:%d: link %q leaves the repository", f, n+1, m[1])
				}
			}
		}
	}
}

// TestMakefileFuzzesEveryTarget: a fuzz target missing from FUZZ_TARGETS
// would never fuzz in CI (its seeds still run as tests, which hides it).
func TestMakefileFuzzesEveryTarget(t *testing.T) {
	mk, err := os.ReadFile(filepath.Join("..", "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^FUZZ_TARGETS := ((?:.*\\\n)*.*)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("no FUZZ_TARGETS in the Makefile")
	}
	listed := map[string]bool{}
	for _, f := range strings.Fields(strings.ReplaceAll(string(m[1]), "\\", "")) {
		listed[f] = true
	}
	fuzzFunc := regexp.MustCompile(`(?m)^func (Fuzz\w+)\(f \*testing\.F\)`)
	found := 0
	for _, f := range trackedFiles(t, "_test.go") {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel("..", filepath.Dir(f))
		for _, fm := range fuzzFunc.FindAllSubmatch(b, -1) {
			found++
			target := "./" + filepath.ToSlash(rel) + ":" + string(fm[1])
			if !listed[target] {
				t.Errorf("%s is not in the Makefile's FUZZ_TARGETS", target)
			}
			delete(listed, target)
		}
	}
	if found == 0 {
		t.Fatal("no fuzz targets found")
	}
	for target := range listed {
		t.Errorf("FUZZ_TARGETS lists %s, which does not exist", target)
	}
}
