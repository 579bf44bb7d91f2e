package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"latch.dev/latch/internal/kubetest"
	"latch.dev/latch/kube"
	"latch.dev/latch/xds/policy"
)

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// TestControlPlaneKubernetes runs `latch control-plane --kubernetes` against
// a real API server: not ready while the API server cannot be reached (it
// has read nothing, so it must not serve "no policy"); once synced, ready,
// leading, counting objects by condition, and writing their status.
func TestControlPlaneKubernetes(t *testing.T) {
	c := kubetest.Shared(t)
	installCRD(t, c)
	cs := kubernetes.NewForConfigOrDie(c.Config)
	for _, ns := range []string{"latch-cmd", "cmd-shop"} {
		if _, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	t.Setenv("POD_NAME", "cp-0")
	t.Setenv("POD_NAMESPACE", "latch-cmd")
	w := newDualStackWorld(t)
	socket := w.socket(t, "spiffe://mesh.test/ns/latch-cmd/sa/latch-control-plane")
	args := func(kubeconfig string) []string {
		return []string{"control-plane", "--kubernetes", "--kubeconfig", kubeconfig, "--namespaces", "cmd-shop",
			"--listen", "127.0.0.1:0", "--admin-address", "127.0.0.1:0", "--workload-api", socket}
	}
	run := func(ctx context.Context, a []string, stdout, stderr io.Writer) error {
		return runControlPlane(ctx, a[1:], stdout, stderr)
	}

	// An API server that is not there: alive, not ready.
	dead := c.Config.Host
	c.Config.Host = "https://127.0.0.1:1"
	deadKubeconfig, err := c.WriteKubeconfig(t.TempDir())
	c.Config.Host = dead
	if err != nil {
		t.Fatal(err)
	}
	{
		ctx, cancel := context.WithCancel(context.Background())
		logs := newJSONLines()
		exited := make(chan error, 1)
		go func() { exited <- run(ctx, args(deadKubeconfig), io.Discard, logs.w) }()
		serving := logs.wait(t, "control plane serving", nil)
		admin := serving["admin_address"].(string)
		time.Sleep(500 * time.Millisecond)
		code, body := httpGet(t, admin, "/readyz")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "declarations") {
			t.Errorf("/readyz with the API server unreachable: %d %s", code, body)
		}
		cancel()
		if err := <-exited; err != nil {
			t.Errorf("control plane exited with %v", err)
		}
		logs.w.Close()
		<-logs.done
	}

	kubeconfig, err := c.WriteKubeconfig(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	logs := startCommand(t, run, args(kubeconfig))
	admin := logs.wait(t, "control plane serving", nil)["admin_address"].(string)
	waitReady := time.Now().Add(20 * time.Second)
	for {
		code, body := httpGet(t, admin, "/readyz")
		if code == http.StatusOK {
			break
		}
		if time.Now().After(waitReady) {
			t.Fatalf("/readyz never ready: %d %s", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	sp := dynamic.NewForConfigOrDie(c.Config).Resource(kube.GVR).Namespace("cmd-shop")
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": policy.APIVersion, "kind": policy.Kind,
		"metadata": map[string]any{"name": "backend"},
		"spec": map[string]any{"spiffeID": "spiffe://mesh.test/ns/cmd-shop/sa/backend",
			"inbound": []any{map[string]any{"port": int64(8443), "appAddress": "127.0.0.1:8080"}}},
	}}
	if _, err := sp.Create(context.Background(), obj, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		u, err := sp.Get(context.Background(), "backend", metav1.GetOptions{})
		if err == nil && strings.Contains(toJSON(u.Object["status"]), `"reason":"Accepted"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never written: %v %v", u, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, status := httpGet(t, admin, "/status")
	var doc struct {
		Declarations []struct {
			File     string `json:"file"`
			SPIFFEID string `json:"spiffe_id"`
		} `json:"declarations"`
		Kubernetes *struct{ Synced, Leading bool } `json:"kubernetes"`
	}
	if err := json.Unmarshal([]byte(status), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Kubernetes == nil || !doc.Kubernetes.Synced || !doc.Kubernetes.Leading || len(doc.Declarations) != 1 || doc.Declarations[0].File != "ServicePolicy cmd-shop/backend" {
		t.Errorf("/status: %s", status)
	}
	_, metrics := httpGet(t, admin, "/metrics")
	for _, want := range []string{"latch_kube_synced 1", "latch_kube_leader 1", `latch_servicepolicies{condition="Accepted",reason="Accepted",status="True"} 1`, `latch_kube_status_writes_total{result="written"}`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func httpGet(t *testing.T, addr, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func toJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

func installCRD(t *testing.T, c *kubetest.Cluster) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", filepath.FromSlash(policy.CRDFile)))
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(data, &obj); err != nil {
		t.Fatal(err)
	}
	crds := dynamic.NewForConfigOrDie(c.Config).Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	if _, err := crds.Create(context.Background(), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := dynamic.NewForConfigOrDie(c.Config).Resource(kube.GVR).Namespace("default").List(context.Background(), metav1.ListOptions{}); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the ServicePolicy CRD is not served")
}
