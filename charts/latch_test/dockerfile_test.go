package latch_test

import (
	"bufio"
	"bytes"
	"debug/elf"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// No Docker engine runs where the tests do, so this checks what can be
// checked without one: the Dockerfile's shape, that the build context its
// .dockerignore leaves is enough to build, and that the binary built with
// exactly the Dockerfile's command is static and runs.

// instruction is one Dockerfile instruction with its continuation lines
// joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, ...
	args string
	line int
}

type stage struct {
	from  string // image reference
	name  string
	instr []instruction
}

func parseDockerfile(t *testing.T, path string) []stage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		stages []stage
		cur    strings.Builder
		start  int
	)
	flush := func() {
		s := strings.TrimSpace(cur.String())
		cur.Reset()
		if s == "" {
			return
		}
		cmd, args, _ := strings.Cut(s, " ")
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		if in.cmd == "FROM" {
			fields := strings.Fields(in.args)
			var st stage
			for i := 0; i < len(fields); i++ {
				switch {
				case strings.HasPrefix(fields[i], "--"):
				case strings.EqualFold(fields[i], "AS") && i+1 < len(fields):
					st.name = fields[i+1]
					i++
				default:
					st.from = fields[i]
				}
			}
			stages = append(stages, st)
		}
		if len(stages) == 0 {
			if in.cmd != "ARG" {
				t.Fatalf("%s:%d: %s before the first FROM", path, in.line, in.cmd)
			}
			return
		}
		stages[len(stages)-1].instr = append(stages[len(stages)-1].instr, in)
	}
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if cur.Len() == 0 {
			start = n
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		flush()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	flush()
	return stages
}

// buildCommand finds the RUN line that builds latch and splits it the way
// sh would (enough for assignments, words and double-quoted strings).
func buildCommand(t *testing.T, st stage) (env map[string]string, goArgs []string) {
	t.Helper()
	for _, in := range st.instr {
		if in.cmd != "RUN" || !strings.Contains(in.args, "go build") {
			continue
		}
		words := shellWords(t, in.args)
		env = map[string]string{}
		i := 0
		for ; i < len(words) && regexp.MustCompile(`^[A-Z_][A-Z0-9_]*=`).MatchString(words[i]); i++ {
			k, v, _ := strings.Cut(words[i], "=")
			env[k] = v
		}
		if i+1 >= len(words) || words[i] != "go" || words[i+1] != "build" {
			t.Fatalf("Dockerfile:%d: build line is not `[VAR=value...] go build ...`: %q", in.line, in.args)
		}
		return env, words[i+1:]
	}
	t.Fatal("Dockerfile: no RUN ... go build line in the build stage")
	return nil, nil
}

func shellWords(t *testing.T, s string) []string {
	t.Helper()
	var (
		words  []string
		cur    strings.Builder
		inQ    bool
		inWord bool
	)
	for _, r := range s {
		switch {
		case r == '"':
			inQ, inWord = !inQ, true
		case !inQ && (r == ' ' || r == '\t'):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case !inQ && strings.ContainsRune("'|&;<>()`", r):
			t.Fatalf("build line uses shell syntax %q this test does not model: %s", r, s)
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inQ {
		t.Fatalf("unbalanced quote in %s", s)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

func TestDockerfile(t *testing.T) {
	root := repoRoot(t)
	stages := parseDockerfile(t, filepath.Join(root, "Dockerfile"))
	if len(stages) < 2 {
		t.Fatalf("want a multi-stage build, got %d stage(s)", len(stages))
	}
	build, final := stages[0], stages[len(stages)-1]
	if !strings.HasPrefix(build.from, "golang:1.26") {
		t.Errorf("build stage FROM %q, want golang:1.26", build.from)
	}
	if final.from != "gcr.io/distroless/static-debian12:nonroot" && final.from != "scratch" {
		t.Errorf("final stage FROM %q, want distroless static nonroot or scratch", final.from)
	}

	var user, entrypoint string
	for _, in := range final.instr {
		switch in.cmd {
		case "RUN", "SHELL":
			// Neither base has a shell; a RUN here would mean one was added.
			t.Errorf("Dockerfile:%d: %s in the final stage", in.line, in.cmd)
		case "COPY", "ADD":
			if !strings.Contains(in.args, "--from="+build.name) {
				t.Errorf("Dockerfile:%d: final stage copies from the build context, not the build stage: %s", in.line, in.args)
			}
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		}
	}
	if !regexp.MustCompile(`^[1-9][0-9]*:[1-9][0-9]*$`).MatchString(user) {
		t.Errorf("final USER %q, want numeric non-root uid:gid", user)
	}
	if entrypoint != `["/latch"]` {
		t.Errorf("ENTRYPOINT %s, want exec form [\"/latch\"]", entrypoint)
	}

	env, goArgs := buildCommand(t, build)
	if env["CGO_ENABLED"] != "0" {
		t.Errorf("build env %v: want CGO_ENABLED=0", env)
	}
	joined := strings.Join(goArgs, " ")
	for _, want := range []string{"-trimpath", "-ldflags", "-s -w", "-X main.version=${VERSION}", "./cmd/latch"} {
		if !strings.Contains(joined, want) {
			t.Errorf("build command %q lacks %q", joined, want)
		}
	}
}

func TestDockerBuildProducesStaticBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the whole binary")
	}
	root := repoRoot(t)
	stages := parseDockerfile(t, filepath.Join(root, "Dockerfile"))
	env, goArgs := buildCommand(t, stages[0])

	// The context Docker would send, filtered by .dockerignore.
	ctxDir := t.TempDir()
	ignore := readDockerignore(t, filepath.Join(root, ".dockerignore"))
	copied := 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		if ignore.excluded(rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		dst := filepath.Join(ctxDir, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		copied++
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, need := range []string{"go.mod", "go.sum", "cmd/latch/main.go"} {
		if _, err := os.Stat(filepath.Join(ctxDir, need)); err != nil {
			t.Fatalf(".dockerignore drops %s", need)
		}
	}
	for _, gone := range []string{".git", "charts"} {
		if _, err := os.Stat(filepath.Join(ctxDir, gone)); err == nil {
			t.Errorf(".dockerignore keeps %s in the build context", gone)
		}
	}

	const version = "v9.8.7-test"
	out := filepath.Join(t.TempDir(), "latch")
	vars := map[string]string{"VERSION": version, "TARGETOS": runtime.GOOS, "TARGETARCH": runtime.GOARCH}
	expand := func(s string) string {
		return os.Expand(s, func(k string) string {
			v, ok := vars[k]
			if !ok {
				t.Fatalf("build line uses $%s, which this test does not know", k)
			}
			return v
		})
	}
	args := make([]string, 0, len(goArgs))
	for i := 0; i < len(goArgs); i++ {
		if goArgs[i] == "-o" && i+1 < len(goArgs) {
			args = append(args, "-o", out)
			i++
			continue
		}
		args = append(args, expand(goArgs[i]))
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = ctxDir
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+expand(v))
	}
	t.Logf("building %d context files: %s go %s", copied, envString(env, expand), strings.Join(args, " "))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a %s program header: not static", p.Type)
		}
	}
	for _, name := range []string{".dynamic", ".interp", ".symtab"} {
		if f.Section(name) != nil {
			t.Errorf("binary has section %s (want static and stripped)", name)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("binary links %v", libs)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(bin, []byte(ctxDir)) {
		t.Error("binary contains the build directory: -trimpath not in effect")
	}

	got, err := exec.Command(out, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("latch version: %v\n%s", err, got)
	}
	// "latch <version> (<toolchain and platform>)": the version is the one
	// the build line stamped.
	if f := strings.Fields(string(got)); len(f) < 2 || f[0] != "latch" || f[1] != version {
		t.Errorf("latch version printed %q, want %q first", got, "latch "+version)
	}
}

func envString(env map[string]string, expand func(string) string) string {
	var parts []string
	for k, v := range env {
		parts = append(parts, k+"="+expand(v))
	}
	return strings.Join(parts, " ")
}

// dockerignore is the subset of Docker's .dockerignore rules this repository
// uses: patterns relative to the context root, * and ? within a segment, **
// across segments, ! to re-include, last match wins; a pattern matching a
// directory excludes everything below it.
type dockerignore []struct {
	re     *regexp.Regexp
	negate bool
}

func readDockerignore(t *testing.T, path string) dockerignore {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d dockerignore
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		neg := strings.HasPrefix(line, "!")
		line = strings.Trim(strings.TrimPrefix(line, "!"), "/")
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(line); i++ {
			switch {
			case strings.HasPrefix(line[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(line[i:], "**"):
				re.WriteString(".*")
				i++
			case line[i] == '*':
				re.WriteString("[^/]*")
			case line[i] == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(line[i : i+1]))
			}
		}
		re.WriteString("(/.*)?$")
		d = append(d, struct {
			re     *regexp.Regexp
			negate bool
		}{regexp.MustCompile(re.String()), neg})
	}
	return d
}

func (d dockerignore) excluded(rel string) bool {
	ex := false
	for _, p := range d {
		if p.re.MatchString(rel) {
			ex = !p.negate
		}
	}
	return ex
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// TestMakefileBuildsLikeTheDockerfile: `make build` and the image build
// the same binary (the Makefile says to keep them in step; this keeps them).
func TestMakefileBuildsLikeTheDockerfile(t *testing.T) {
	root := repoRoot(t)
	stages := parseDockerfile(t, filepath.Join(root, "Dockerfile"))
	env, goArgs := buildCommand(t, stages[0])
	var dockerLD string
	for i, a := range goArgs {
		if a == "-ldflags" && i+1 < len(goArgs) {
			dockerLD = goArgs[i+1]
		}
	}
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^LDFLAGS\s*:?=\s*(.+)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("Makefile defines no LDFLAGS")
	}
	makeLD := strings.ReplaceAll(strings.TrimSpace(string(m[1])), "$(VERSION)", "${VERSION}")
	if makeLD != dockerLD {
		t.Errorf("Makefile LDFLAGS %q, Dockerfile -ldflags %q", makeLD, dockerLD)
	}
	build := regexp.MustCompile(`(?m)^build:\n\t(.+)$`).FindSubmatch(mk)
	if build == nil {
		t.Fatal("Makefile has no build target")
	}
	for _, want := range []string{"CGO_ENABLED=" + env["CGO_ENABLED"], "-trimpath", `-ldflags "$(LDFLAGS)"`, "./cmd/latch"} {
		if !strings.Contains(string(build[1]), want) {
			t.Errorf("make build %q lacks %q", build[1], want)
		}
	}
}
