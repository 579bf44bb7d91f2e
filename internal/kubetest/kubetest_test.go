package kubetest_test

import (
	"context"
	"os"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"latch.dev/latch/internal/kubetest"
)

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// The cluster is a real API server: it reports the pinned version, stores
// objects in etcd across its own restart, and enforces RBAC on an
// impersonated service account.
func TestCluster(t *testing.T) {
	c := kubetest.Shared(t)
	ctx := t.Context()
	admin := kubernetes.NewForConfigOrDie(c.Config)

	v, err := admin.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != c.Version || !strings.HasPrefix(v.GitVersion, "v1.") {
		t.Errorf("server version %q, want %q", v.GitVersion, c.Version)
	}

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kubetest"}}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kept", Namespace: "kubetest"}, Data: map[string]string{"k": "v"}}
	if _, err := admin.CoreV1().ConfigMaps("kubetest").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	nobody := kubernetes.NewForConfigOrDie(c.AsServiceAccount("kubetest", "nobody"))
	_, err = nobody.CoreV1().ConfigMaps("kubetest").Get(ctx, "kept", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("a service account without a role read a ConfigMap: err = %v", err)
	}

	c.StopAPIServer()
	if _, err := admin.CoreV1().ConfigMaps("kubetest").Get(ctx, "kept", metav1.GetOptions{}); err == nil {
		t.Fatal("the API server answered while stopped")
	}
	if err := c.StartAPIServer(context.Background()); err != nil {
		t.Fatal(err)
	}
	got, err := admin.CoreV1().ConfigMaps("kubetest").Get(ctx, "kept", metav1.GetOptions{})
	if err != nil || got.Data["k"] != "v" {
		t.Fatalf("after a restart: %v, %v", got, err)
	}
}
