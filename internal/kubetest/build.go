package kubetest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Tools are the paths of the binaries a cluster runs.
type Tools struct {
	APIServer string
	Etcd      string
	// Version is the Kubernetes version the API server reports.
	Version string
}

// toolsDir is the tools module, found from this file's place in the source
// tree: tests always run with the source at hand.
func toolsDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("locating the kubetest tools module: no caller information")
	}
	dir := filepath.Join(filepath.Dir(file), "tools")
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		return "", fmt.Errorf("locating the kubetest tools module: %w", err)
	}
	return dir, nil
}

// kubeVersion reads the k8s.io/kubernetes version the tools module requires.
func kubeVersion(gomod []byte) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(gomod))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "k8s.io/kubernetes" {
			return f[1], nil
		}
		if len(f) >= 3 && f[0] == "require" && f[1] == "k8s.io/kubernetes" {
			return f[2], nil
		}
	}
	return "", errors.New("the kubetest tools module does not require k8s.io/kubernetes")
}

// Binaries returns the kube-apiserver and etcd binaries, building them on
// first use. progress, if not nil, is told what is being built and how long
// it took; the go command's own output goes there too.
func Binaries(ctx context.Context, progress io.Writer) (Tools, error) {
	if progress == nil {
		progress = io.Discard
	}
	if dir := os.Getenv("LATCH_KUBE_TOOLS"); dir != "" {
		t := Tools{APIServer: filepath.Join(dir, "kube-apiserver"), Etcd: filepath.Join(dir, "etcd")}
		for _, p := range []string{t.APIServer, t.Etcd} {
			if _, err := os.Stat(p); err != nil {
				return Tools{}, fmt.Errorf("LATCH_KUBE_TOOLS: %w", err)
			}
		}
		out, err := exec.CommandContext(ctx, t.APIServer, "--version").Output()
		if err != nil {
			return Tools{}, fmt.Errorf("LATCH_KUBE_TOOLS: asking %s its version: %w", t.APIServer, err)
		}
		t.Version = strings.TrimPrefix(strings.TrimSpace(string(out)), "Kubernetes ")
		return t, nil
	}
	mod, err := toolsDir()
	if err != nil {
		return Tools{}, err
	}
	gomod, err := os.ReadFile(filepath.Join(mod, "go.mod"))
	if err != nil {
		return Tools{}, fmt.Errorf("reading the kubetest tools module: %w", err)
	}
	gosum, err := os.ReadFile(filepath.Join(mod, "go.sum"))
	if err != nil {
		return Tools{}, fmt.Errorf("reading the kubetest tools module: %w", err)
	}
	version, err := kubeVersion(gomod)
	if err != nil {
		return Tools{}, err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return Tools{}, fmt.Errorf("building kube-apiserver needs the go command: %w", err)
	}
	goVersion, err := exec.CommandContext(ctx, goBin, "env", "GOVERSION").Output()
	if err != nil {
		return Tools{}, fmt.Errorf("asking the go command its version: %w", err)
	}

	// The key changes with anything that changes the binaries.
	h := sha256.New()
	for _, b := range [][]byte{gomod, gosum, bytes.TrimSpace(goVersion), []byte(runtime.GOOS + "/" + runtime.GOARCH)} {
		h.Write(b)
		h.Write([]byte{0})
	}
	base, err := os.UserCacheDir()
	if err != nil {
		return Tools{}, fmt.Errorf("finding a cache directory for the kubetest binaries: %w", err)
	}
	dir := filepath.Join(base, "latch", "kubetest", version+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Tools{}, fmt.Errorf("creating the kubetest cache: %w", err)
	}
	t := Tools{APIServer: filepath.Join(dir, "kube-apiserver"), Etcd: filepath.Join(dir, "etcd"), Version: version}

	unlock, err := lock(ctx, filepath.Join(dir, ".lock"), progress)
	if err != nil {
		return Tools{}, err
	}
	defer unlock()

	// The -X flags stamp the version the API server reports: without them
	// it says v0.0.0-master and helm refuses kubeVersion constraints.
	minor := ""
	if parts := strings.SplitN(strings.TrimPrefix(version, "v"), ".", 3); len(parts) >= 2 {
		minor = parts[1]
	}
	stamp := strings.Join([]string{
		"-X k8s.io/component-base/version.gitVersion=" + version,
		"-X k8s.io/client-go/pkg/version.gitVersion=" + version,
		"-X k8s.io/component-base/version.gitMajor=1",
		"-X k8s.io/component-base/version.gitMinor=" + minor,
	}, " ")
	builds := []struct {
		out, pkg string
		ldflags  string
		note     string
	}{
		{t.Etcd, "go.etcd.io/etcd/server/v3", "", "about a minute"},
		{t.APIServer, "k8s.io/kubernetes/cmd/kube-apiserver", stamp, "10–30 minutes on two cores the first time"},
	}
	for _, b := range builds {
		if _, err := os.Stat(b.out); err == nil {
			continue
		}
		fmt.Fprintf(progress, "kubetest: building %s (%s) into %s (%s)\n", filepath.Base(b.out), b.pkg, dir, b.note)
		start := time.Now()
		tmp := b.out + ".tmp"
		args := []string{"build", "-o", tmp}
		if b.ldflags != "" {
			args = append(args, "-ldflags", b.ldflags)
		}
		cmd := exec.CommandContext(ctx, goBin, append(args, b.pkg)...)
		cmd.Dir = mod
		cmd.Stdout, cmd.Stderr = progress, progress
		// The tools module is built for this machine as a program of its
		// own: flags meant for the tests (-race, a cover mode) and a
		// workspace do not apply to it.
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly", "GOWORK=off", "CGO_ENABLED=0")
		if err := cmd.Run(); err != nil {
			os.Remove(tmp)
			return Tools{}, fmt.Errorf("building %s in %s: %w", b.pkg, mod, err)
		}
		if err := os.Rename(tmp, b.out); err != nil {
			return Tools{}, fmt.Errorf("installing %s: %w", b.out, err)
		}
		fmt.Fprintf(progress, "kubetest: built %s in %s\n", filepath.Base(b.out), time.Since(start).Round(time.Second))
	}
	return t, nil
}

// lock takes an exclusive lock on path, waiting for another process's build
// to finish if need be, and returns its release.
func lock(ctx context.Context, path string, progress io.Writer) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening the kubetest build lock: %w", err)
	}
	said := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if !said {
			fmt.Fprintf(progress, "kubetest: another process is building the binaries; waiting for %s\n", path)
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for the kubetest build lock: %w", ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
