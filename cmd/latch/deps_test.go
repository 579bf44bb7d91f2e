package main

import (
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// maxKubernetesPackages bounds the k8s.io packages linked into latch. There
// are 95 today: 42 for the injector (core/v1 and admission/v1 types,
// apimachinery) and 53 more for the control plane's dynamic client, informers
// and workqueue. With client-go's leaderelection linked they were 416.
const maxKubernetesPackages = 105

// linkedOnlyForAPIGroups are client-go packages that register every API
// group's types (k8s.io/client-go/kubernetes/scheme) or bring the generated
// clientset, informers, listers and apply configurations with them.
var linkedOnlyForAPIGroups = []string{
	"k8s.io/client-go/kubernetes", // the clientset, its typed clients and scheme
	"k8s.io/client-go/informers",
	"k8s.io/client-go/listers",
	"k8s.io/client-go/applyconfigurations",
	"k8s.io/client-go/dynamic/dynamicinformer", // imports informers for one interface
	"k8s.io/client-go/tools/leaderelection",    // imports the clientset and informers
	"k8s.io/client-go/tools/record",
}

// TestSidecarBinaryLinksNoKubernetesClients: latch is one binary, and
// package init runs whichever subcommand starts, so what the control plane
// links every sidecar pays for at start and at rest, though a sidecar never
// talks to the API server. Linking client-go's typed clients (through the
// clientset, its informers, dynamicinformer or leaderelection) registered
// every API group at init: the binary grew from 33 to 52 MB, init from 258 to
// 368 packages and 1.8 to 3.5 MB of heap, an idle sidecar from 30 to 47 MB of
// RSS (docs/performance.md). The control plane reaches the API server
// through the dynamic client (kube/) for that reason.
func TestSidecarBinaryLinksNoKubernetesClients(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", `{{.ImportPath}}:{{join .Imports " "}}`, ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	imports := map[string][]string{}
	var main string
	var kubernetes []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, deps, _ := strings.Cut(line, ":")
		imports[pkg] = strings.Fields(deps)
		main = pkg // go list -deps prints the package itself last
		if strings.HasPrefix(pkg, "k8s.io/") {
			kubernetes = append(kubernetes, pkg)
		}
	}
	forbidden := func(pkg string) bool {
		return slices.ContainsFunc(linkedOnlyForAPIGroups, func(bad string) bool { return pkg == bad || strings.HasPrefix(pkg, bad+"/") })
	}
	// Name each import that brings them in once: the first forbidden
	// package on the way, not the hundreds behind it.
	reported := map[string]bool{}
	for _, pkg := range slices.Sorted(maps.Keys(imports)) {
		if !forbidden(pkg) {
			continue
		}
		path := importPath(imports, main, pkg)
		first := slices.IndexFunc(path, forbidden)
		if reported[path[first]] {
			continue
		}
		reported[path[first]] = true
		t.Errorf("latch links %s (%s): every sidecar would run the init of the Kubernetes API groups it brings; reach the API server through the dynamic client",
			path[first], strings.Join(path[:first+1], " → "))
	}
	if len(kubernetes) > maxKubernetesPackages {
		t.Errorf("latch links %d k8s.io packages, more than %d: every sidecar pays for their init at start and at rest; find what pulled them in (go list -deps ./cmd/latch) or, if they are worth it, measure the idle sidecar and raise the bound",
			len(kubernetes), maxKubernetesPackages)
	}
	t.Logf("%d packages linked, %d of them k8s.io", len(imports), len(kubernetes))
}

// importPath is a shortest chain of imports from one package to another.
func importPath(imports map[string][]string, from, to string) []string {
	prev := map[string]string{from: ""}
	queue := []string{from}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if p == to {
			var path []string
			for ; p != ""; p = prev[p] {
				path = append(path, p)
			}
			slices.Reverse(path)
			return path
		}
		for _, d := range imports[p] {
			if _, seen := prev[d]; !seen {
				prev[d] = p
				queue = append(queue, d)
			}
		}
	}
	return []string{to}
}
