package inject

import (
	"fmt"
	"path"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// sidecarVolumes are the volumes the injector adds for the sidecar alone, and
// why no other container may mount them.
var sidecarVolumes = map[string]string{
	VolumeWorkloadAPI: "the SPIFFE Workload API socket, from which a container gets this workload's SVID and private key (in hostPath mode, the node's SPIRE agent socket directory, shared with every pod on the node)",
	VolumeConfig:      "the sidecar's policy",
	VolumeState:       "the sidecar's last good policy from the control plane, which it starts from after a restart",
}

// checkSidecarVolumesPrivate refuses a pod in which a container other than
// the sidecar could reach what the sidecar's volumes hold.
//
// A container may name a volume the pod does not define yet: the API server
// validates the pod after the webhook has added the volume, so an app
// container that mounts "latch-spiffe-workload-api" would be admitted with the
// Workload API socket, read-write unless it says readOnly, and in hostPath
// mode with the node's agent socket directory, where it could replace the
// socket every pod on the node talks to. The name is what matters, whatever
// the mount's mode, subPath or subPathExpr.
//
// The pod may also reach the agent's socket directory on its own, through a
// hostPath volume under another name: the directory itself, a parent of it (a
// subPath then reaches down), or a path inside it. That is refused too, in
// both Workload API modes: the SPIFFE CSI driver serves its sockets from the
// same node directory. /var/run is taken as /run, the symlink every Linux
// distribution ships; other host symlinks cannot be seen from here, which is
// one more reason for Pod Security to keep hostPath out of application
// namespaces altogether.
func checkSidecarVolumesPrivate(pod *corev1.Pod, agentDir string) error {
	check := func(kind, name string, mounts []corev1.VolumeMount) error {
		for _, m := range mounts {
			if what, ours := sidecarVolumes[m.Name]; ours {
				return fmt.Errorf("%s %q mounts volume %q at %s, which the latch injector adds for the sidecar alone: it holds %s; remove the mount, or opt the pod out with %s: \"false\"",
					kind, name, m.Name, m.MountPath, what, AnnotationInject)
			}
		}
		return nil
	}
	for _, c := range pod.Spec.InitContainers {
		if err := check("init container", c.Name, c.VolumeMounts); err != nil {
			return err
		}
	}
	for _, c := range pod.Spec.Containers {
		if err := check("container", c.Name, c.VolumeMounts); err != nil {
			return err
		}
	}
	for _, c := range pod.Spec.EphemeralContainers {
		if err := check("ephemeral container", c.Name, c.VolumeMounts); err != nil {
			return err
		}
	}

	agent := hostDir(agentDir)
	for _, v := range pod.Spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		p := hostDir(v.HostPath.Path)
		if p == agent || isBelow(agent, p) || isBelow(p, agent) {
			return fmt.Errorf("volume %q is hostPath %s, which reaches the node directory of the SPIRE agent socket (%s): a container mounting it could take this workload's SVID or replace the socket every pod on the node uses; remove the volume, or opt the pod out with %s: \"false\"",
				v.Name, v.HostPath.Path, agentDir, AnnotationInject)
		}
	}
	return nil
}

// hostDir cleans a node path for comparison, relative ones taken from the
// root, with /var/run read as the /run it links to.
func hostDir(p string) string {
	p = path.Clean("/" + p)
	if p == "/var/run" || strings.HasPrefix(p, "/var/run/") {
		p = "/run" + strings.TrimPrefix(p, "/var/run")
	}
	return p
}

// isBelow reports whether p lies strictly inside dir; both are clean.
func isBelow(p, dir string) bool {
	return dir == "/" && p != "/" || strings.HasPrefix(p, dir+"/")
}
