package main

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

// TestCommandLineConventions runs every subcommand through main's run with
// command lines that cannot run, asking for help or for the version: usage
// errors exit 2 with the error printed once on stderr and nothing on stdout;
// help goes to stdout and exits 0. None of these starts anything.
func TestCommandLineConventions(t *testing.T) {
	decls := t.TempDir()
	for _, tc := range []struct {
		args   []string
		code   int
		stdout string // substring of stdout ("" = stdout must be empty)
		stderr string // substring of stderr, which must appear exactly once ("" = stderr must be empty)
	}{
		{args: nil, code: 2, stderr: "usage: latch <command>"},
		{args: []string{"--help"}, code: 0, stdout: "usage: latch <command>"},
		{args: []string{"-h"}, code: 0, stdout: "usage: latch <command>"},
		{args: []string{"help"}, code: 0, stdout: "usage: latch <command>"},
		{args: []string{"--version"}, code: 0, stdout: "latch "},
		{args: []string{"-version"}, code: 0, stdout: "latch "},
		{args: []string{"version"}, code: 0, stdout: "latch "},
		{args: []string{"version", "extra"}, code: 2, stderr: `unexpected arguments ["extra"]`},
		{args: []string{"bogus"}, code: 2, stderr: `unknown command "bogus"`},

		{args: []string{"proxy", "-h"}, code: 0, stdout: "usage: latch proxy"},
		{args: []string{"proxy", "--help"}, code: 0, stdout: "-workload-api"},
		{args: []string{"proxy", "--bogus"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"proxy"}, code: 2, stderr: "--config or --xds-address is required"},
		{args: []string{"proxy", "--config", "x.yaml", "extra"}, code: 2, stderr: `unexpected arguments ["extra"]`},
		{args: []string{"proxy", "--xds-address", "127.0.0.1:1"}, code: 2, stderr: "--xds-server-id"},
		{args: []string{"proxy", "--config", "x.yaml", "--tls-profile", "legacy"}, code: 2, stderr: "--tls-profile"},
		{args: []string{"proxy", "--config", "x.yaml", "--log-level", "loud"}, code: 2, stderr: `--log-level "loud"`},
		{args: []string{"proxy", "--config", "x.yaml", "--log-format", "xml"}, code: 2, stderr: `--log-format "xml"`},
		{args: []string{"proxy", "--drain-timeout", "soon", "--config", "x.yaml"}, code: 2, stderr: `invalid value "soon" for flag -drain-timeout`},
		{args: []string{"proxy", "--drain-timeout", "-5s", "--config", "x.yaml"}, code: 2, stderr: "--drain-timeout -5s: must not be negative"},
		{args: []string{"proxy", "--config", "x.yaml", "--admin-address", "bad"}, code: 2, stderr: `--admin-address "bad": want host:port`},
		{args: []string{"proxy", "--config", "x.yaml", "--admin-address", "127.0.0.1:99999"}, code: 2, stderr: `--admin-address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`},
		{args: []string{"proxy", "--config", "x.yaml", "--test-endpoint", "8443"}, code: 2, stderr: `--test-endpoint "8443": want host:port`},
		{args: []string{"proxy", "--xds-address", "cp:0", "--xds-server-id", "spiffe://x/cp"}, code: 2, stderr: `--xds-address "cp:0": want a host and a port other than 0`},

		{args: []string{"control-plane", "-h"}, code: 0, stdout: "usage: latch control-plane"},
		{args: []string{"control-plane", "--bogus"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"control-plane"}, code: 2, stderr: "give --declarations DIR, --kubernetes, or both"},
		{args: []string{"control-plane", "--declarations", decls, "extra"}, code: 2, stderr: `unexpected arguments ["extra"]`},
		{args: []string{"control-plane", "--declarations", decls, "--log-format", "xml"}, code: 2, stderr: `--log-format "xml"`},
		{args: []string{"control-plane", "--declarations", decls, "--tls-profile", "legacy"}, code: 2, stderr: "--tls-profile"},
		{args: []string{"control-plane", "--declarations", decls, "--trust-domains", "a/b"}, code: 2, stderr: "--trust-domains"},
		{args: []string{"control-plane", "--declarations", decls, "--inbound-host", "pod.local"}, code: 2, stderr: `--inbound-host "pod.local": want an IP address`},
		{args: []string{"control-plane", "--declarations", decls, "--workload-api", "unix:///a", "--workload-api-socket", "unix:///b"}, code: 2, stderr: "disagree"},
		{args: []string{"control-plane", "--declarations", decls, "--listen", "bad"}, code: 2, stderr: `--listen "bad": want host:port`},
		{args: []string{"control-plane", "--declarations", decls, "--admin-address", "127.0.0.1:http"}, code: 2, stderr: `--admin-address "127.0.0.1:http": port "http" is not a number`},

		{args: []string{"inject", "-h"}, code: 0, stdout: "usage: latch inject"},
		{args: []string{"inject", "--bogus"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"inject", "extra"}, code: 2, stderr: `unexpected arguments ["extra"]`},
		{args: []string{"inject", "--log-level", "loud"}, code: 2, stderr: `--log-level "loud"`},
		{args: []string{"inject", "--tls-profile", "legacy"}, code: 2, stderr: "--tls-profile"},
		{args: []string{"inject", "--cert-reload-interval", "0s"}, code: 2, stderr: "--cert-reload-interval 0s: must be positive"},
		{args: []string{"inject", "--listen", "9443"}, code: 2, stderr: `--listen "9443": want host:port`},

		{args: []string{"check", "-h"}, code: 0, stdout: "exit codes:"},
		{args: []string{"check", "--bogus", "127.0.0.1:1"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"check"}, code: 2, stderr: "want exactly one HOST:PORT, got none"},
		{args: []string{"check", "127.0.0.1:99999"}, code: 2, stderr: `"127.0.0.1:99999": port "99999" is not a number from 1 to 65535`},
		{args: []string{"check", "[::1]:0"}, code: 2, stderr: `port "0" is not a number from 1 to 65535`},
		{args: []string{"check", "127.0.0.1"}, code: 2, stderr: `"127.0.0.1": want HOST:PORT`},
		{args: []string{"check", "127.0.0.1:"}, code: 2, stderr: `"127.0.0.1:": want HOST:PORT with both parts`},
		{args: []string{"check", "127.0.0.1:1", "127.0.0.1:2"}, code: 2, stderr: "want exactly one HOST:PORT"},
		{args: []string{"check", "--profile=old", "127.0.0.1:1"}, code: 2, stderr: "--profile"},
		{args: []string{"check", "127.0.0.1:1", "--server-id", "https://x"}, code: 2, stderr: "--server-id"},
		{args: []string{"check", "--timeout", "0s", "127.0.0.1:1"}, code: 2, stderr: "--timeout 0s: must be positive"},

		{args: []string{"demo", "-h"}, code: 0, stdout: "usage: latch demo"},
		{args: []string{"demo", "--bogus"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"demo", "extra"}, code: 2, stderr: `unexpected arguments ["extra"]`},
	} {
		t.Run(strings.Join(append([]string{"latch"}, tc.args...), " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string(nil), tc.args...), &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout.String(), stderr.String())
			}
			if tc.stdout == "" && stdout.Len() > 0 {
				t.Errorf("stdout not empty: %s", stdout.String())
			}
			if tc.stdout != "" && !strings.Contains(stdout.String(), tc.stdout) {
				t.Errorf("stdout lacks %q: %s", tc.stdout, stdout.String())
			}
			if tc.stderr == "" && stderr.Len() > 0 {
				t.Errorf("stderr not empty: %s", stderr.String())
			}
			if tc.stderr != "" {
				if n := strings.Count(stderr.String(), tc.stderr); n != 1 {
					t.Errorf("stderr has %q %d times, want once: %s", tc.stderr, n, stderr.String())
				}
			}
			if code == exitUsage && len(tc.args) > 0 && !strings.Contains(stderr.String(), "-h") && !strings.Contains(stderr.String(), "--help") {
				t.Errorf("a usage error does not point at the help: %s", stderr.String())
			}
		})
	}
}

// TestVersionFromBuildInfo: a release build's -X version wins; without it,
// the module version or VCS revision the toolchain recorded is reported.
func TestVersionFromBuildInfo(t *testing.T) {
	const rev = "0123456789abcdef0123456789abcdef01234567"
	bi := func(mainVersion string, settings ...debug.BuildSetting) *debug.BuildInfo {
		return &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Path: "latch.dev/latch", Version: mainVersion}, Settings: settings}
	}
	vcs := []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: "false"}}
	dirty := []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: "true"}}
	for _, tc := range []struct {
		name, ldflags string
		bi            *debug.BuildInfo
		want, line    string
	}{
		{"release build", "v1.2.3", bi("(devel)", vcs...), "v1.2.3", "v1.2.3 (revision " + rev + ", go1.26.0 "},
		{"tagged module", "", bi("v1.2.3"), "v1.2.3", "v1.2.3 (go1.26.0 "},
		{"pseudo-version from VCS", "", bi("v0.0.0-20260101120000-0123456789ab", vcs...), "v0.0.0-20260101120000-0123456789ab", "(revision " + rev + ", go1.26.0 "},
		{"Dockerfile default", "dev", bi("v0.0.0-20260101120000-0123456789ab+dirty", dirty...), "v0.0.0-20260101120000-0123456789ab+dirty", "(revision " + rev + " (modified), go1.26.0 "},
		{"revision only", "", bi("(devel)", dirty...), "(devel) 0123456789ab+dirty", "(revision " + rev + " (modified), "},
		{"nothing recorded", "", bi("(devel)"), "(devel)", "(devel) (go1.26.0 "},
		{"no build info", "", nil, "unknown", "unknown (" + runtime.Version()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := versionFrom(tc.ldflags, tc.bi); got != tc.want {
				t.Errorf("version %q, want %q", got, tc.want)
			}
			if got := versionLineOf(tc.ldflags, tc.bi); !strings.Contains(got, tc.line) || !strings.HasPrefix(got, tc.want) {
				t.Errorf("version line %q, want it to start with %q and contain %q", got, tc.want, tc.line)
			}
		})
	}
}

// TestVersionOfARealBuild builds latch without -X main.version and checks
// that --version and `latch version` report what the toolchain recorded in
// the binary (go version -m), never "dev".
func TestVersionOfARealBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "latch")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	info, err := exec.Command("go", "version", "-m", bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	var modVersion, rev string
	for _, line := range strings.Split(string(info), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[0] == "mod":
			modVersion = f[2]
		case len(f) == 2 && f[0] == "build" && strings.HasPrefix(f[1], "vcs.revision="):
			rev = strings.TrimPrefix(f[1], "vcs.revision=")
		}
	}
	for _, args := range [][]string{{"--version"}, {"version"}} {
		out, err := exec.Command(bin, args...).Output()
		if err != nil {
			t.Fatalf("latch %v: %v", args, err)
		}
		got := strings.TrimSpace(string(out))
		if strings.Contains(got, "dev ") || !strings.HasPrefix(got, "latch ") {
			t.Errorf("latch %v = %q", args, got)
		}
		if modVersion != "(devel)" && !strings.HasPrefix(got, "latch "+modVersion) {
			t.Errorf("latch %v = %q, want the module version %s", args, got, modVersion)
		}
		if rev != "" && !strings.Contains(got, rev) {
			t.Errorf("latch %v = %q, want the VCS revision %s", args, got, rev)
		}
		t.Logf("latch %v: %s (module version %s, revision %q)", args, got, modVersion, rev)
	}
}
