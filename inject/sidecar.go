package inject

import (
	"fmt"
	"net"
	"slices"
	"strconv"

	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"latch.dev/latch/proxy"
)

// Names the injector gives what it adds to a pod. They are fixed so that a
// second pass can recognise its own work.
const (
	ContainerName     = "latch"
	VolumeWorkloadAPI = "latch-spiffe-workload-api"
	VolumeConfig      = "latch-config"
	VolumeState       = "latch-state"

	// Where the sidecar finds them.
	WorkloadAPIMountPath = "/spiffe-workload-api"
	ConfigMountPath      = "/etc/latch"
	ConfigFile           = ConfigMountPath + "/latch.yaml"
	StateMountPath       = "/var/lib/latch"

	// AdminPortName names the sidecar's admin port: the probes refer to it,
	// and the chart's PodMonitor scrapes every pod that has it.
	AdminPortName = "latch-admin"

	// StatusInjected is the value of AnnotationStatus on injected pods.
	StatusInjected = "injected"
)

// anyAddress is the listen address for port on every address of the pod. Go
// binds the empty host as one socket for IPv4 and IPv6 where the kernel has
// IPv6 (IPV6_V6ONLY off, whatever net.ipv6.bindv6only says), and as IPv4
// alone where IPv6 is disabled at boot, where "[::]" would not bind at all.
// "0.0.0.0" binds the same in Go, but reads as IPv4 only.
func anyAddress(port int) string { return net.JoinHostPort("", strconv.Itoa(port)) }

// Container builds the sidecar container for spec. It has restartPolicy
// Always, which makes it a native sidecar when placed among the init
// containers (Kubernetes 1.29+).
func (c Config) Container(spec Spec) corev1.Container {
	d := c.withDefaults()
	// The empty host is every address of the pod, IPv4 and IPv6 (see
	// anyAddress); the kubelet probes the pod IP of either family.
	admin := anyAddress(d.AdminPort)
	args := []string{"proxy"}
	if spec.ControlPlane {
		args = append(args,
			"--xds-address="+d.ControlPlane.Address,
			"--xds-server-id="+d.ControlPlane.ServerID,
			"--state-dir="+StateMountPath,
		)
		if spec.Profile != "" {
			args = append(args, "--tls-profile="+spec.Profile)
		}
	} else {
		args = append(args, "--config="+ConfigFile)
	}
	args = append(args, "--admin-address="+admin)
	if d.LogLevel != "" {
		args = append(args, "--log-level="+d.LogLevel)
	}

	always := corev1.ContainerRestartPolicyAlways
	ports := []corev1.ContainerPort{{Name: AdminPortName, ContainerPort: int32(d.AdminPort), Protocol: corev1.ProtocolTCP}}
	for _, in := range spec.Inbound {
		ports = append(ports, corev1.ContainerPort{Name: "latch-in-" + strconv.Itoa(in.Port), ContainerPort: int32(in.Port), Protocol: corev1.ProtocolTCP})
	}
	env := []corev1.EnvVar{{Name: "SPIFFE_ENDPOINT_SOCKET", Value: "unix://" + WorkloadAPIMountPath + "/" + d.WorkloadAPI.SocketName}}
	if _, ok := d.Resources.Limits[corev1.ResourceMemory]; ok {
		// Keep the Go heap under the container limit instead of being OOM-killed
		// with live connections.
		env = append(env, corev1.EnvVar{Name: "GOMEMLIMIT", ValueFrom: &corev1.EnvVarSource{
			ResourceFieldRef: &corev1.ResourceFieldSelector{ContainerName: ContainerName, Resource: "limits.memory", Divisor: resource.MustParse("1")},
		}})
	}
	mounts := []corev1.VolumeMount{{Name: VolumeWorkloadAPI, MountPath: WorkloadAPIMountPath, ReadOnly: true}}
	if spec.ControlPlane {
		mounts = append(mounts, corev1.VolumeMount{Name: VolumeState, MountPath: StateMountPath})
	} else {
		mounts = append(mounts, corev1.VolumeMount{Name: VolumeConfig, MountPath: ConfigMountPath, ReadOnly: true})
	}
	probe := func(path string, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromString(AdminPortName), Scheme: corev1.URISchemeHTTP}},
			PeriodSeconds:    period,
			TimeoutSeconds:   1,
			FailureThreshold: failures,
		}
	}
	yes, no := true, false
	return corev1.Container{
		Name:            ContainerName,
		Image:           d.Image,
		ImagePullPolicy: d.ImagePullPolicy,
		Args:            args,
		Ports:           ports,
		Env:             env,
		Resources:       d.Resources,
		VolumeMounts:    mounts,
		RestartPolicy:   &always,
		// The startup probe gates the app containers: they start only once the
		// sidecar holds an SVID and a policy, so their first outbound call
		// already goes through mTLS. Two minutes, then the kubelet restarts it.
		StartupProbe:   probe("/readyz", 1, 120),
		ReadinessProbe: probe("/readyz", 5, 3),
		LivenessProbe:  probe("/healthz", 10, 3),
		SecurityContext: &corev1.SecurityContext{
			RunAsNonRoot:             &yes,
			RunAsUser:                &d.RunAsUser,
			RunAsGroup:               &d.RunAsGroup,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
			Privileged:               &no,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

// Volumes builds the volumes the sidecar mounts.
func (c Config) Volumes(spec Spec) []corev1.Volume {
	d := c.withDefaults()
	var wl corev1.VolumeSource
	if d.WorkloadAPI.Source == SourceHostPath {
		dir := corev1.HostPathDirectory
		wl.HostPath = &corev1.HostPathVolumeSource{Path: d.WorkloadAPI.HostPath, Type: &dir}
	} else {
		ro := true
		wl.CSI = &corev1.CSIVolumeSource{Driver: d.WorkloadAPI.CSIDriver, ReadOnly: &ro}
	}
	vols := []corev1.Volume{{Name: VolumeWorkloadAPI, VolumeSource: wl}}
	if spec.ControlPlane {
		limit := resource.MustParse("16Mi")
		vols = append(vols, corev1.Volume{Name: VolumeState, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: &limit}}})
	} else {
		mode := int32(0o444)
		vols = append(vols, corev1.Volume{Name: VolumeConfig, VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
			DefaultMode: &mode,
			Items: []corev1.DownwardAPIVolumeFile{{
				Path:     "latch.yaml",
				FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "metadata.annotations['" + AnnotationConfig + "']"},
			}},
		}}})
	}
	return vols
}

// staticFile mirrors the static config file format of `latch proxy --config`
// (docs/configuration.md); field order is kept so the file reads naturally in
// `kubectl get pod -o yaml`.
type staticFile struct {
	TLS      *staticTLS       `yaml:"tls,omitempty"`
	Inbound  []staticInbound  `yaml:"inbound,omitempty"`
	Outbound []staticOutbound `yaml:"outbound,omitempty"`
}

type staticTLS struct {
	Profile string `yaml:"profile"`
}

type staticInbound struct {
	Name          string              `yaml:"name"`
	Listen        string              `yaml:"listen"`
	App           string              `yaml:"app"`
	Allow         []map[string]string `yaml:"allow"`
	ProxyProtocol string              `yaml:"proxyProtocol,omitempty"`
	FederatesWith []string            `yaml:"federatesWith,omitempty"`
}

type staticOutbound struct {
	Name          string   `yaml:"name"`
	Listen        string   `yaml:"listen"`
	Upstreams     []string `yaml:"upstreams"`
	ServerID      string   `yaml:"serverID"`
	FederatesWith []string `yaml:"federatesWith,omitempty"`
}

// StaticConfig renders spec as the sidecar's config file. It returns nil for
// a spec whose policy comes from the control plane, and an error for a spec
// whose file latch proxy would refuse (proxy.Parse).
func StaticConfig(spec Spec) ([]byte, error) {
	if spec.ControlPlane {
		return nil, nil
	}
	var f staticFile
	if spec.Profile != "" {
		f.TLS = &staticTLS{Profile: spec.Profile}
	}
	allow := make([]map[string]string, 0, len(spec.Allow))
	for _, r := range spec.Allow {
		allow = append(allow, map[string]string{r.Kind().String(): r.Value()})
	}
	for _, in := range spec.Inbound {
		si := staticInbound{
			Name:   "inbound-" + strconv.Itoa(in.Port),
			Listen: anyAddress(in.Port),
			App:    "127.0.0.1:" + strconv.Itoa(in.AppPort),
			Allow:  allow,
		}
		if in.ProxyProtocol {
			si.ProxyProtocol = "v2"
		}
		for _, td := range spec.FederatesWith {
			si.FederatesWith = append(si.FederatesWith, td.Name())
		}
		f.Inbound = append(f.Inbound, si)
	}
	for _, out := range spec.Outbound {
		so := staticOutbound{
			Name:      "outbound-" + strconv.Itoa(out.Port),
			Listen:    "127.0.0.1:" + strconv.Itoa(out.Port),
			Upstreams: []string{out.Target},
			ServerID:  out.ServerID.String(),
		}
		// An upstream accepts the one foreign trust domain its server is
		// in, if the pod federates with it: no wider than it needs.
		if td := out.ServerID.TrustDomain(); slices.Contains(spec.FederatesWith, td) {
			so.FederatesWith = []string{td.Name()}
		}
		f.Outbound = append(f.Outbound, so)
	}
	b, err := yaml.Marshal(&f)
	if err != nil {
		return nil, fmt.Errorf("rendering sidecar config: %w", err)
	}
	// ParseSpec is meant to refuse everything the sidecar would, but the two
	// rule sets live in different packages. Running the file through the
	// sidecar's own parser makes sure the webhook never admits a pod whose
	// sidecar then refuses its config and never becomes ready.
	if _, err := proxy.Parse("annotation "+AnnotationConfig, b); err != nil {
		return nil, fmt.Errorf("the sidecar config rendered from the pod's annotations would be refused by latch proxy: %w", err)
	}
	return b, nil
}
