package kube_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"latch.dev/latch/internal/kubetest"
	"latch.dev/latch/xds/policy"
)

func TestMain(m *testing.M) {
	// client-go logs through klog; the tests' own logs say what matters.
	klog.SetSlogLogger(slog.New(slog.DiscardHandler))
	os.Exit(kubetest.Main(m))
}

var (
	crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	spGVR  = schema.GroupVersionResource{Group: policy.Group, Version: policy.Version, Resource: "servicepolicies"}
	meshTD = spiffeid.RequireTrustDomainFromString("mesh.test")
	crdMu  sync.Mutex
	crdOK  bool
)

// cluster returns the package's API server with the chart's CRD installed.
func cluster(t testing.TB) *kubetest.Cluster {
	t.Helper()
	c := kubetest.Shared(t)
	crdMu.Lock()
	defer crdMu.Unlock()
	if crdOK {
		return c
	}
	data, err := os.ReadFile(filepath.Join("..", filepath.FromSlash(policy.CRDFile)))
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(data, &obj); err != nil {
		t.Fatal(err)
	}
	dyn := dynamic.NewForConfigOrDie(c.Config)
	ctx := context.Background()
	if _, err := dyn.Resource(crdGVR).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{FieldValidation: "Strict"}); err != nil {
		t.Fatalf("installing the chart's CRD: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := dyn.Resource(crdGVR).Get(ctx, "servicepolicies.latch.dev", metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
			for _, c := range conds {
				m := c.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					crdOK = true
					return kubetest.Shared(t)
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the CRD is not established: %v %v", got, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// namespace creates a namespace for one test.
func namespace(t testing.TB, c *kubetest.Cluster, name string) string {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(c.Config)
	_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	return name
}

// servicePolicy builds an object from a spec written in YAML.
func servicePolicy(t testing.TB, ns, name, spec string) *unstructured.Unstructured {
	t.Helper()
	var s map[string]any
	if err := yaml.Unmarshal([]byte(spec), &s); err != nil {
		t.Fatalf("spec: %v", err)
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": policy.APIVersion, "kind": policy.Kind,
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec":     s,
	}}
}

const goodSpec = `
spiffeID: spiffe://mesh.test/ns/crd/sa/backend
inbound:
  - port: 8443
    appAddress: 127.0.0.1:8080
    idleTimeout: 90s
    allow:
      - id: spiffe://mesh.test/ns/crd/sa/frontend
      - pathPrefix: spiffe://mesh.test/ns/ops
      - trustDomain: mesh.test
outbound:
  - port: 9001
    endpoints: ["10.0.0.1:8443", "db.crd.svc:8443", "[::1]:8443"]
    serverID: spiffe://mesh.test/ns/crd/sa/db
  - port: 9002
    target: cache.crd.svc:6379
    serverID: spiffe://mesh.test/ns/crd/sa/cache
`

// TestCRDAdmission: the API server refuses at admission, with a message
// naming the field, whatever the CRD's schema can say; everything it refuses
// the control plane's decoder refuses too (the CRD is never stricter than the
// decoder), and what it admits is either accepted or refused by the decoder
// with the field named.
func TestCRDAdmission(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "crd")
	dyn := dynamic.NewForConfigOrDie(c.Config).Resource(spGVR).Namespace(ns)
	ctx := t.Context()
	opts := policy.Options{TrustDomains: []spiffeid.TrustDomain{meshTD}}

	tests := []struct {
		name string
		edit func(string) string
		// admission is what the API server says ("" admits); decoder what
		// the decoder says ("" accepts).
		admission, decoder string
	}{
		{"good", nil, "", ""},
		{"duplicate inbound port", func(s string) string {
			return strings.Replace(s, "outbound:", "  - port: 8443\n    appAddress: 127.0.0.1:8081\noutbound:", 1)
		}, `spec.inbound[1]: Duplicate value: {"port":8443}`, "port 8443 is already used"},
		{"port both inbound and outbound", func(s string) string { return strings.Replace(s, "port: 9002", "port: 8443", 1) },
			"a port is used by both an inbound and an outbound entry", "port 8443 is already used"},
		{"port out of range", func(s string) string { return strings.Replace(s, "port: 9001", "port: 70000", 1) },
			"spec.outbound[0].port: Invalid value: 70000: spec.outbound[0].port in body should be less than or equal to 65535", "out of range"},
		{"trust domain with capitals", func(s string) string {
			return strings.Replace(s, "trustDomain: mesh.test", "trustDomain: Mesh.Test", 1)
		},
			"spec.inbound[0].allow[2].trustDomain in body should match", "trust domain characters are limited"},
		{"trust domain with %", func(s string) string {
			return strings.Replace(s, "trustDomain: mesh.test", "trustDomain: mesh%2e.test", 1)
		},
			"trustDomain in body should match", "trust domain characters are limited"},
		{"workload ID with capitals in the trust domain", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/crd/sa/backend", "spiffe://MESH.test/ns/crd/sa/backend", 1)
		}, "spec.spiffeID in body should match '^spiffe://", "is not a SPIFFE ID"},
		{"workload ID without a path", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/crd/sa/backend", "spiffe://mesh.test", 1)
		}, "spec.spiffeID in body should match", "names a trust domain, not a workload"},
		{"dot segment", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/crd/sa/db", "spiffe://mesh.test/ns/../sa/db", 1)
		}, "spec.outbound[0].serverID in body should match", "is not a SPIFFE ID"},
		{"empty segment", func(s string) string {
			return strings.Replace(s, "pathPrefix: spiffe://mesh.test/ns/ops", "pathPrefix: spiffe://mesh.test//ops", 1)
		}, "spec.inbound[0].allow[1].pathPrefix in body should match", "pathPrefix"},
		{"two rule kinds in one allow entry", func(s string) string {
			return strings.Replace(s, "- trustDomain: mesh.test", "- trustDomain: mesh.test\n        id: spiffe://mesh.test/x", 1)
		}, "give exactly one of id, trustDomain, pathPrefix", "exactly one of id, trustDomain, pathPrefix"},
		{"empty allow entry", func(s string) string { return strings.Replace(s, "- trustDomain: mesh.test", "- {}", 1) },
			"spec.inbound[0].allow[2]: Invalid value: give exactly one of id, trustDomain, pathPrefix", "exactly one of id, trustDomain, pathPrefix"},
		{"target and endpoints", func(s string) string {
			return strings.Replace(s, "    target: cache.crd.svc:6379", "    target: cache.crd.svc:6379\n    endpoints: [\"a:1\"]", 1)
		}, "give target or endpoints, not both", "give target or endpoints, not both"},
		{"neither target nor endpoints", func(s string) string { return strings.Replace(s, "    target: cache.crd.svc:6379\n", "", 1) },
			"give target or endpoints, not both", "missing target or endpoints"},
		{"duplicate endpoint", func(s string) string {
			return strings.Replace(s, `"10.0.0.1:8443", "db.crd.svc:8443"`, `"10.0.0.1:8443", "10.0.0.1:8443"`, 1)
		}, `spec.outbound[0].endpoints[1]: Duplicate value: "10.0.0.1:8443"`, "listed twice"},
		{"address without a port", func(s string) string {
			return strings.Replace(s, "appAddress: 127.0.0.1:8080", "appAddress: 127.0.0.1", 1)
		},
			"spec.inbound[0].appAddress in body should match", "is not host:port"},
		{"address with a space", func(s string) string {
			return strings.Replace(s, "target: cache.crd.svc:6379", "target: \"cache crd:6379\"", 1)
		},
			"spec.outbound[1].target in body should match", "is not a host name"},
		{"negative duration", func(s string) string { return strings.Replace(s, "idleTimeout: 90s", "idleTimeout: -90s", 1) },
			"spec.inbound[0].idleTimeout in body should match", "is not a positive duration"},
		{"missing appAddress", func(s string) string { return strings.Replace(s, "    appAddress: 127.0.0.1:8080\n", "", 1) },
			`spec.inbound[0].appAddress: Required value`, `missing required field "appAddress"`},
		{"too many ports", func(s string) string {
			var b strings.Builder
			for p := 1; p <= 256; p++ {
				b.WriteString("  - {port: " + itoa(20000+p) + ", appAddress: \"127.0.0.1:1\"}\n")
			}
			return strings.Replace(s, "outbound:", b.String()+"outbound:", 1)
		}, "spec.inbound: Too many: 257: must have at most 256 items", "at most 256 allowed"},
		// What the schema cannot know: the configured trust domains.
		{"unconfigured trust domain", func(s string) string {
			return strings.Replace(s, "serverID: spiffe://mesh.test/ns/crd/sa/db", "serverID: spiffe://evil.test/ns/crd/sa/db", 1)
		}, "", `spec.outbound[0].serverID: trust domain "evil.test" is not one of the configured`},
		{"zero duration", func(s string) string { return strings.Replace(s, "idleTimeout: 90s", "idleTimeout: 0s", 1) },
			"", "is not a positive duration"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := goodSpec
			if tt.edit != nil {
				spec = tt.edit(spec)
				if spec == goodSpec {
					t.Fatal("the edit changed nothing")
				}
			}
			obj := servicePolicy(t, ns, "sp-"+itoa(i), spec)
			_, admitErr := dyn.Create(ctx, obj, metav1.CreateOptions{FieldValidation: "Strict", DryRun: []string{metav1.DryRunAll}})
			raw, _ := jsonOf(obj.Object["spec"])
			_, decodeErr := policy.ParseObject(policy.Object{Namespace: ns, Name: obj.GetName(), Spec: raw}, opts)
			switch {
			case tt.admission == "" && admitErr != nil:
				t.Errorf("the API server refused: %v", admitErr)
			case tt.admission != "" && (admitErr == nil || !strings.Contains(admitErr.Error(), tt.admission)):
				t.Errorf("the API server said %v, want %q", admitErr, tt.admission)
			}
			switch {
			case tt.decoder == "" && decodeErr != nil:
				t.Errorf("the decoder refused: %v", decodeErr)
			case tt.decoder != "" && (decodeErr == nil || !strings.Contains(decodeErr.Error(), tt.decoder)):
				t.Errorf("the decoder said %v, want %q", decodeErr, tt.decoder)
			}
		})
	}

	// Unknown fields: refused under strict validation (kubectl's default)
	// with the field named; pruned otherwise, never stored.
	typo := servicePolicy(t, ns, "typo", strings.Replace(goodSpec, "idleTimeout: 90s", "idleTimout: 90s", 1))
	_, err := dyn.Create(ctx, typo, metav1.CreateOptions{FieldValidation: "Strict", DryRun: []string{metav1.DryRunAll}})
	if err == nil || !strings.Contains(err.Error(), `unknown field "spec.inbound[0].idleTimout"`) {
		t.Errorf("a misspelt field under strict validation: %v", err)
	}
}
