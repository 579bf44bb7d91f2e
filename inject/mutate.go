package inject

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// OptIn says how a pod reached the webhook, which decides the default.
type OptIn int

const (
	// OptInNamespace: the pod's namespace carries latch.dev/inject=enabled;
	// every pod is injected unless it says latch.dev/inject: "false".
	OptInNamespace OptIn = iota + 1
	// OptInPod: the namespace is not labelled; only pods annotated
	// latch.dev/inject: "true" are injected.
	OptInPod
)

// PatchOp is one RFC 6902 JSON patch operation. The injector only adds.
type PatchOp struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value,omitempty"`
}

// Result is the injector's decision for one pod.
type Result struct {
	// Patch is empty when the pod is admitted unchanged.
	Patch []PatchOp
	// Skipped says why nothing was injected ("" when Patch is set).
	Skipped string
	// Warnings are shown to the client (kubectl) with the admission.
	Warnings []string
}

// Mutate decides what to add to pod. A malformed annotation or a pod that
// cannot take the sidecar is an error: the webhook refuses such a pod rather
// than admitting it without the mTLS it asked for.
func (c Config) Mutate(pod *corev1.Pod, how OptIn) (Result, error) {
	ann := pod.Annotations
	// The annotation decides; a pod label of the same name stands in for it,
	// so that a webhook objectSelector on the label and the decision here agree.
	v, set := ann[AnnotationInject]
	if !set {
		v, set = pod.Labels[LabelPodInject]
	}
	switch {
	case set && v == "false":
		return Result{Skipped: "opted out (" + AnnotationInject + `: "false")`}, nil
	case set && v != "true":
		return Result{}, &AnnotationError{Annotation: AnnotationInject, Value: v, Problem: `want "true" or "false"`}
	case !set && how != OptInNamespace:
		return Result{Skipped: "not opted in"}, nil
	}
	if _, done := ann[AnnotationStatus]; done || hasContainer(pod.Spec.InitContainers, ContainerName) {
		return Result{Skipped: "already injected"}, nil
	}
	if hasContainer(pod.Spec.Containers, ContainerName) {
		return Result{Skipped: "has its own container named " + ContainerName,
			Warnings: []string{"latch: pod already runs a container named " + ContainerName + "; no sidecar injected"}}, nil
	}
	if pod.Spec.HostNetwork {
		// On the host network the sidecar's ports would be the node's ports.
		return Result{Skipped: "hostNetwork pod",
			Warnings: []string{"latch: pods on the host network are not injected"}}, nil
	}

	d := c.withDefaults()
	spec, err := ParseSpec(ann, d.ControlPlane.Address != "", d.AdminPort)
	if err != nil {
		return Result{}, err
	}
	vols := d.Volumes(spec)
	for _, v := range vols {
		for _, have := range pod.Spec.Volumes {
			if have.Name == v.Name {
				return Result{}, fmt.Errorf("pod already has a volume named %q, which the latch sidecar needs", v.Name)
			}
		}
	}
	if err := checkSidecarVolumesPrivate(pod, d.WorkloadAPI.HostPath); err != nil {
		return Result{}, err
	}
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ct := range cs {
			for _, p := range ct.Ports {
				if int(p.ContainerPort) == d.AdminPort {
					return Result{}, fmt.Errorf("container %q declares port %d, which is the latch sidecar's admin port (chart value sidecar.adminPort)", ct.Name, d.AdminPort)
				}
			}
		}
	}
	// Port names must be unique across a pod's containers; say which one
	// clashes rather than leave the API server's validation to refuse the pod.
	sidecar := d.Container(spec)
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ct := range cs {
			for _, p := range ct.Ports {
				for _, ours := range sidecar.Ports {
					if p.Name != "" && p.Name == ours.Name {
						return Result{}, fmt.Errorf("container %q has a port named %q, which the latch sidecar uses", ct.Name, p.Name)
					}
				}
			}
		}
	}
	cfg, err := StaticConfig(spec)
	if err != nil {
		return Result{}, err
	}

	var ops []PatchOp
	add := map[string]string{AnnotationStatus: StatusInjected}
	if cfg != nil {
		add[AnnotationConfig] = string(cfg)
	}
	if ann == nil {
		ops = append(ops, PatchOp{Op: "add", Path: "/metadata/annotations", Value: add})
	} else {
		// Fixed order keeps patches reproducible.
		for _, k := range []string{AnnotationStatus, AnnotationConfig} {
			if v, ok := add[k]; ok {
				ops = append(ops, PatchOp{Op: "add", Path: "/metadata/annotations/" + escapePointer(k), Value: v})
			}
		}
	}
	// First among the init containers, so later init containers (a schema
	// migration, say) can already use the mesh.
	if len(pod.Spec.InitContainers) == 0 {
		ops = append(ops, PatchOp{Op: "add", Path: "/spec/initContainers", Value: []corev1.Container{sidecar}})
	} else {
		ops = append(ops, PatchOp{Op: "add", Path: "/spec/initContainers/0", Value: sidecar})
	}
	if len(pod.Spec.Volumes) == 0 {
		ops = append(ops, PatchOp{Op: "add", Path: "/spec/volumes", Value: vols})
	} else {
		for _, v := range vols {
			ops = append(ops, PatchOp{Op: "add", Path: "/spec/volumes/-", Value: v})
		}
	}
	return Result{Patch: ops}, nil
}

func hasContainer(cs []corev1.Container, name string) bool {
	for _, c := range cs {
		if c.Name == name {
			return true
		}
	}
	return false
}

var pointerEscaper = strings.NewReplacer("~", "~0", "/", "~1")

// escapePointer escapes a JSON pointer reference token (RFC 6901).
func escapePointer(s string) string { return pointerEscaper.Replace(s) }
