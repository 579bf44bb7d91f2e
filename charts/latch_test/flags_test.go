package latch_test

import (
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"latch.dev/latch/inject"
	"latch.dev/latch/internal/kubetest"
)

var (
	latchOnce sync.Once
	latchBin  string
	latchErr  string
)

func TestMain(m *testing.M) {
	// client-go logs through klog; the tests say what matters.
	klog.SetSlogLogger(slog.New(slog.DiscardHandler))
	code := kubetest.Main(m)
	if latchBin != "" {
		os.RemoveAll(filepath.Dir(latchBin))
	}
	os.Exit(code)
}

// latchBinary builds cmd/latch once per test run.
func latchBinary(t *testing.T) string {
	t.Helper()
	latchOnce.Do(func() {
		dir, err := os.MkdirTemp("", "latch-flags-")
		if err != nil {
			latchErr = err.Error()
			return
		}
		bin := filepath.Join(dir, "latch")
		cmd := exec.Command("go", "build", "-o", bin, "./cmd/latch")
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			latchErr = "go build ./cmd/latch: " + err.Error() + "\n" + string(out)
			return
		}
		latchBin = bin
	})
	if latchBin == "" {
		t.Fatal(latchErr)
	}
	return latchBin
}

// acceptsFlags runs `latch <args> -h`: the subcommand parses every flag
// before -h and fails on one it does not define, without starting anything.
func acceptsFlags(t *testing.T, who string, args []string) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no arguments", who)
		return
	}
	out, err := exec.Command(latchBinary(t), append(append([]string(nil), args...), "-h")...).CombinedOutput()
	if err != nil {
		t.Errorf("%s: latch %s refuses its arguments: %v\n%s", who, strings.Join(args, " "), err, lastLines(string(out), 5))
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, "\n")
}

// TestArgumentsMatchTheBinary: every command line the chart renders, and the
// sidecar command lines the injector writes, use flags the latch binary has.
// A renamed flag would otherwise surface only as a crash-looping pod.
func TestArgumentsMatchTheBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	helm(t)
	for _, files := range [][]string{nil, {testdata(t, "full.yaml")}} {
		r := render(t, files)
		for _, o := range r.objs {
			d, ok := o.(*appsv1.Deployment)
			if !ok {
				continue
			}
			for _, c := range d.Spec.Template.Spec.Containers {
				acceptsFlags(t, "Deployment "+d.Name, c.Args)
			}
		}
		cm, ok := r.get("ConfigMap", "t-latch-injector").(*corev1.ConfigMap)
		if !ok {
			t.Fatal("injector ConfigMap not rendered")
		}
		f := filepath.Join(t.TempDir(), "config.yaml")
		if err := os.WriteFile(f, []byte(cm.Data["config.yaml"]), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := inject.LoadConfig(f)
		if err != nil {
			t.Fatal(err)
		}
		for name, ann := range map[string]map[string]string{
			"static sidecar": {
				inject.AnnotationInbound: "8443:8080", inject.AnnotationAllow: "spiffe://example.org/a",
				inject.AnnotationOutbound: "15001=b:1@spiffe://example.org/b", inject.AnnotationTLSProfile: "intermediate",
			},
			"control-plane sidecar": {inject.AnnotationPolicy: inject.PolicyControlPlane, inject.AnnotationTLSProfile: "intermediate"},
		} {
			spec, err := inject.ParseSpec(ann, true, cfg.AdminPort)
			if err != nil {
				t.Fatal(err)
			}
			acceptsFlags(t, name, cfg.Container(spec).Args)
		}
	}
}
