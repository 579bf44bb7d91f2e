package latch_test

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"latch.dev/latch/inject"
	"latch.dev/latch/xds/policy"
)

// The chart is rendered with helm and every object decoded strictly into its
// Kubernetes Go type: a misspelt or misplaced field fails the test, as it
// would fail (or, worse, be silently dropped by) the API server.

const (
	release   = "t"
	namespace = "latch"
	// kubeVersion is what helm assumes for the cluster; the chart requires
	// native sidecars (1.29+).
	kubeVersion = "1.31.0"
)

// Types for the CRDs the chart renders objects of. k8s.io/api has none for
// them; these mirror the fields of cert-manager v1, Prometheus Operator v1
// and apiextensions v1 the chart uses, so strict decoding still catches a
// field the chart invents.
type (
	certManagerIssuer struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			SelfSigned *struct{} `json:"selfSigned,omitempty"`
		} `json:"spec"`
	}
	certManagerCertificate struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			SecretName  string   `json:"secretName"`
			CommonName  string   `json:"commonName"`
			DNSNames    []string `json:"dnsNames"`
			Duration    string   `json:"duration"`
			RenewBefore string   `json:"renewBefore"`
			PrivateKey  struct {
				Algorithm      string `json:"algorithm"`
				Size           int    `json:"size"`
				RotationPolicy string `json:"rotationPolicy"`
			} `json:"privateKey"`
			Usages    []string `json:"usages"`
			IssuerRef struct {
				Name  string `json:"name"`
				Kind  string `json:"kind"`
				Group string `json:"group"`
			} `json:"issuerRef"`
		} `json:"spec"`
	}
	serviceMonitor struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			Selector          metav1.LabelSelector `json:"selector"`
			NamespaceSelector struct {
				MatchNames []string `json:"matchNames"`
			} `json:"namespaceSelector"`
			Endpoints []struct {
				Port     string `json:"port"`
				Path     string `json:"path"`
				Interval string `json:"interval"`
			} `json:"endpoints"`
		} `json:"spec"`
	}
	podMonitor struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			Selector          metav1.LabelSelector `json:"selector"`
			NamespaceSelector struct {
				Any bool `json:"any"`
			} `json:"namespaceSelector"`
			PodMetricsEndpoints []struct {
				Port     string `json:"port"`
				Path     string `json:"path"`
				Interval string `json:"interval"`
			} `json:"podMetricsEndpoints"`
		} `json:"spec"`
	}
	customResourceDefinition struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			Group string `json:"group"`
			Names struct {
				Kind       string   `json:"kind"`
				ListKind   string   `json:"listKind"`
				Plural     string   `json:"plural"`
				Singular   string   `json:"singular"`
				ShortNames []string `json:"shortNames"`
				Categories []string `json:"categories"`
			} `json:"names"`
			Scope    string `json:"scope"`
			Versions []struct {
				Name                     string           `json:"name"`
				Served                   bool             `json:"served"`
				Storage                  bool             `json:"storage"`
				AdditionalPrinterColumns []map[string]any `json:"additionalPrinterColumns"`
				Schema                   struct {
					OpenAPIV3Schema map[string]any `json:"openAPIV3Schema"`
				} `json:"schema"`
				Subresources map[string]any `json:"subresources"`
			} `json:"versions"`
		} `json:"spec"`
	}
)

// newObject returns an empty typed object for apiVersion/kind.
func newObject(apiVersion, kind string) any {
	switch apiVersion + "/" + kind {
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}
	case "v1/Secret":
		return &corev1.Secret{}
	case "v1/Service":
		return &corev1.Service{}
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}
	case "admissionregistration.k8s.io/v1/MutatingWebhookConfiguration":
		return &admissionregistrationv1.MutatingWebhookConfiguration{}
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}
	case "cert-manager.io/v1/Issuer":
		return &certManagerIssuer{}
	case "cert-manager.io/v1/Certificate":
		return &certManagerCertificate{}
	case "monitoring.coreos.com/v1/ServiceMonitor":
		return &serviceMonitor{}
	case "monitoring.coreos.com/v1/PodMonitor":
		return &podMonitor{}
	case "apiextensions.k8s.io/v1/CustomResourceDefinition":
		return &customResourceDefinition{}
	case "rbac.authorization.k8s.io/v1/ClusterRole":
		return &rbacv1.ClusterRole{}
	case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
		return &rbacv1.ClusterRoleBinding{}
	case "rbac.authorization.k8s.io/v1/Role":
		return &rbacv1.Role{}
	case "rbac.authorization.k8s.io/v1/RoleBinding":
		return &rbacv1.RoleBinding{}
	}
	return nil
}

// rendered is one chart rendering, decoded.
type rendered struct {
	objs   []any
	byName map[string]any // "Kind/name"
}

func (r *rendered) get(kind, name string) any { return r.byName[kind+"/"+name] }

func (r *rendered) count(kind string) int {
	n := 0
	for k := range r.byName {
		if strings.HasPrefix(k, kind+"/") {
			n++
		}
	}
	return n
}

// render runs helm template with the value files and --set pairs and decodes
// the output strictly.
func render(t *testing.T, valueFiles []string, sets ...string) *rendered {
	t.Helper()
	out, stderr, err := runHelm(t, templateArgs(valueFiles, sets)...)
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr)
	}
	r := &rendered{byName: map[string]any{}}
	rd := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(out)))
	for {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		var tm struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatalf("rendered document is not YAML: %v\n%s", err, doc)
		}
		obj := newObject(tm.APIVersion, tm.Kind)
		if obj == nil {
			t.Fatalf("rendered an object of unexpected type %s %s:\n%s", tm.APIVersion, tm.Kind, doc)
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			t.Fatalf("%s %s does not decode strictly: %v\n%s", tm.Kind, tm.Metadata.Name, err, doc)
		}
		switch tm.Kind {
		case "MutatingWebhookConfiguration", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding":
			if tm.Metadata.Namespace != "" {
				t.Errorf("cluster-scoped %s %s in namespace %q", tm.Kind, tm.Metadata.Name, tm.Metadata.Namespace)
			}
		case "RoleBinding": // also in the namespaces the control plane reads
		default:
			if tm.Metadata.Namespace != namespace {
				t.Errorf("%s %s in namespace %q, want %q", tm.Kind, tm.Metadata.Name, tm.Metadata.Namespace, namespace)
			}
		}
		key := tm.Kind + "/" + tm.Metadata.Name
		if tm.Kind == "RoleBinding" {
			key += "@" + tm.Metadata.Namespace
		}
		if _, dup := r.byName[key]; dup {
			t.Errorf("%s rendered twice", key)
		}
		r.byName[key] = obj
		r.objs = append(r.objs, obj)
	}
	return r
}

func templateArgs(valueFiles, sets []string) []string {
	args := []string{"template", release, ".", "--namespace", namespace, "--kube-version", kubeVersion, "--include-crds"}
	for _, f := range valueFiles {
		args = append(args, "-f", f)
	}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	return args
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

func testdata(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestHelmLint(t *testing.T) {
	for _, vf := range [][]string{nil, {"full.yaml"}, {"injector-only.yaml"}, {"external-control-plane.yaml"}, {"control-plane-only.yaml"}, {"files-only.yaml"}} {
		args := []string{"lint", ".", "--strict", "--namespace", namespace, "--kube-version", kubeVersion}
		for _, f := range vf {
			args = append(args, "-f", testdata(t, f))
		}
		if out, stderr, err := runHelm(t, args...); err != nil {
			t.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
		}
	}
}

// chartCase is one set of values and what the rendering must then hold.
type chartCase struct {
	name         string
	files        []string
	controlPlane bool
	injector     bool
	certManager  bool
	// sidecarCP is the control plane the injected sidecars are sent to ("" none).
	sidecarCP   string
	sidecarCPID string
	failure     admissionregistrationv1.FailurePolicyType
	webhooks    int
	extra       map[string]int // kind → count for optional objects
	// filesOnly: the control plane reads no ServicePolicy objects.
	filesOnly bool
}

func TestChartRenders(t *testing.T) {
	const defaultCP = "t-latch-control-plane.latch.svc:15010"
	const defaultCPID = "spiffe://example.org/ns/latch/sa/t-latch-control-plane"
	cases := []chartCase{
		{name: "defaults", controlPlane: true, injector: true, sidecarCP: defaultCP, sidecarCPID: defaultCPID,
			failure: admissionregistrationv1.Fail, webhooks: 2,
			extra: map[string]int{"Secret": 1, "NetworkPolicy": 0, "ServiceMonitor": 0, "Certificate": 0, "ConfigMap": 3, "PodDisruptionBudget": 2}},
		{name: "full", files: []string{"full.yaml"}, controlPlane: true, injector: true, certManager: true,
			sidecarCP: defaultCP, sidecarCPID: "spiffe://mesh.test/ns/latch/sa/t-latch-control-plane",
			failure: admissionregistrationv1.Ignore, webhooks: 2,
			extra: map[string]int{"Secret": 0, "NetworkPolicy": 2, "ServiceMonitor": 1, "PodMonitor": 1, "Certificate": 1, "Issuer": 1, "PodDisruptionBudget": 1}},
		{name: "injector only", files: []string{"injector-only.yaml"}, injector: true, certManager: true,
			failure: admissionregistrationv1.Fail, webhooks: 1,
			extra: map[string]int{"Issuer": 0, "Certificate": 1, "ConfigMap": 1, "Deployment": 1}},
		{name: "external control plane", files: []string{"external-control-plane.yaml"}, injector: true,
			sidecarCP: "latch-cp.mesh-system.svc:18000", sidecarCPID: "spiffe://example.org/ns/mesh-system/sa/latch-cp",
			failure: admissionregistrationv1.Fail, webhooks: 2, extra: map[string]int{"Deployment": 1}},
		{name: "control plane only", files: []string{"control-plane-only.yaml"}, controlPlane: true,
			extra: map[string]int{"MutatingWebhookConfiguration": 0, "Deployment": 1, "Secret": 0}},
		{name: "files only", files: []string{"files-only.yaml"}, controlPlane: true, injector: true, filesOnly: true,
			sidecarCP: defaultCP, sidecarCPID: defaultCPID, failure: admissionregistrationv1.Fail, webhooks: 2,
			extra: map[string]int{"ClusterRole": 0, "ClusterRoleBinding": 0, "Role": 0, "RoleBinding": 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var files []string
			for _, f := range tc.files {
				files = append(files, testdata(t, f))
			}
			r := render(t, files)
			for kind, n := range tc.extra {
				if got := r.count(kind); got != n {
					t.Errorf("%d %s objects, want %d", got, kind, n)
				}
			}
			checkCRD(t, r)
			checkDeployments(t, r)
			checkServices(t, r)
			checkPDBs(t, r)
			if tc.controlPlane {
				checkControlPlane(t, r, tc)
			}
			if tc.injector {
				checkInjector(t, r, tc)
			}
			checkDashboard(t, r, tc)
		})
	}
}

func checkCRD(t *testing.T, r *rendered) {
	t.Helper()
	crd, ok := r.get("CustomResourceDefinition", "servicepolicies.latch.dev").(*customResourceDefinition)
	if !ok {
		if _, err := os.Stat(filepath.Join(chartDir(t), "crds")); err == nil {
			t.Error("crds/ exists but the ServicePolicy CRD was not rendered")
		}
		return
	}
	if crd.Spec.Group != policy.Group || crd.Spec.Names.Kind != policy.Kind || len(crd.Spec.Versions) == 0 || crd.Spec.Versions[0].Name != policy.Version {
		t.Errorf("CRD is %s %s %v, want %s %s %s", crd.Spec.Group, crd.Spec.Names.Kind, crd.Spec.Versions, policy.Group, policy.Kind, policy.Version)
	}
}

// checkDeployments asserts the pod security every latch pod must have and
// that what the containers reference exists.
func checkDeployments(t *testing.T, r *rendered) {
	t.Helper()
	for _, o := range r.objs {
		d, ok := o.(*appsv1.Deployment)
		if !ok {
			continue
		}
		ps := d.Spec.Template.Spec
		where := "Deployment " + d.Name
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("%s: selector %v does not match its pod labels %v", where, d.Spec.Selector, d.Spec.Template.Labels)
		}
		// Only the control plane reading ServicePolicies talks to the API
		// server (checkKubernetesSource); every other pod has no token.
		if slices.Contains(ps.Containers[0].Args, "--kubernetes") {
			if ps.AutomountServiceAccountToken == nil || !*ps.AutomountServiceAccountToken {
				t.Errorf("%s: reads the API server without a service account token", where)
			}
		} else if ps.AutomountServiceAccountToken == nil || *ps.AutomountServiceAccountToken {
			t.Errorf("%s: service account token mounted; it never calls the API server", where)
		}
		if sa, ok := r.get("ServiceAccount", ps.ServiceAccountName).(*corev1.ServiceAccount); !ok {
			t.Errorf("%s: service account %q not rendered", where, ps.ServiceAccountName)
		} else if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken != slices.Contains(ps.Containers[0].Args, "--kubernetes") {
			t.Errorf("ServiceAccount %s: automountServiceAccountToken %v", sa.Name, sa.AutomountServiceAccountToken)
		}
		psc := ps.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 ||
			psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Errorf("%s: pod securityContext %+v, want non-root numeric user and RuntimeDefault seccomp", where, psc)
		}
		if ps.HostNetwork || ps.HostPID || ps.HostIPC {
			t.Errorf("%s: uses host namespaces", where)
		}
		vols := map[string]corev1.Volume{}
		for _, v := range ps.Volumes {
			vols[v.Name] = v
			if v.HostPath != nil && v.HostPath.Type != nil && *v.HostPath.Type != corev1.HostPathDirectory {
				t.Errorf("%s: hostPath volume %s of type %s", where, v.Name, *v.HostPath.Type)
			}
		}
		if len(ps.InitContainers) != 0 {
			t.Errorf("%s: has init containers", where)
		}
		for _, c := range ps.Containers {
			where := where + " container " + c.Name
			sc := c.SecurityContext
			switch {
			case sc == nil:
				t.Errorf("%s: no securityContext", where)
				continue
			case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
				t.Errorf("%s: runAsNonRoot not true", where)
			case sc.RunAsUser == nil || *sc.RunAsUser == 0:
				t.Errorf("%s: runAsUser not a non-root number", where)
			case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
				t.Errorf("%s: root filesystem writable", where)
			case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
				t.Errorf("%s: privilege escalation allowed", where)
			case sc.Privileged != nil && *sc.Privileged:
				t.Errorf("%s: privileged", where)
			case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
				t.Errorf("%s: capabilities %+v, want drop ALL", where, sc.Capabilities)
			case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
				t.Errorf("%s: seccomp %+v", where, sc.SeccompProfile)
			}
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
				t.Errorf("%s: resources %+v, want cpu/memory requests and a memory limit", where, c.Resources)
			}
			if c.ReadinessProbe == nil || c.LivenessProbe == nil {
				t.Errorf("%s: readiness or liveness probe missing", where)
			}
			ports := map[string]bool{}
			for _, p := range c.Ports {
				ports[p.Name] = true
			}
			for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe} {
				if p != nil && p.HTTPGet != nil && p.HTTPGet.Port.StrVal != "" && !ports[p.HTTPGet.Port.StrVal] {
					t.Errorf("%s: probe on undeclared port %q", where, p.HTTPGet.Port.StrVal)
				}
			}
			for _, m := range c.VolumeMounts {
				if _, ok := vols[m.Name]; !ok {
					t.Errorf("%s: mounts undefined volume %q", where, m.Name)
				}
				if !m.ReadOnly {
					t.Errorf("%s: volume %s mounted writable", where, m.Name)
				}
			}
			// The image's entrypoint is latch; args start with the subcommand.
			if len(c.Command) != 0 || len(c.Args) == 0 {
				t.Errorf("%s: command %q args %q, want the image's entrypoint and a subcommand", where, c.Command, c.Args)
			}
		}
	}
}

// checkServices: every Service selects a rendered Deployment's pods on ports
// they declare.
func checkServices(t *testing.T, r *rendered) {
	t.Helper()
	for _, o := range r.objs {
		s, ok := o.(*corev1.Service)
		if !ok {
			continue
		}
		var target *appsv1.Deployment
		for _, o := range r.objs {
			if d, ok := o.(*appsv1.Deployment); ok && labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
				if target != nil {
					t.Errorf("Service %s selects more than one Deployment", s.Name)
				}
				target = d
			}
		}
		if target == nil {
			t.Errorf("Service %s selects no Deployment", s.Name)
			continue
		}
		declared := map[string]bool{}
		for _, c := range target.Spec.Template.Spec.Containers {
			for _, p := range c.Ports {
				declared[p.Name] = true
			}
		}
		for _, p := range s.Spec.Ports {
			if !declared[p.TargetPort.StrVal] {
				t.Errorf("Service %s port %s targets %q, not a container port of %s", s.Name, p.Name, p.TargetPort.String(), target.Name)
			}
		}
	}
}

func checkPDBs(t *testing.T, r *rendered) {
	t.Helper()
	for _, o := range r.objs {
		p, ok := o.(*policyv1.PodDisruptionBudget)
		if !ok {
			continue
		}
		d, ok := r.get("Deployment", p.Name).(*appsv1.Deployment)
		if !ok {
			t.Errorf("PodDisruptionBudget %s has no Deployment of the same name", p.Name)
			continue
		}
		sel, _ := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("PodDisruptionBudget %s does not select its Deployment's pods", p.Name)
		}
		if p.Spec.MinAvailable == nil || d.Spec.Replicas == nil || p.Spec.MinAvailable.IntValue() >= int(*d.Spec.Replicas) {
			t.Errorf("PodDisruptionBudget %s minAvailable %v with %v replicas blocks every drain", p.Name, p.Spec.MinAvailable, d.Spec.Replicas)
		}
	}
}

func argValue(args []string, flag string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v, true
		}
	}
	return "", false
}

func checkControlPlane(t *testing.T, r *rendered, tc chartCase) {
	t.Helper()
	var d *appsv1.Deployment
	for _, o := range r.objs {
		if dd, ok := o.(*appsv1.Deployment); ok && dd.Spec.Template.Labels["app.kubernetes.io/component"] == "control-plane" {
			d = dd
		}
	}
	if d == nil {
		t.Fatal("no control-plane Deployment")
	}
	if *d.Spec.Replicas < 2 {
		t.Errorf("control plane has %d replicas, want at least 2", *d.Spec.Replicas)
	}
	c := d.Spec.Template.Spec.Containers[0]
	if c.Args[0] != "control-plane" {
		t.Errorf("control plane args %q", c.Args)
	}
	var env []string
	for _, e := range c.Env {
		env = append(env, e.Name)
	}
	if !slices.Contains(env, "SPIFFE_ENDPOINT_SOCKET") {
		t.Error("control plane has no SPIFFE_ENDPOINT_SOCKET")
	}
	checkMemoryLimit(t, c)
	checkKubernetesSource(t, r, tc, d, env)
	// Declarations: the directory it is told to read is the projected volume
	// of the chart's ConfigMap and the service owners' ones.
	dir, ok := argValue(c.Args, "--declarations")
	if !ok {
		t.Fatalf("control plane args %q lack --declarations", c.Args)
	}
	var vol *corev1.Volume
	for _, m := range c.VolumeMounts {
		if m.MountPath == dir {
			for i := range d.Spec.Template.Spec.Volumes {
				if d.Spec.Template.Spec.Volumes[i].Name == m.Name {
					vol = &d.Spec.Template.Spec.Volumes[i]
				}
			}
		}
	}
	if vol == nil || vol.Projected == nil {
		t.Fatalf("--declarations=%s is not a projected volume mount", dir)
	}
	var sources []string
	for _, s := range vol.Projected.Sources {
		sources = append(sources, s.ConfigMap.Name)
	}
	cmName := sources[0]
	cm, ok := r.get("ConfigMap", cmName).(*corev1.ConfigMap)
	if !ok {
		t.Fatalf("declarations ConfigMap %s not rendered", cmName)
	}
	// Declarations rendered from values are valid for the control plane's
	// own parser, in the chart's trust domain.
	td := spiffeid.RequireTrustDomainFromString("example.org")
	if tc.name == "full" {
		td = spiffeid.RequireTrustDomainFromString("mesh.test")
	}
	for key, body := range cm.Data {
		decls, err := policy.Parse(key, []byte(body), policy.Options{TrustDomains: []spiffeid.TrustDomain{td}})
		if err != nil || len(decls) != 1 {
			t.Errorf("declaration %s from values is refused by the control plane: %v\n%s", key, err, body)
		}
	}
	if tc.name == "full" {
		if len(cm.Data) != 2 || !slices.Equal(sources, []string{cmName, "team-payments", "team-search"}) {
			t.Errorf("declarations: %d chart files, sources %v", len(cm.Data), sources)
		}
		if v := d.Spec.Template.Spec.Volumes; !slices.ContainsFunc(v, func(v corev1.Volume) bool { return v.HostPath != nil && v.HostPath.Path == "/run/spire/sockets" }) {
			t.Error("hostPath Workload API volume not rendered")
		}
	}
}

// checkKubernetesSource: with the API server as a source (the default), the
// control plane — and nothing else in the chart — gets a service-account
// token, RBAC to read ServicePolicies (everywhere, or in the namespaces
// listed) and write their status, and to hold its Lease and ACK reports in
// its own namespace; the flags say the same.
// checkMemoryLimit: a container with a memory limit tells the Go runtime
// (GOMEMLIMIT, in bytes), so the garbage collector holds the heap under it
// rather than letting it grow to twice what is live; without a limit, no
// GOMEMLIMIT.
func checkMemoryLimit(t *testing.T, c corev1.Container) {
	t.Helper()
	var ref *corev1.ResourceFieldSelector
	for _, e := range c.Env {
		if e.Name == "GOMEMLIMIT" {
			if e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil {
				t.Errorf("%s: GOMEMLIMIT = %+v, want it from the memory limit", c.Name, e)
				return
			}
			ref = e.ValueFrom.ResourceFieldRef
		}
	}
	_, limited := c.Resources.Limits[corev1.ResourceMemory]
	switch {
	case limited && ref == nil:
		t.Errorf("%s: memory limit %v but no GOMEMLIMIT", c.Name, c.Resources.Limits.Memory())
	case !limited && ref != nil:
		t.Errorf("%s: GOMEMLIMIT without a memory limit", c.Name)
	case limited && (ref.ContainerName != c.Name || ref.Resource != "limits.memory" || ref.Divisor.String() != "1"):
		t.Errorf("%s: GOMEMLIMIT from %+v, want limits.memory of this container in bytes", c.Name, ref)
	}
}

// TestControlPlaneMemoryLimit: GOMEMLIMIT follows the control plane's
// memory limit whatever the values say of it: from the limit, in bytes, when
// there is one; absent when there is none (resources or limits removed, or
// a limit on CPU only), where the downward API would give the node's
// memory, not a limit of the container's.
func TestControlPlaneMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		set  []string
		want bool
	}{
		{nil, true},
		{[]string{"controlPlane.resources.limits.memory=1Gi"}, true},
		{[]string{"controlPlane.resources.limits=null"}, false},
		{[]string{"controlPlane.resources.limits.memory=null", "controlPlane.resources.limits.cpu=2"}, false},
		{[]string{"controlPlane.resources=null"}, false},
	} {
		t.Run(strings.Join(append([]string{"defaults"}, tc.set...), ","), func(t *testing.T) {
			r := render(t, nil, tc.set...)
			d, ok := r.get("Deployment", release+"-latch-control-plane").(*appsv1.Deployment)
			if !ok {
				t.Fatal("control plane Deployment not rendered")
			}
			c := d.Spec.Template.Spec.Containers[0]
			checkMemoryLimit(t, c)
			has := slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMEMLIMIT" })
			if has != tc.want {
				t.Errorf("GOMEMLIMIT set: %v, want %v (limits %v)", has, tc.want, c.Resources.Limits)
			}
		})
	}
}

func checkKubernetesSource(t *testing.T, r *rendered, tc chartCase, d *appsv1.Deployment, env []string) {
	t.Helper()
	name := d.Spec.Template.Spec.ServiceAccountName
	sa, ok := r.get("ServiceAccount", name).(*corev1.ServiceAccount)
	if !ok {
		t.Fatalf("ServiceAccount %s not rendered", name)
	}
	args := d.Spec.Template.Spec.Containers[0].Args
	token := sa.AutomountServiceAccountToken != nil && *sa.AutomountServiceAccountToken &&
		d.Spec.Template.Spec.AutomountServiceAccountToken != nil && *d.Spec.Template.Spec.AutomountServiceAccountToken
	if tc.filesOnly {
		if token || slices.Contains(args, "--kubernetes") {
			t.Errorf("files only: token %v, args %q", token, args)
		}
		return
	}
	if !token || !slices.Contains(args, "--kubernetes") || !slices.Contains(env, "POD_NAME") || !slices.Contains(env, "POD_NAMESPACE") {
		t.Errorf("kubernetes source: token %v, args %q, env %v", token, args, env)
	}
	if lease, _ := argValue(args, "--lease-name"); lease != name {
		t.Errorf("--lease-name=%s, want %s", lease, name)
	}
	cr, ok := r.get("ClusterRole", name).(*rbacv1.ClusterRole)
	if !ok {
		t.Fatalf("ClusterRole %s not rendered", name)
	}
	can := func(rules []rbacv1.PolicyRule, group, resource, verb string) bool {
		for _, rule := range rules {
			if slices.Contains(rule.APIGroups, group) && slices.Contains(rule.Resources, resource) && slices.Contains(rule.Verbs, verb) {
				return true
			}
		}
		return false
	}
	for _, want := range []struct{ resource, verb string }{
		{"servicepolicies", "list"}, {"servicepolicies", "watch"}, {"servicepolicies/status", "patch"},
	} {
		if !can(cr.Rules, "latch.dev", want.resource, want.verb) {
			t.Errorf("ClusterRole cannot %s %s", want.verb, want.resource)
		}
	}
	if can(cr.Rules, "latch.dev", "servicepolicies", "update") || can(cr.Rules, "latch.dev", "servicepolicies", "delete") {
		t.Error("the control plane may change service owners' ServicePolicies, not only their status")
	}
	role, ok := r.get("Role", name).(*rbacv1.Role)
	if !ok || !can(role.Rules, "coordination.k8s.io", "leases", "update") || !can(role.Rules, "", "configmaps", "patch") {
		t.Errorf("Role %s: %+v", name, role)
	}
	namespaces := []string{namespace}
	if tc.name == "full" {
		namespaces = append(namespaces, "shop", "payments")
		if v, _ := argValue(args, "--namespaces"); v != "shop,payments" {
			t.Errorf("--namespaces=%s", v)
		}
		if r.count("ClusterRoleBinding") != 0 {
			t.Error("a ClusterRoleBinding although namespaces are listed")
		}
	} else if crb, ok := r.get("ClusterRoleBinding", name).(*rbacv1.ClusterRoleBinding); !ok || crb.RoleRef.Name != name || crb.Subjects[0].Name != name {
		t.Errorf("ClusterRoleBinding %+v", crb)
	}
	for _, ns := range namespaces {
		rb, ok := r.byName["RoleBinding/"+name+"@"+ns].(*rbacv1.RoleBinding)
		if !ok || rb.Subjects[0].Name != name || rb.Subjects[0].Namespace != namespace {
			t.Errorf("RoleBinding in %s: %+v", ns, rb)
		}
	}
	if tmpl, _ := argValue(args, "--id-template"); tmpl == "" {
		t.Error("no --id-template")
	} else if _, err := policy.ParseIDTemplate(tmpl); err != nil {
		t.Error(err)
	}
	// The injector never gets a token.
	if inj, ok := r.get("Deployment", "t-latch-injector").(*appsv1.Deployment); ok {
		if a := inj.Spec.Template.Spec.AutomountServiceAccountToken; a == nil || *a {
			t.Error("the injector's pods mount a service-account token")
		}
	}
}

func checkInjector(t *testing.T, r *rendered, tc chartCase) {
	t.Helper()
	name := "t-latch-injector"
	d, ok := r.get("Deployment", name).(*appsv1.Deployment)
	if !ok {
		t.Fatalf("Deployment %s not rendered", name)
	}
	c := d.Spec.Template.Spec.Containers[0]
	if c.Args[0] != "inject" {
		t.Errorf("injector args %q", c.Args)
	}
	mountOf := func(file string) *corev1.Volume {
		for _, m := range c.VolumeMounts {
			if path.Dir(file) == m.MountPath {
				for i, v := range d.Spec.Template.Spec.Volumes {
					if v.Name == m.Name {
						return &d.Spec.Template.Spec.Volumes[i]
					}
				}
			}
		}
		return nil
	}

	// The injector's config file is the rendered ConfigMap, and it loads with
	// the injector's own strict loader.
	cfgPath, _ := argValue(c.Args, "--config")
	v := mountOf(cfgPath)
	if v == nil || v.ConfigMap == nil {
		t.Fatalf("--config=%s is not on a ConfigMap volume", cfgPath)
	}
	cm, ok := r.get("ConfigMap", v.ConfigMap.Name).(*corev1.ConfigMap)
	if !ok || cm.Data[path.Base(cfgPath)] == "" {
		t.Fatalf("ConfigMap %s with key %s not rendered", v.ConfigMap.Name, path.Base(cfgPath))
	}
	f := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(f, []byte(cm.Data[path.Base(cfgPath)]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := inject.LoadConfig(f)
	if err != nil {
		t.Fatalf("injector refuses the chart's config: %v\n%s", err, cm.Data[path.Base(cfgPath)])
	}
	if cfg.ControlPlane.Address != tc.sidecarCP || cfg.ControlPlane.ServerID != tc.sidecarCPID {
		t.Errorf("sidecars sent to %q (%q), want %q (%q)", cfg.ControlPlane.Address, cfg.ControlPlane.ServerID, tc.sidecarCP, tc.sidecarCPID)
	}
	if cfg.Image != c.Image {
		t.Errorf("sidecar image %q differs from the injector's %q", cfg.Image, c.Image)
	}
	if cfg.RunAsUser == 0 || cfg.Resources.Limits.Memory().IsZero() {
		t.Errorf("sidecar config %+v lacks runAsUser or a memory limit", cfg)
	}

	// Serving certificate: the Secret the pod mounts holds a pair whose CA is
	// the webhook's caBundle and whose names cover the Service.
	certPath, _ := argValue(c.Args, "--tls-cert")
	keyPath, _ := argValue(c.Args, "--tls-key")
	tv := mountOf(certPath)
	if tv == nil || tv.Secret == nil || mountOf(keyPath) != tv {
		t.Fatalf("--tls-cert/--tls-key not on one Secret volume")
	}
	whc, ok := r.get("MutatingWebhookConfiguration", name).(*admissionregistrationv1.MutatingWebhookConfiguration)
	if !ok {
		t.Fatalf("MutatingWebhookConfiguration %s not rendered", name)
	}
	svcDNS := name + "." + namespace + ".svc"
	if tc.certManager {
		cert, ok := r.get("Certificate", name).(*certManagerCertificate)
		if !ok || cert.Spec.SecretName != tv.Secret.SecretName || !slices.Contains(cert.Spec.DNSNames, svcDNS) {
			t.Errorf("cert-manager Certificate %+v does not issue %s for %s", cert, tv.Secret.SecretName, svcDNS)
		}
		if ann := whc.Annotations["cert-manager.io/inject-ca-from"]; ann != namespace+"/"+name {
			t.Errorf("inject-ca-from = %q", ann)
		}
		if cert != nil && cert.Spec.IssuerRef.Kind == "Issuer" {
			if _, ok := r.get("Issuer", cert.Spec.IssuerRef.Name).(*certManagerIssuer); !ok {
				t.Errorf("Certificate refers to Issuer %s, not rendered", cert.Spec.IssuerRef.Name)
			}
		}
	} else {
		sec, ok := r.get("Secret", tv.Secret.SecretName).(*corev1.Secret)
		if !ok {
			t.Fatalf("Secret %s not rendered", tv.Secret.SecretName)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(whc.Webhooks[0].ClientConfig.CABundle) {
			t.Fatal("webhook caBundle holds no PEM certificate")
		}
		blk, _ := pem.Decode(sec.Data["tls.crt"])
		if blk == nil {
			t.Fatal("tls.crt is not PEM")
		}
		leaf, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: svcDNS, Roots: roots}); err != nil {
			t.Errorf("serving certificate does not verify for %s against the caBundle: %v", svcDNS, err)
		}
		if string(sec.Data["ca.crt"]) != string(whc.Webhooks[0].ClientConfig.CABundle) {
			t.Error("Secret ca.crt differs from the webhook caBundle")
		}
	}

	if len(whc.Webhooks) != tc.webhooks {
		t.Fatalf("%d webhooks, want %d", len(whc.Webhooks), tc.webhooks)
	}
	paths := map[string]bool{}
	for _, w := range whc.Webhooks {
		where := "webhook " + w.Name
		svc := w.ClientConfig.Service
		if svc == nil || svc.Name != name || svc.Namespace != namespace || svc.Path == nil {
			t.Errorf("%s: clientConfig %+v does not call Service %s/%s", where, w.ClientConfig, namespace, name)
			continue
		}
		if _, ok := r.get("Service", svc.Name).(*corev1.Service); !ok {
			t.Errorf("%s: Service %s not rendered", where, svc.Name)
		}
		paths[*svc.Path] = true
		if w.FailurePolicy == nil || *w.FailurePolicy != tc.failure {
			t.Errorf("%s: failurePolicy %v, want %s", where, w.FailurePolicy, tc.failure)
		}
		if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone || !slices.Equal(w.AdmissionReviewVersions, []string{"v1"}) {
			t.Errorf("%s: sideEffects %v, versions %v", where, w.SideEffects, w.AdmissionReviewVersions)
		}
		if len(w.Rules) != 1 || !slices.Equal(w.Rules[0].Resources, []string{"pods"}) || !slices.Equal(w.Rules[0].Operations, []admissionregistrationv1.OperationType{admissionregistrationv1.Create}) {
			t.Errorf("%s: rules %+v, want pod CREATE only", where, w.Rules)
		}
		// The injector's own namespace and kube-system are never sent to it:
		// otherwise an injector outage could block its own recovery.
		sel, err := metav1.LabelSelectorAsSelector(w.NamespaceSelector)
		if err != nil {
			t.Fatalf("%s: namespaceSelector: %v", where, err)
		}
		for _, ns := range []string{namespace, "kube-system"} {
			if sel.Matches(labels.Set{"kubernetes.io/metadata.name": ns, "latch.dev/inject": "enabled"}) ||
				sel.Matches(labels.Set{"kubernetes.io/metadata.name": ns}) {
				t.Errorf("%s: namespaceSelector matches namespace %s", where, ns)
			}
		}
		labelled := sel.Matches(labels.Set{"kubernetes.io/metadata.name": "shop", "latch.dev/inject": "enabled"})
		plain := sel.Matches(labels.Set{"kubernetes.io/metadata.name": "shop"})
		disabled := sel.Matches(labels.Set{"kubernetes.io/metadata.name": "shop", "latch.dev/inject": "disabled"})
		pods, err := metav1.LabelSelectorAsSelector(w.ObjectSelector)
		if err != nil {
			t.Fatalf("%s: objectSelector: %v", where, err)
		}
		optedIn, optedOut, unlabelled := pods.Matches(labels.Set{"latch.dev/inject": "true"}), pods.Matches(labels.Set{"latch.dev/inject": "false"}), pods.Matches(labels.Set{"app": "x"})
		switch *svc.Path {
		case inject.PathNamespace:
			if !labelled || plain {
				t.Errorf("%s: matches labelled=%v unlabelled=%v, want only labelled namespaces", where, labelled, plain)
			}
			// In an enabled namespace every pod asks, unless labelled out.
			if !optedIn || !unlabelled || optedOut {
				t.Errorf("%s: pods matched: opted in %v, unlabelled %v, opted out %v", where, optedIn, unlabelled, optedOut)
			}
		case inject.PathPod:
			if labelled || !plain || disabled {
				t.Errorf("%s: matches labelled=%v unlabelled=%v disabled=%v, want only unlabelled namespaces", where, labelled, plain, disabled)
			}
			// Elsewhere only pods that asked for latch meet the webhook.
			if !optedIn || unlabelled || optedOut {
				t.Errorf("%s: pods matched: opted in %v, unlabelled %v, opted out %v; only opted-in pods may depend on the injector", where, optedIn, unlabelled, optedOut)
			}
		default:
			t.Errorf("%s: path %s is not served by the injector", where, *svc.Path)
		}
	}
	if !paths[inject.PathNamespace] {
		t.Errorf("no webhook for labelled namespaces")
	}
	if tc.name == "full" {
		if d.Spec.Template.Spec.Containers[0].Image != "registry.example/latch@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" {
			t.Errorf("image %q, want by digest", d.Spec.Template.Spec.Containers[0].Image)
		}
		if p, _ := argValue(c.Args, "--tls-profile"); p != "intermediate" {
			t.Errorf("--tls-profile=%s", p)
		}
		if cfg.AdminPort != 15090 || cfg.WorkloadAPI.Source != inject.SourceHostPath || cfg.LogLevel != "warn" {
			t.Errorf("sidecar config %+v does not follow the values", cfg)
		}
		np, ok := r.get("NetworkPolicy", name).(*networkingv1.NetworkPolicy)
		if !ok || len(np.Spec.Ingress) != 1 || len(np.Spec.Ingress[0].From) != 1 || np.Spec.Ingress[0].Ports[0].Port.StrVal != "webhook" {
			t.Errorf("injector NetworkPolicy %+v", np)
		}
		sm, ok := r.get("ServiceMonitor", "t-latch-control-plane").(*serviceMonitor)
		if !ok || sm.Spec.Endpoints[0].Port != "http-admin" || sm.Labels["release"] != "prometheus" {
			t.Errorf("ServiceMonitor %+v", sm)
		}
		// Sidecars are scraped on the port name the injector gives them.
		if pm, ok := r.get("PodMonitor", "t-latch-sidecars").(*podMonitor); !ok || pm.Spec.PodMetricsEndpoints[0].Port != inject.AdminPortName || !pm.Spec.NamespaceSelector.Any {
			t.Errorf("PodMonitor %+v", pm)
		}
		if w := whc.Webhooks[1]; w.ObjectSelector == nil || w.ObjectSelector.MatchLabels["latch.dev/inject"] != "true" {
			t.Errorf("pod webhook objectSelector %+v", w.ObjectSelector)
		}
	}
}

func checkDashboard(t *testing.T, r *rendered, tc chartCase) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(chartDir(t), "dashboards", "*.json"))
	var cm *corev1.ConfigMap
	for _, o := range r.objs {
		if c, isCM := o.(*corev1.ConfigMap); isCM && strings.HasSuffix(c.Name, "-dashboards") {
			cm = c
		}
	}
	ok := cm != nil
	if len(files) == 0 || tc.name == "injector only" {
		if ok {
			t.Error("dashboard ConfigMap rendered without dashboards or with dashboards.enabled=false")
		}
		return
	}
	if !ok {
		t.Fatal("dashboards/ has files but no dashboard ConfigMap was rendered")
	}
	if cm.Labels["grafana_dashboard"] != "1" {
		t.Errorf("dashboard labels %v", cm.Labels)
	}
	for _, f := range files {
		want, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(cm.Data[filepath.Base(f)]) != strings.TrimSpace(string(want)) {
			t.Errorf("dashboard %s not carried verbatim", filepath.Base(f))
		}
	}
}

// TestValuesSchemaRejects: bad values make helm fail before anything is
// rendered, naming the offending key.
func TestValuesSchemaRejects(t *testing.T) {
	tests := []struct {
		set  []string
		want string
	}{
		{[]string{"injector.failurePolicy=Sometimes"}, "failurePolicy"},
		{[]string{"injector.tlsProfile=legacy"}, "tlsProfile"},
		{[]string{"injector.timeoutSeconds=31"}, "timeoutSeconds"},
		{[]string{"workloadAPI.source=secret"}, "source"},
		{[]string{"image.pullPolicy=Sometimes"}, "pullPolicy"},
		{[]string{"image.digest=latest"}, "digest"},
		{[]string{"sidecar.runAsUser=0"}, "runAsUser"},
		{[]string{"sidecar.adminPort=70000"}, "adminPort"},
		{[]string{"controlPlane.port=0"}, "port"},
		{[]string{"controlPlane.replicas=0"}, "replicas"},
		{[]string{"trustDomain=Example.ORG/x"}, "trustDomain"},
		{[]string{"trustDomain="}, "trustDomain"},
		{[]string{"unknownKey=1"}, "unknownKey"},
		{[]string{"controlPlane.replica=3"}, "replica"},
		{[]string{"injector.podOptIn.enable=true"}, "enable"},
		{[]string{"sidecar.resources.limits.memory=lots"}, "memory"},
		{[]string{"sidecar.controlPlane.serverID=latch"}, "serverID"},
		{[]string{"controlPlane.declarations.Bad_Name.spiffeID=spiffe://example.org/x"}, "Bad_Name"},
		{[]string{"controlPlane.declarations.web.inbound=null"}, "spiffeID"},
		{[]string{"certManager.issuerRef.kind=Vault"}, "kind"},
		{[]string{"serviceMonitor.interval=often"}, "interval"},
		{[]string{"controlPlane.kubernetes.idTemplate=spiffe://{trustDomain}/sa/{serviceAccount}"}, "idTemplate"},
		{[]string{"controlPlane.kubernetes.namespace=shop"}, "namespace"},
		{[]string{"controlPlane.kubernetes.namespaces[0]=Shop"}, "namespaces"},
		// Checked by the templates rather than the schema.
		{[]string{"injector.podOptIn.objectSelector=null"}, "an empty selector sends every pod of every unlabelled namespace to the injector"},
		{[]string{"controlPlane.enabled=false", "sidecar.controlPlane.address=cp.example:18000"}, "serverID is required"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.set, ","), func(t *testing.T) {
			out, stderr, err := runHelm(t, templateArgs(nil, tt.set)...)
			if err == nil {
				t.Fatalf("helm template accepted %v:\n%.400s", tt.set, out)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("error does not name %q:\n%s", tt.want, stderr)
			}
		})
	}
}
