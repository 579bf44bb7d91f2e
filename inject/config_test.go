package inject_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"latch.dev/latch/inject"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", `
image: ghcr.io/latch-dev/latch:1.0.0
adminPort: 15000
resources:
  requests: {cpu: 50m, memory: 32Mi}
  limits: {memory: 128Mi}
workloadAPI: {source: csi, csiDriver: csi.spiffe.io, socketName: spire-agent.sock}
controlPlane: {address: "latch-control-plane.latch.svc:18000", serverID: "spiffe://mesh.test/ns/latch/sa/latch-control-plane"}
`)
	c, err := inject.LoadConfig(good)
	if err != nil {
		t.Fatal(err)
	}
	if c.Image != "ghcr.io/latch-dev/latch:1.0.0" || c.Resources.Limits.Memory().String() != "128Mi" || c.ControlPlane.Address == "" {
		t.Errorf("loaded %+v", c)
	}
	for name, tt := range map[string]struct{ body, want string }{
		"unknown field":   {"image: x\nimagePulPolicy: Always\n", "imagePulPolicy"},
		"duplicate field": {"image: x\nimage: y\n", "image"},
		"invalid":         {"image: x\nworkloadAPI: {source: nfs}\n", "workloadAPI.source"},
		"bad quantity":    {"image: x\nresources: {limits: {memory: lots}}\n", "quantities"},
	} {
		_, err := inject.LoadConfig(write(name+".yaml", tt.body))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want it to mention %q", name, err, tt.want)
		}
	}
	if _, err := inject.LoadConfig(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Error("missing file accepted")
	}
}
