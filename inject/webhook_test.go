package inject_test

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"go.yaml.in/yaml/v3"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"latch.dev/latch/inject"
	"latch.dev/latch/proxy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func baseConfig() inject.Config {
	return inject.Config{
		Image: "ghcr.io/latch-dev/latch:1.0.0",
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("50m"), corev1.ResourceMemory: resource.MustParse("32Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
		},
	}
}

func cpConfig() inject.Config {
	c := baseConfig()
	c.ControlPlane = inject.ControlPlane{Address: "latch-control-plane.latch.svc:18000", ServerID: "spiffe://mesh.test/ns/latch/sa/latch-control-plane"}
	c.WorkloadAPI = inject.WorkloadAPI{Source: inject.SourceHostPath, HostPath: "/run/spire/sockets", SocketName: "agent.sock"}
	return c
}

func sidecarOf(t *testing.T, pod *corev1.Pod) corev1.Container {
	t.Helper()
	if len(pod.Spec.InitContainers) == 0 || pod.Spec.InitContainers[0].Name != inject.ContainerName {
		t.Fatalf("first init container is not %q: %+v", inject.ContainerName, pod.Spec.InitContainers)
	}
	return pod.Spec.InitContainers[0]
}

func volumeOf(pod *corev1.Pod, name string) *corev1.Volume {
	for i := range pod.Spec.Volumes {
		if pod.Spec.Volumes[i].Name == name {
			return &pod.Spec.Volumes[i]
		}
	}
	return nil
}

// checkHardened asserts the sidecar's pod-security settings.
func checkHardened(t *testing.T, c corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Fatal("no securityContext")
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Error("runAsNonRoot not true")
	case sc.RunAsUser == nil || *sc.RunAsUser != 65532:
		t.Errorf("runAsUser = %v, want 65532", sc.RunAsUser)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("readOnlyRootFilesystem not true")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("allowPrivilegeEscalation not false")
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0:
		t.Errorf("capabilities = %+v, want drop ALL and nothing added", sc.Capabilities)
	case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Errorf("seccompProfile = %+v, want RuntimeDefault", sc.SeccompProfile)
	}
}

func checkProbes(t *testing.T, c corev1.Container, adminPort int32) {
	t.Helper()
	if len(c.Ports) == 0 || c.Ports[0].Name != "latch-admin" || c.Ports[0].ContainerPort != adminPort {
		t.Fatalf("ports = %+v, want latch-admin %d first", c.Ports, adminPort)
	}
	for name, want := range map[string]struct {
		p    *corev1.Probe
		path string
	}{"readiness": {c.ReadinessProbe, "/readyz"}, "liveness": {c.LivenessProbe, "/healthz"}, "startup": {c.StartupProbe, "/readyz"}} {
		if want.p == nil || want.p.HTTPGet == nil {
			t.Errorf("%s probe missing or not HTTP", name)
			continue
		}
		if want.p.HTTPGet.Path != want.path || want.p.HTTPGet.Port.String() != "latch-admin" {
			t.Errorf("%s probe = %s on %s, want %s on latch-admin", name, want.p.HTTPGet.Path, want.p.HTTPGet.Port.String(), want.path)
		}
	}
}

func TestInjectStaticPolicyFromAnnotations(t *testing.T) {
	ts := startServer(t, baseConfig())
	pod := fixturePod(t)
	out := ts.review(t, inject.PathNamespace, podReview(t, pod))
	resp := out.Response
	if !resp.Allowed || resp.UID != "705ab4f5-6393-11e8-b7cc-42010a800002" {
		t.Fatalf("allowed=%v uid=%q result=%+v", resp.Allowed, resp.UID, resp.Result)
	}
	got := applyPatch(t, pod, resp)

	// Native sidecar: first init container, restartPolicy Always; the pod's
	// own init container and app container untouched behind it.
	c := sidecarOf(t, got)
	if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("restartPolicy = %v, want Always", c.RestartPolicy)
	}
	if len(got.Spec.InitContainers) != 2 || got.Spec.InitContainers[1].Name != "migrate" {
		t.Errorf("init containers = %v, want [latch migrate]", names(got.Spec.InitContainers))
	}
	if len(got.Spec.Containers) != 1 || got.Spec.Containers[0].Name != "web" || len(got.Spec.Containers[0].VolumeMounts) != 1 {
		t.Errorf("app container changed: %+v", got.Spec.Containers)
	}
	if c.Image != "ghcr.io/latch-dev/latch:1.0.0" {
		t.Errorf("image = %q", c.Image)
	}
	wantArgs := []string{"proxy", "--config=/etc/latch/latch.yaml", "--admin-address=:15000"}
	if !slices.Equal(c.Args, wantArgs) {
		t.Errorf("args = %q, want %q", c.Args, wantArgs)
	}
	checkHardened(t, c)
	checkProbes(t, c, 15000)
	if c.Ports[1].Name != "latch-in-8443" || c.Ports[1].ContainerPort != 8443 {
		t.Errorf("inbound port = %+v", c.Ports[1])
	}
	if q := c.Resources.Limits[corev1.ResourceMemory]; q.String() != "128Mi" {
		t.Errorf("memory limit = %s", q.String())
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if env["SPIFFE_ENDPOINT_SOCKET"].Value != "unix:///spiffe-workload-api/spire-agent.sock" {
		t.Errorf("SPIFFE_ENDPOINT_SOCKET = %q", env["SPIFFE_ENDPOINT_SOCKET"].Value)
	}
	if e := env["GOMEMLIMIT"]; e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("GOMEMLIMIT = %+v, want from limits.memory", e)
	}

	// Volumes: the pod's own, then the CSI Workload API socket and the config
	// projected from the pod's annotation.
	if volumeOf(got, "kube-api-access-abcde") == nil {
		t.Error("pod's own volume lost")
	}
	wl := volumeOf(got, inject.VolumeWorkloadAPI)
	if wl == nil || wl.CSI == nil || wl.CSI.Driver != "csi.spiffe.io" || wl.CSI.ReadOnly == nil || !*wl.CSI.ReadOnly {
		t.Fatalf("workload API volume = %+v, want read-only csi.spiffe.io", wl)
	}
	cv := volumeOf(got, inject.VolumeConfig)
	if cv == nil || cv.DownwardAPI == nil || len(cv.DownwardAPI.Items) != 1 ||
		cv.DownwardAPI.Items[0].FieldRef.FieldPath != "metadata.annotations['latch.dev/config']" || cv.DownwardAPI.Items[0].Path != "latch.yaml" {
		t.Fatalf("config volume = %+v", cv)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	if m := mounts[inject.VolumeWorkloadAPI]; m.MountPath != "/spiffe-workload-api" || !m.ReadOnly {
		t.Errorf("workload API mount = %+v", m)
	}
	if m := mounts[inject.VolumeConfig]; m.MountPath != "/etc/latch" || !m.ReadOnly {
		t.Errorf("config mount = %+v", m)
	}

	// The generated config is the pod's policy, in the config file format.
	if got.Annotations[inject.AnnotationStatus] != inject.StatusInjected {
		t.Errorf("status annotation = %q", got.Annotations[inject.AnnotationStatus])
	}
	if got.Annotations["latch.dev/inbound"] != "8443:8080" {
		t.Error("pod's own annotations lost")
	}
	var cfg map[string]any
	dec := yaml.NewDecoder(strings.NewReader(got.Annotations[inject.AnnotationConfig]))
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("config annotation is not YAML: %v", err)
	}
	want := map[string]any{
		"tls": map[string]any{"profile": "modern"},
		"inbound": []any{map[string]any{
			"name": "inbound-8443", "listen": ":8443", "app": "127.0.0.1:8080",
			"allow": []any{
				map[string]any{"id": "spiffe://mesh.test/ns/shop/sa/frontend"},
				map[string]any{"pathPrefix": "spiffe://mesh.test/ns/batch"},
			},
		}},
		"outbound": []any{map[string]any{
			"name": "outbound-15001", "listen": "127.0.0.1:15001",
			"upstreams": []any{"backend.shop.svc:8443"}, "serverID": "spiffe://mesh.test/ns/shop/sa/backend",
		}},
	}
	if g, w := mustJSON(t, cfg), mustJSON(t, want); g != w {
		t.Errorf("generated config\n got %s\nwant %s", g, w)
	}
	// And the sidecar's own loader takes it as it is.
	pc, err := proxy.Parse(inject.AnnotationConfig, []byte(got.Annotations[inject.AnnotationConfig]))
	if err != nil {
		t.Fatalf("latch proxy refuses the generated config: %v", err)
	}
	if len(pc.Inbound) != 1 || len(pc.Outbound) != 1 || pc.TLS.Name != "modern" || pc.Inbound[0].Allow.Len() != 2 {
		t.Errorf("proxy reads the generated config as %+v", pc)
	}

	// Idempotent: the injected pod sent again gets no patch.
	again := ts.review(t, inject.PathNamespace, podReview(t, got))
	if !again.Response.Allowed || len(again.Response.Patch) != 0 || again.Response.PatchType != nil {
		t.Errorf("second pass: allowed=%v patch=%s", again.Response.Allowed, again.Response.Patch)
	}
}

func TestInjectControlPlaneHostPath(t *testing.T) {
	ts := startServer(t, cpConfig())
	// A bare pod with no annotations, volumes or init containers in an
	// enabled namespace: the paths that must be created, not appended to.
	pod := &corev1.Pod{}
	pod.APIVersion, pod.Kind = "v1", "Pod"
	pod.Name = "bare"
	pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "app"}}
	got := applyPatch(t, pod, ts.review(t, inject.PathNamespace, podReview(t, pod)).Response)
	c := sidecarOf(t, got)
	wantArgs := []string{"proxy",
		"--xds-address=latch-control-plane.latch.svc:18000",
		"--xds-server-id=spiffe://mesh.test/ns/latch/sa/latch-control-plane",
		"--state-dir=/var/lib/latch",
		"--admin-address=:15000"}
	if !slices.Equal(c.Args, wantArgs) {
		t.Errorf("args = %q, want %q", c.Args, wantArgs)
	}
	checkHardened(t, c)
	checkProbes(t, c, 15000)
	wl := volumeOf(got, inject.VolumeWorkloadAPI)
	if wl == nil || wl.HostPath == nil || wl.HostPath.Path != "/run/spire/sockets" || wl.HostPath.Type == nil || *wl.HostPath.Type != corev1.HostPathDirectory {
		t.Fatalf("workload API volume = %+v, want hostPath directory", wl)
	}
	if st := volumeOf(got, inject.VolumeState); st == nil || st.EmptyDir == nil {
		t.Errorf("state volume = %+v, want emptyDir", st)
	}
	if volumeOf(got, inject.VolumeConfig) != nil {
		t.Error("control-plane pod got a static config volume")
	}
	if _, ok := got.Annotations[inject.AnnotationConfig]; ok {
		t.Error("control-plane pod got a static config annotation")
	}
	for _, e := range c.Env {
		if e.Name == "SPIFFE_ENDPOINT_SOCKET" && e.Value != "unix:///spiffe-workload-api/agent.sock" {
			t.Errorf("SPIFFE_ENDPOINT_SOCKET = %q", e.Value)
		}
	}

	// Opted in by pod label only (the chart's objectSelector variant).
	labelled := pod.DeepCopy()
	labelled.Labels = map[string]string{"latch.dev/inject": "true"}
	sidecarOf(t, applyPatch(t, labelled, ts.review(t, inject.PathPod, podReview(t, labelled)).Response))

	// Explicit annotation and a TLS profile.
	pod.Annotations = map[string]string{"latch.dev/policy": "control-plane", "latch.dev/tls-profile": "intermediate", "latch.dev/inject": "true"}
	got = applyPatch(t, pod, ts.review(t, inject.PathPod, podReview(t, pod)).Response)
	if c := sidecarOf(t, got); !slices.Contains(c.Args, "--tls-profile=intermediate") {
		t.Errorf("args = %q, want --tls-profile=intermediate", c.Args)
	}
}

func TestNoInjection(t *testing.T) {
	ts := startServer(t, cpConfig())
	tests := []struct {
		name string
		path string
		ann  map[string]string
		mod  func(*corev1.Pod)
	}{
		{"opted out in an enabled namespace", inject.PathNamespace, map[string]string{"latch.dev/inject": "false"}, nil},
		{"opted out with malformed policy is still out", inject.PathNamespace, map[string]string{"latch.dev/inject": "false", "latch.dev/inbound": "junk"}, nil},
		{"unlabelled namespace, no annotation", inject.PathPod, nil, nil},
		{"unlabelled namespace, opted out", inject.PathPod, map[string]string{"latch.dev/inject": "false"}, nil},
		{"opted out by label", inject.PathNamespace, nil, func(p *corev1.Pod) { p.Labels = map[string]string{"latch.dev/inject": "false"} }},
		{"annotation out wins over label in", inject.PathPod, map[string]string{"latch.dev/inject": "false"}, func(p *corev1.Pod) {
			p.Labels = map[string]string{"latch.dev/inject": "true"}
		}},
		{"already injected (status)", inject.PathNamespace, map[string]string{"latch.dev/status": "injected"}, nil},
		{"already injected (container)", inject.PathNamespace, nil, func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "latch", Image: "x"}}
		}},
		{"host network", inject.PathNamespace, nil, func(p *corev1.Pod) { p.Spec.HostNetwork = true }},
		{"own container named latch", inject.PathNamespace, nil, func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "latch", Image: "x"})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := &corev1.Pod{}
			pod.Name, pod.Annotations = "p", tt.ann
			pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "app"}}
			if tt.mod != nil {
				tt.mod(pod)
			}
			resp := ts.review(t, tt.path, podReview(t, pod)).Response
			if !resp.Allowed || len(resp.Patch) != 0 || resp.PatchType != nil {
				t.Errorf("allowed=%v patch=%s, want allowed without patch", resp.Allowed, resp.Patch)
			}
			// A pod that asked for a sidecar and did not get one is told why.
			if want := tt.name == "host network" || tt.name == "own container named latch"; want != (len(resp.Warnings) > 0) {
				t.Errorf("warnings %q", resp.Warnings)
			}
		})
	}
}

func TestMalformedAnnotationsRefused(t *testing.T) {
	ts := startServer(t, baseConfig())
	const allow = "spiffe://mesh.test/ns/a/sa/b"
	const sid = "@spiffe://mesh.test/ns/a/sa/backend"
	tests := []struct {
		name string
		ann  map[string]string
		want []string // substrings of the refusal message
	}{
		{"inject not a boolean", map[string]string{"latch.dev/inject": "yes"}, []string{"latch.dev/inject", `"true" or "false"`}},
		{"inject label not a boolean", map[string]string{"test/label": "enabled"}, []string{"latch.dev/inject", `"enabled"`}},
		{"no policy and no control plane", map[string]string{}, []string{"no control plane", "latch.dev/inbound"}},
		{"policy control-plane without one", map[string]string{"latch.dev/policy": "control-plane"}, []string{"latch.dev/policy", "no control plane"}},
		{"policy unknown value", map[string]string{"latch.dev/policy": "static"}, []string{"latch.dev/policy", `"control-plane"`}},
		{"inbound missing colon", map[string]string{"latch.dev/inbound": "8443", "latch.dev/allow": allow}, []string{"latch.dev/inbound", "SIDECAR_PORT:APP_PORT"}},
		{"inbound port zero", map[string]string{"latch.dev/inbound": "0:8080", "latch.dev/allow": allow}, []string{"latch.dev/inbound", "sidecar port", "1-65535"}},
		{"inbound port too big", map[string]string{"latch.dev/inbound": "8443:70000", "latch.dev/allow": allow}, []string{"app port", "70000"}},
		{"inbound port not a number", map[string]string{"latch.dev/inbound": "https:8080", "latch.dev/allow": allow}, []string{"latch.dev/inbound", `"https"`}},
		{"inbound same port both sides", map[string]string{"latch.dev/inbound": "8080:8080", "latch.dev/allow": allow}, []string{"cannot share a port"}},
		{"inbound duplicate", map[string]string{"latch.dev/inbound": "8443:8080,8443:9090", "latch.dev/allow": allow}, []string{"port 8443 is already an inbound sidecar port"}},
		{"inbound app port is a sidecar port", map[string]string{"latch.dev/inbound": "8443:9443,9443:8080", "latch.dev/allow": allow}, []string{"app port 9443 is also an inbound sidecar port"}},
		{"inbound on admin port", map[string]string{"latch.dev/inbound": "15000:8080", "latch.dev/allow": allow}, []string{"port 15000", "admin port"}},
		{"inbound empty", map[string]string{"latch.dev/inbound": " , ", "latch.dev/allow": allow}, []string{"latch.dev/inbound", "is empty"}},
		{"inbound without allow", map[string]string{"latch.dev/inbound": "8443:8080"}, []string{"latch.dev/allow", "every peer would be refused"}},
		{"allow without inbound", map[string]string{"latch.dev/allow": allow, "latch.dev/outbound": "15001=b:1" + sid}, []string{"latch.dev/allow", "latch.dev/inbound is not set"}},
		{"allow malformed id", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": "spiffe://"}, []string{"latch.dev/allow", `entry "spiffe://"`}},
		{"allow unknown kind", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": "prefix=spiffe://td/x"}, []string{"latch.dev/allow", "unknown allow rule kind"}},
		{"allow trustDomain written as an ID", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": "trustDomain=spiffe://mesh.test/ns/prod/sa/db-admin"}, []string{"latch.dev/allow", "bare trust domain name", "use id for exactly spiffe://mesh.test/ns/prod/sa/db-admin"}},
		{"allow pathPrefix without path", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": "pathPrefix=spiffe://mesh.test"}, []string{"has no path"}},
		{"allow not a spiffe id", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": "frontend"}, []string{"latch.dev/allow", `"frontend"`}},
		{"proxy-protocol without inbound", map[string]string{"latch.dev/proxy-protocol": "8443", "latch.dev/outbound": "15001=b:1" + sid}, []string{"latch.dev/proxy-protocol", "latch.dev/inbound is not set"}},
		{"proxy-protocol on a port that is not inbound", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/proxy-protocol": "8080"}, []string{"latch.dev/proxy-protocol", "port 8080 is not an inbound sidecar port"}},
		{"proxy-protocol twice", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/proxy-protocol": "8443,8443"}, []string{"latch.dev/proxy-protocol", "port 8443 listed twice"}},
		{"proxy-protocol not a port", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/proxy-protocol": "v2"}, []string{"latch.dev/proxy-protocol", `entry "v2"`}},
		{"proxy-protocol empty", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/proxy-protocol": ""}, []string{"latch.dev/proxy-protocol", "is empty"}},
		{"policy conflicts with proxy-protocol", map[string]string{"latch.dev/policy": "control-plane", "latch.dev/proxy-protocol": "8443"}, []string{"latch.dev/policy", "conflicts with latch.dev/proxy-protocol"}},
		{"federates-with alone", map[string]string{"latch.dev/federates-with": "partner.test"}, []string{"latch.dev/federates-with", "neither latch.dev/inbound nor latch.dev/outbound is set"}},
		{"federates-with a SPIFFE ID", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/federates-with": "spiffe://partner.test/ns/x"}, []string{"latch.dev/federates-with", "bare trust domain name"}},
		{"federates-with twice", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/federates-with": "partner.test,partner.test"}, []string{"latch.dev/federates-with", "partner.test listed twice"}},
		{"federates-with empty", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/federates-with": " "}, []string{"latch.dev/federates-with", "is empty"}},
		{"outbound shape", map[string]string{"latch.dev/outbound": "15001:backend:8443"}, []string{"latch.dev/outbound", "LOCAL_PORT=HOST:PORT@SPIFFE_ID"}},
		{"outbound no server id", map[string]string{"latch.dev/outbound": "15001=backend:8443"}, []string{"LOCAL_PORT=HOST:PORT@SPIFFE_ID"}},
		{"outbound target without port", map[string]string{"latch.dev/outbound": "15001=backend" + sid}, []string{"target \"backend\" is not HOST:PORT"}},
		{"outbound target bad port", map[string]string{"latch.dev/outbound": "15001=backend:http" + sid}, []string{"target port"}},
		{"outbound bad server id", map[string]string{"latch.dev/outbound": "15001=backend:8443@spiffe://mesh.test/a/../b"}, []string{"server ID"}},
		{"outbound port collides with inbound", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/outbound": "8443=backend:8443" + sid}, []string{"latch.dev/outbound", "port 8443 is already an inbound sidecar port"}},
		{"outbound duplicate", map[string]string{"latch.dev/outbound": "15001=a:1" + sid + ",15001=b:1" + sid}, []string{"port 15001 is already an outbound local port"}},
		// Found by FuzzParseSpec: each of these was admitted with a sidecar
		// that could not start.
		{"outbound server id is a trust domain", map[string]string{"latch.dev/outbound": "15001=backend:8443@spiffe://mesh.test"}, []string{"latch.dev/outbound", `server ID "spiffe://mesh.test" names a trust domain, not a workload`}},
		{"outbound server id is a trust domain with slash", map[string]string{"latch.dev/outbound": "15001=backend:8443@spiffe://mesh.test/"}, []string{"latch.dev/outbound", "server ID"}},
		{"outbound target host with a space", map[string]string{"latch.dev/outbound": "15001=back end:8443" + sid}, []string{"latch.dev/outbound", `target host "back end" is not a host name or IP address`}},
		{"outbound target host not UTF-8", map[string]string{"latch.dev/outbound": "15001=\x97:8443" + sid}, []string{"latch.dev/outbound", "target host \"\ufffd\" is not a host name or IP address" /* JSON carries invalid UTF-8 as U+FFFD */}},
		{"outbound target host with a control character", map[string]string{"latch.dev/outbound": "15001=db\x00:8443" + sid}, []string{"latch.dev/outbound", `target host "db\x00" is not a host name or IP address`}},
		{"outbound target host with a slash", map[string]string{"latch.dev/outbound": "15001=back/end:8443" + sid}, []string{"latch.dev/outbound", `target host "back/end"`}},
		{"outbound bracketed target host with a space", map[string]string{"latch.dev/outbound": "15001=[::1 ]:8443" + sid}, []string{"latch.dev/outbound", `target host "::1 "`}},
		{"outbound port is an app port", map[string]string{"latch.dev/inbound": "8443:8080", "latch.dev/allow": allow, "latch.dev/outbound": "8080=backend:8443" + sid}, []string{"latch.dev/outbound", "port 8080 is already the app port behind inbound port 8443"}},
		{"policy conflicts with inbound", map[string]string{"latch.dev/policy": "control-plane", "latch.dev/inbound": "8443:8080"}, []string{"latch.dev/policy", "conflicts with latch.dev/inbound"}},
		{"tls profile weak", map[string]string{"latch.dev/tls-profile": "legacy", "latch.dev/outbound": "15001=b:1" + sid}, []string{"latch.dev/tls-profile", "modern or intermediate"}},
		{"too many entries", map[string]string{"latch.dev/inbound": strings.Repeat("1:2,", 65), "latch.dev/allow": allow}, []string{"65 entries", "at most 64"}},
		{"volume name taken", map[string]string{"latch.dev/outbound": "15001=b:1" + sid, "test/volume": "latch-config"}, []string{`volume named "latch-config"`}},
		{"port name taken by app", map[string]string{"latch.dev/outbound": "15001=b:1" + sid, "test/portname": "latch-admin"}, []string{`container "app" has a port named "latch-admin"`}},
		{"admin port taken by app", map[string]string{"latch.dev/outbound": "15001=b:1" + sid, "test/port": "15000"}, []string{`container "app" declares port 15000`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := &corev1.Pod{}
			pod.Name = "p"
			pod.Annotations = tt.ann
			pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "app"}}
			if v := tt.ann["test/volume"]; v != "" {
				pod.Spec.Volumes = []corev1.Volume{{Name: v, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
			}
			if v := tt.ann["test/label"]; v != "" {
				pod.Labels = map[string]string{"latch.dev/inject": v}
			}
			if v := tt.ann["test/portname"]; v != "" {
				pod.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: v, ContainerPort: 9999}}
			}
			if tt.ann["test/port"] != "" {
				pod.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15000}}
			}
			resp := ts.review(t, inject.PathNamespace, podReview(t, pod)).Response
			if resp.Allowed || len(resp.Patch) != 0 {
				t.Fatalf("allowed=%v patch=%s, want refused", resp.Allowed, resp.Patch)
			}
			if resp.Result == nil || resp.Result.Code != http.StatusBadRequest || resp.Result.Status != "Failure" {
				t.Fatalf("result = %+v, want Failure 400", resp.Result)
			}
			for _, w := range tt.want {
				if !strings.Contains(resp.Result.Message, w) {
					t.Errorf("message %q does not contain %q", resp.Result.Message, w)
				}
			}
		})
	}
}

func TestNonPodObjectsPassUntouched(t *testing.T) {
	ts := startServer(t, baseConfig())
	dep, err := json.Marshal(readReview(t, "review-deployment.json"))
	if err != nil {
		t.Fatal(err)
	}
	update := readReview(t, "review-pod.json")
	update.Request.Operation = admissionv1.Update
	sub := readReview(t, "review-pod.json")
	sub.Request.SubResource = "status"
	for name, body := range map[string][]byte{"deployment": dep, "pod update": mustMarshal(t, update), "pod subresource": mustMarshal(t, sub)} {
		t.Run(name, func(t *testing.T) {
			resp := ts.review(t, inject.PathNamespace, body).Response
			if !resp.Allowed || len(resp.Patch) != 0 || resp.PatchType != nil || resp.Result != nil {
				t.Errorf("allowed=%v patch=%s result=%+v, want allowed untouched", resp.Allowed, resp.Patch, resp.Result)
			}
		})
	}
}

func TestHostileHTTP(t *testing.T) {
	ts := startServer(t, baseConfig())
	good := mustMarshal(t, readReview(t, "review-pod.json"))
	tests := []struct {
		name, method, path, ctype string
		body                      []byte
		want                      int
	}{
		{"GET review", http.MethodGet, inject.PathNamespace, "", nil, http.StatusMethodNotAllowed},
		{"unknown path", http.MethodPost, "/mutate", "application/json", good, http.StatusNotFound},
		{"wrong content type", http.MethodPost, inject.PathNamespace, "text/plain", good, http.StatusUnsupportedMediaType},
		{"not JSON", http.MethodPost, inject.PathNamespace, "application/json", []byte("{{{"), http.StatusBadRequest},
		{"no request", http.MethodPost, inject.PathNamespace, "application/json", []byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`), http.StatusBadRequest},
		{"body over 3 MiB", http.MethodPost, inject.PathNamespace, "application/json", bytes.Repeat([]byte(" "), inject.MaxRequestBytes+1), http.StatusRequestEntityTooLarge},
		{"health", http.MethodGet, inject.PathHealth, "", nil, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(tt.method, ts.url+tt.path, bytes.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			if tt.ctype != "" {
				req.Header.Set("Content-Type", tt.ctype)
			}
			resp, err := ts.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
	// An undecodable pod inside a valid review is refused with a message.
	r := readReview(t, "review-pod.json")
	r.Request.Object.Raw = []byte(`{"spec":{"containers":"nope"}}`)
	resp := ts.review(t, inject.PathNamespace, mustMarshal(t, r)).Response
	if resp.Allowed || resp.Result == nil || !strings.Contains(resp.Result.Message, "decoding pod") {
		t.Errorf("undecodable pod: allowed=%v result=%+v", resp.Allowed, resp.Result)
	}
}

func TestServingCertificateReload(t *testing.T) {
	ts := startServer(t, baseConfig())
	served := func() [32]byte {
		t.Helper()
		conn, err := tls.Dial("tcp", strings.TrimPrefix(ts.url, "https://"), &tls.Config{RootCAs: ts.ca.pool, ServerName: "latch-injector.latch.svc"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return sha256.Sum256(conn.ConnectionState().PeerCertificates[0].Raw)
	}
	first := served()

	c2, k2 := ts.ca.issue(t, 200)
	// A half-updated pair (new certificate, old key) is not served: the
	// previous pair stays.
	writeAtomic(t, ts.certPath, c2)
	if got := served(); got != first {
		t.Fatal("mismatched pair was served")
	}
	writeAtomic(t, ts.keyPath, k2)
	second := served()
	if second == first {
		t.Fatal("certificate not reloaded after both files were replaced")
	}
	blk := sha256.Sum256(pemDER(t, c2))
	if second != blk {
		t.Error("served certificate is not the new file's")
	}
	// Requests still work on the new certificate.
	ts.client.Transport.(*http.Transport).CloseIdleConnections()
	if resp := ts.review(t, inject.PathNamespace, mustMarshal(t, readReview(t, "review-pod.json"))).Response; !resp.Allowed {
		t.Errorf("review after reload refused: %+v", resp.Result)
	}
}

func TestConfigValidate(t *testing.T) {
	bad := map[string]func(*inject.Config){
		"no image":             func(c *inject.Config) { c.Image = "" },
		"admin port":           func(c *inject.Config) { c.AdminPort = 70000 },
		"root":                 func(c *inject.Config) { c.RunAsUser = -1 },
		"pull policy":          func(c *inject.Config) { c.ImagePullPolicy = "Sometimes" },
		"source":               func(c *inject.Config) { c.WorkloadAPI.Source = "secret" },
		"relative hostPath":    func(c *inject.Config) { c.WorkloadAPI.HostPath = "run/spire" },
		"socket path":          func(c *inject.Config) { c.WorkloadAPI.SocketName = "a/b.sock" },
		"control plane half":   func(c *inject.Config) { c.ControlPlane.ServerID = "" },
		"control plane bad id": func(c *inject.Config) { c.ControlPlane.ServerID = "latch" },
		"log level":            func(c *inject.Config) { c.LogLevel = "trace" },
	}
	if err := cpConfig().Validate(); err != nil {
		t.Fatalf("good config refused: %v", err)
	}
	for name, mod := range bad {
		c := cpConfig()
		mod(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if _, err := inject.NewWebhook(c, nil); err == nil {
			t.Errorf("%s: NewWebhook accepted it", name)
		}
	}
}

func names(cs []corev1.Container) []string {
	var n []string
	for _, c := range cs {
		n = append(n, c.Name)
	}
	return n
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	return string(mustMarshal(t, v))
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSidecarVolumesStayPrivate: no container but the sidecar may reach what
// the sidecar's volumes hold, above all the Workload API socket, whatever the
// mount's mode, subPath, container kind, or the volume's name.
func TestSidecarVolumesStayPrivate(t *testing.T) {
	hostPathMode := startServer(t, cpConfig()) // agent sockets in /run/spire/sockets
	csiMode := startServer(t, baseConfig())    // CSI; the agent's node directory is the default /run/spire/agent-sockets
	outbound := map[string]string{"latch.dev/outbound": "15001=b:1@spiffe://mesh.test/ns/a/sa/backend"}
	mount := func(name string, m corev1.VolumeMount) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			m.Name = name
			p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, m)
		}
	}
	hostVolume := func(hostPath, subPath string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "node", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: hostPath}}})
			p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "node", MountPath: "/node", SubPath: subPath})
		}
	}
	refused := func(want ...string) []string { return want }
	tests := []struct {
		name string
		srv  *testServer
		ann  map[string]string
		mod  func(*corev1.Pod)
		want []string // substrings of the refusal; nil = admitted with the sidecar
	}{
		{"app mounts the Workload API volume read-write (hostPath mode)", hostPathMode, nil,
			mount(inject.VolumeWorkloadAPI, corev1.VolumeMount{MountPath: "/spire"}),
			refused(`container "app" mounts volume "latch-spiffe-workload-api" at /spire`, "for the sidecar alone", "SVID", `latch.dev/inject: "false"`)},
		{"app mounts it read-only", hostPathMode, nil,
			mount(inject.VolumeWorkloadAPI, corev1.VolumeMount{MountPath: "/spire", ReadOnly: true}),
			refused(`mounts volume "latch-spiffe-workload-api"`)},
		{"app mounts only the socket through subPath", hostPathMode, nil,
			mount(inject.VolumeWorkloadAPI, corev1.VolumeMount{MountPath: "/run/agent.sock", SubPath: "agent.sock"}),
			refused(`mounts volume "latch-spiffe-workload-api" at /run/agent.sock`)},
		{"app mounts it through subPathExpr", hostPathMode, nil,
			mount(inject.VolumeWorkloadAPI, corev1.VolumeMount{MountPath: "/spire", SubPathExpr: "$(POD_NAME)"}),
			refused(`mounts volume "latch-spiffe-workload-api"`)},
		{"init container mounts it", hostPathMode, nil, func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "setup", Image: "x", VolumeMounts: []corev1.VolumeMount{{Name: inject.VolumeWorkloadAPI, MountPath: "/spire"}}}}
		}, refused(`init container "setup" mounts volume "latch-spiffe-workload-api"`)},
		{"second app container mounts it", hostPathMode, nil, func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "helper", Image: "x", VolumeMounts: []corev1.VolumeMount{{Name: inject.VolumeWorkloadAPI, MountPath: "/spire"}}})
		}, refused(`container "helper" mounts volume "latch-spiffe-workload-api"`)},
		{"app mounts the sidecar's state", hostPathMode, nil,
			mount(inject.VolumeState, corev1.VolumeMount{MountPath: "/state"}),
			refused(`mounts volume "latch-state"`, "last good policy")},
		{"app mounts the Workload API volume (CSI mode)", csiMode, outbound,
			mount(inject.VolumeWorkloadAPI, corev1.VolumeMount{MountPath: "/spire", ReadOnly: true}),
			refused(`mounts volume "latch-spiffe-workload-api"`)},
		{"app mounts the sidecar's config", csiMode, outbound,
			mount(inject.VolumeConfig, corev1.VolumeMount{MountPath: "/etc/latch"}),
			refused(`mounts volume "latch-config"`)},

		{"own hostPath volume on the agent directory", hostPathMode, nil, hostVolume("/run/spire/sockets", ""),
			refused(`volume "node" is hostPath /run/spire/sockets`, "SPIRE agent socket (/run/spire/sockets)")},
		{"own hostPath volume on a parent, subPath down to it", hostPathMode, nil, hostVolume("/run/spire", "sockets"),
			refused(`volume "node" is hostPath /run/spire,`)},
		{"own hostPath volume on the node's root", hostPathMode, nil, hostVolume("/", "run/spire/sockets"),
			refused(`volume "node" is hostPath /,`)},
		{"own hostPath volume on the socket itself", hostPathMode, nil, hostVolume("/run/spire/sockets/agent.sock", ""),
			refused(`volume "node" is hostPath /run/spire/sockets/agent.sock`)},
		{"own hostPath volume through /var/run", hostPathMode, nil, hostVolume("/var/run/spire/sockets", ""),
			refused(`volume "node" is hostPath /var/run/spire/sockets`)},
		{"own hostPath volume spelt unclean", hostPathMode, nil, hostVolume("/run//spire/./sockets/", ""),
			refused(`volume "node" is hostPath /run//spire/./sockets/`)},
		{"own hostPath volume, relative", hostPathMode, nil, hostVolume("run/spire/sockets", ""),
			refused(`volume "node" is hostPath run/spire/sockets`)},
		{"own hostPath volume declared but not mounted", hostPathMode, nil, func(p *corev1.Pod) {
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "node", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/run/spire/sockets"}}})
		}, refused(`volume "node" is hostPath /run/spire/sockets`)},
		{"own hostPath volume on the agent directory (CSI mode)", csiMode, outbound, hostVolume("/run/spire/agent-sockets", ""),
			refused(`volume "node" is hostPath /run/spire/agent-sockets`)},

		// Controls: what does not reach the sidecar's volumes is admitted.
		{"own hostPath volume next to the agent directory", hostPathMode, nil, hostVolume("/run/spire/sockets-other", ""), nil},
		{"own hostPath volume on /var (its run link resolves in the container)", hostPathMode, nil, hostVolume("/var", ""), nil},
		{"own emptyDir volume", hostPathMode, nil, func(p *corev1.Pod) {
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "scratch", MountPath: "/scratch"}}
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := &corev1.Pod{}
			pod.Name, pod.Annotations = "p", tt.ann
			pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "app"}}
			tt.mod(pod)
			resp := tt.srv.review(t, inject.PathNamespace, podReview(t, pod)).Response
			if tt.want == nil {
				if !resp.Allowed {
					t.Fatalf("refused: %+v", resp.Result)
				}
				sidecarOf(t, applyPatch(t, pod, resp))
				return
			}
			if resp.Allowed || len(resp.Patch) != 0 {
				t.Fatalf("allowed=%v patch=%s, want refused", resp.Allowed, resp.Patch)
			}
			if resp.Result == nil || resp.Result.Code != http.StatusBadRequest {
				t.Fatalf("result = %+v, want Failure 400", resp.Result)
			}
			for _, w := range tt.want {
				if !strings.Contains(resp.Result.Message, w) {
					t.Errorf("message %q does not contain %q", resp.Result.Message, w)
				}
			}
		})
	}
}
