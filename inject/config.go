package inject

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Config is what the cluster operator decides for every injected sidecar.
// The chart renders it from its values into the file `latch inject --config`
// reads; the field names are the chart's sidecar.* values.
type Config struct {
	// Image is the latch image the sidecar runs (required).
	Image           string            `json:"image"`
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy,omitempty"`
	// AdminPort is where the sidecar serves /healthz, /readyz and /metrics;
	// the kubelet probes it on the pod IP. Default 15000.
	AdminPort int                         `json:"adminPort,omitempty"`
	Resources corev1.ResourceRequirements `json:"resources,omitempty"`
	// RunAsUser and RunAsGroup are the numeric IDs the sidecar runs as.
	// Default 65532 (distroless "nonroot").
	RunAsUser  int64 `json:"runAsUser,omitempty"`
	RunAsGroup int64 `json:"runAsGroup,omitempty"`
	// WorkloadAPI says how the SPIRE agent's socket reaches the pod.
	WorkloadAPI WorkloadAPI `json:"workloadAPI,omitempty"`
	// ControlPlane, when Address is set, lets pods take their policy from
	// latch control-plane (annotation latch.dev/policy: control-plane, and
	// the default for pods that declare nothing).
	ControlPlane ControlPlane `json:"controlPlane,omitempty"`
	// LogLevel is passed to the sidecar when set (debug, info, warn, error).
	LogLevel string `json:"logLevel,omitempty"`
}

// WorkloadAPI describes the volume carrying the SPIFFE Workload API socket.
type WorkloadAPI struct {
	// Source is "csi" (the SPIFFE CSI driver, the default) or "hostPath".
	Source string `json:"source,omitempty"`
	// CSIDriver is the CSI driver name; default csi.spiffe.io.
	CSIDriver string `json:"csiDriver,omitempty"`
	// HostPath is the node directory holding the agent socket, mounted into
	// the sidecar when Source is hostPath; default /run/spire/agent-sockets.
	// In both modes a pod with a hostPath volume of its own reaching it is
	// refused (the SPIFFE CSI driver serves the same directory).
	HostPath string `json:"hostPath,omitempty"`
	// SocketName is the socket's file name in that directory; default
	// spire-agent.sock.
	SocketName string `json:"socketName,omitempty"`
}

// ControlPlane locates latch control-plane for xDS.
type ControlPlane struct {
	// Address is host:port of the control plane's xDS service.
	Address string `json:"address,omitempty"`
	// ServerID is the SPIFFE ID the control plane must prove.
	ServerID string `json:"serverID,omitempty"`
}

// Workload API volume sources.
const (
	SourceCSI      = "csi"
	SourceHostPath = "hostPath"
)

// LoadConfig reads a Config from a YAML or JSON file. Unknown fields are
// refused, so a misspelt chart value fails the injector's start instead of
// being silently ignored.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading injector config: %w", err)
	}
	var c Config
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return nil, fmt.Errorf("injector config %s: %w", path, err)
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("injector config %s: %w", path, err)
	}
	return &c, nil
}

// withDefaults returns a copy with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.AdminPort == 0 {
		c.AdminPort = 15000
	}
	if c.RunAsUser == 0 {
		c.RunAsUser = 65532
	}
	if c.RunAsGroup == 0 {
		c.RunAsGroup = 65532
	}
	if c.ImagePullPolicy == "" {
		c.ImagePullPolicy = corev1.PullIfNotPresent
	}
	w := &c.WorkloadAPI
	if w.Source == "" {
		w.Source = SourceCSI
	}
	if w.CSIDriver == "" {
		w.CSIDriver = "csi.spiffe.io"
	}
	if w.HostPath == "" {
		w.HostPath = "/run/spire/agent-sockets"
	}
	if w.SocketName == "" {
		w.SocketName = "spire-agent.sock"
	}
	return c
}

// Validate reports the first setting that would produce a broken sidecar.
func (c Config) Validate() error {
	d := c.withDefaults()
	if d.Image == "" {
		return errors.New("image: required")
	}
	if d.AdminPort < 1 || d.AdminPort > 65535 {
		return fmt.Errorf("adminPort %d: not a port number", d.AdminPort)
	}
	if d.RunAsUser < 1 || d.RunAsGroup < 1 {
		return errors.New("runAsUser/runAsGroup: must be non-root numeric IDs (> 0)")
	}
	switch d.ImagePullPolicy {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		return fmt.Errorf("imagePullPolicy %q: want Always, IfNotPresent or Never", d.ImagePullPolicy)
	}
	switch d.WorkloadAPI.Source {
	case SourceCSI, SourceHostPath:
	default:
		return fmt.Errorf("workloadAPI.source %q: want %s or %s", d.WorkloadAPI.Source, SourceCSI, SourceHostPath)
	}
	if !strings.HasPrefix(d.WorkloadAPI.HostPath, "/") {
		return fmt.Errorf("workloadAPI.hostPath %q: must be absolute", d.WorkloadAPI.HostPath)
	}
	if strings.Contains(d.WorkloadAPI.SocketName, "/") {
		return fmt.Errorf("workloadAPI.socketName %q: a file name, not a path", d.WorkloadAPI.SocketName)
	}
	if cp := d.ControlPlane; cp.Address != "" || cp.ServerID != "" {
		if cp.Address == "" || cp.ServerID == "" {
			return errors.New("controlPlane: address and serverID go together")
		}
		if _, err := spiffeid.FromString(cp.ServerID); err != nil {
			return fmt.Errorf("controlPlane.serverID %q: %w", cp.ServerID, err)
		}
	}
	switch d.LogLevel {
	case "", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("logLevel %q: want debug, info, warn or error", d.LogLevel)
	}
	return nil
}
