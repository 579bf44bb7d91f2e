package latch_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"latch.dev/latch/internal/kubetest"
	"latch.dev/latch/kube"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
)

// The chart against a real API server: every object it renders is applied
// with strict field validation (a misspelt or misplaced field fails, where a
// client without it would see the field silently dropped), the webhook it
// installs is exercised with the injector down, and the control plane runs
// with exactly the permissions the chart grants its service account.

// applier applies rendered manifests to the test cluster.
type applier struct {
	t      *testing.T
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func newApplier(t *testing.T, c *kubetest.Cluster) *applier {
	t.Helper()
	dc := discovery.NewDiscoveryClientForConfigOrDie(c.Config)
	return &applier{t: t, dyn: dynamic.NewForConfigOrDie(c.Config),
		mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}
}

// docs splits helm's output into objects.
func docs(t *testing.T, out string) []*unstructured.Unstructured {
	t.Helper()
	var objs []*unstructured.Unstructured
	rd := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(out)))
	for {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			t.Fatal(err)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
}

// apply applies obj as helm would create it, with strict field validation.
// It reports false for a kind this API server does not serve (the
// cert-manager and Prometheus Operator kinds, whose CRDs are not installed
// here: the helm tests decode those strictly against mirrors of their types).
func (a *applier) apply(obj *unstructured.Unstructured) (served bool, err error) {
	gvk := obj.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		return false, nil
	}
	if err != nil {
		return true, err
	}
	ri := a.dyn.Resource(m.Resource)
	var res dynamic.ResourceInterface = ri
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		res = ri.Namespace(obj.GetNamespace())
	}
	data, err := obj.MarshalJSON()
	if err != nil {
		return true, err
	}
	_, err = res.Patch(context.Background(), obj.GetName(), "application/apply-patch+yaml", data,
		metav1.PatchOptions{FieldManager: "helm", Force: ptr(true), FieldValidation: "Strict"})
	return true, err
}

func ptr[T any](v T) *T { return &v }

func itoa(i int) string { return strconv.Itoa(i) }

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

func ensureNamespace(t *testing.T, cs kubernetes.Interface, name string, labels map[string]string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// installChart applies everything helm renders for the value files: the CRD
// first (helm installs crds/ before templates), and waits for it.
func installChart(t *testing.T, c *kubetest.Cluster, valueFiles ...string) (applied, skipped []string) {
	t.Helper()
	var files []string
	for _, f := range valueFiles {
		files = append(files, testdata(t, f))
	}
	out, stderr, err := runHelm(t, append(templateArgs(files, nil), "--kube-version", strings.TrimPrefix(c.Version, "v"))...)
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr)
	}
	cs := kubernetes.NewForConfigOrDie(c.Config)
	a := newApplier(t, c)
	objs := docs(t, out)
	for _, o := range objs {
		if ns := o.GetNamespace(); ns != "" {
			ensureNamespace(t, cs, ns, nil)
		}
	}
	crdsFirst := func(kindIsCRD bool) {
		for _, o := range objs {
			if (o.GetKind() == "CustomResourceDefinition") != kindIsCRD {
				continue
			}
			served, err := a.apply(o)
			what := o.GetKind() + " " + o.GetName()
			switch {
			case err != nil:
				t.Errorf("%s (values %v): the API server refuses it: %v", what, valueFiles, err)
			case !served:
				skipped = append(skipped, what)
			default:
				applied = append(applied, what)
			}
		}
	}
	crdsFirst(true)
	waitEstablished(t, c)
	a.mapper.(*restmapper.DeferredDiscoveryRESTMapper).Reset()
	crdsFirst(false)
	return applied, skipped
}

func waitEstablished(t *testing.T, c *kubetest.Cluster) {
	t.Helper()
	dyn := dynamic.NewForConfigOrDie(c.Config)
	crd := dyn.Resource(crdResource)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		u, err := crd.Get(context.Background(), "servicepolicies.latch.dev", metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
			for _, x := range conds {
				if m, _ := x.(map[string]any); m["type"] == "Established" && m["status"] == "True" {
					return
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the ServicePolicy CRD is not established")
}

// TestChartAppliesStrictly: for the default values and every value set the
// helm tests render, the API server takes every object under strict field
// validation; and it would not take a misspelt one.
func TestChartAppliesStrictly(t *testing.T) {
	c := kubetest.Shared(t)
	for _, vf := range [][]string{nil, {"full.yaml"}, {"injector-only.yaml"}, {"external-control-plane.yaml"}, {"control-plane-only.yaml"}, {"files-only.yaml"}} {
		applied, skipped := installChart(t, c, vf...)
		if len(applied) == 0 {
			t.Errorf("values %v: nothing applied", vf)
		}
		t.Logf("values %v: %d objects applied; not served by a bare API server (checked by the helm tests' strict decoding): %v", vf, len(applied), skipped)
	}

	// The check can fail: a misspelt field is refused, naming it.
	out, _, err := runHelm(t, templateArgs(nil, nil)...)
	if err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, c)
	for _, o := range docs(t, out) {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		containers[0].(map[string]any)["imagePullPolicyy"] = "Always"
		if err := unstructured.SetNestedSlice(o.Object, containers, "spec", "template", "spec", "containers"); err != nil {
			t.Fatal(err)
		}
		_, err := a.apply(o)
		if err == nil || !strings.Contains(err.Error(), `imagePullPolicyy: field not declared in schema`) {
			t.Errorf("a misspelt field in Deployment %s: %v", o.GetName(), err)
		}
		break
	}
}

// TestWebhookWithTheInjectorDown: the chart's webhook is installed and the
// injector is not running. Pods that asked for latch are refused (they
// never run without their sidecar); every other pod is admitted.
func TestWebhookWithTheInjectorDown(t *testing.T) {
	c := kubetest.Shared(t)
	installChart(t, c)
	cs := kubernetes.NewForConfigOrDie(c.Config)
	ensureNamespace(t, cs, "plain", nil)
	ensureNamespace(t, cs, "enabled", map[string]string{"latch.dev/inject": "enabled"})
	n := 0
	create := func(ns string, labels map[string]string) error {
		n++
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "pod-" + itoa(n), Namespace: ns, Labels: labels},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1"}}},
		}
		_, err := cs.CoreV1().Pods(ns).Create(context.Background(), pod, metav1.CreateOptions{})
		return err
	}
	tests := []struct {
		name, ns string
		labels   map[string]string
		refused  string // "" admitted
	}{
		{"an unlabelled pod in an unlabelled namespace", "plain", nil, ""},
		{"a pod with other labels in an unlabelled namespace", "plain", map[string]string{"app": "web"}, ""},
		{"a pod labelled out in an unlabelled namespace", "plain", map[string]string{"latch.dev/inject": "false"}, ""},
		{"a pod in kube-system", "kube-system", map[string]string{"latch.dev/inject": "true"}, ""},
		{"a pod labelled out in an enabled namespace", "enabled", map[string]string{"latch.dev/inject": "false"}, ""},
		{"a pod that asked for latch in an unlabelled namespace", "plain", map[string]string{"latch.dev/inject": "true"}, `"pod.inject.latch.dev"`},
		{"a pod in an enabled namespace", "enabled", nil, `"namespace.inject.latch.dev"`},
	}
	for _, tt := range tests {
		err := create(tt.ns, tt.labels)
		switch {
		case tt.refused == "" && err != nil:
			t.Errorf("%s: refused while the injector is down: %v", tt.name, err)
		case tt.refused != "" && (err == nil || !strings.Contains(err.Error(), tt.refused)):
			t.Errorf("%s: want refused by %s (failurePolicy Fail), got %v", tt.name, tt.refused, err)
		}
	}
}

// TestControlPlaneWithTheChartsRBAC: the control plane runs as the chart's
// service account with nothing but the chart's roles, and does its whole
// job: reads ServicePolicies, holds the Lease, publishes its ACK report and
// writes status.
func TestControlPlaneWithTheChartsRBAC(t *testing.T) {
	c := kubetest.Shared(t)
	installChart(t, c)
	cs := kubernetes.NewForConfigOrDie(c.Config)
	ensureNamespace(t, cs, "rbac-shop", nil)
	const sa = "t-latch-control-plane"
	owners, _ := policy.ParseIDTemplate(policy.DefaultIDTemplate)
	store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("example.org")}, Owners: owners}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := server.New(ctx, server.Options{})
	ctl, err := kube.New(kube.Options{
		Config: c.AsServiceAccount(namespace, sa), Store: store, XDS: srv,
		OnChange: func(policy.Change) { srv.Update(store.Snapshot()) },
		Identity: sa + "-0", Namespace: namespace, LeaseName: sa,
		ReportInterval: 100 * time.Millisecond, ReportHeartbeat: time.Second,
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctl.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, "the controller to sync and lead as the chart's service account", func() bool { return ctl.Synced() && ctl.Leading() })

	sp := dynamic.NewForConfigOrDie(c.Config).Resource(kube.GVR).Namespace("rbac-shop")
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": policy.APIVersion, "kind": policy.Kind,
		"metadata": map[string]any{"name": "api"},
		"spec": map[string]any{"spiffeID": "spiffe://example.org/ns/rbac-shop/sa/api",
			"inbound": []any{map[string]any{"port": int64(8443), "appAddress": "127.0.0.1:8080"}}},
	}}
	if _, err := sp.Create(context.Background(), obj, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the status written as the chart's service account", func() bool {
		u, err := sp.Get(context.Background(), "api", metav1.GetOptions{})
		if err != nil {
			return false
		}
		conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
		for _, x := range conds {
			if m, _ := x.(map[string]any); m["type"] == "Accepted" && m["status"] == "True" {
				return true
			}
		}
		return false
	})
	waitUntil(t, "the ACK report written as the chart's service account", func() bool {
		_, err := cs.CoreV1().ConfigMaps(namespace).Get(context.Background(), sa+"-acks-"+sa+"-0", metav1.GetOptions{})
		return err == nil
	})
	// And no more than that: the service owners' objects are not its to change.
	other := dynamic.NewForConfigOrDie(c.AsServiceAccount(namespace, sa)).Resource(kube.GVR).Namespace("rbac-shop")
	if err := other.Delete(context.Background(), "api", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the control plane's service account deleted a ServicePolicy: %v", err)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
