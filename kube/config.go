package kube

import (
	"fmt"
	"os"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// RESTConfig reaches the API server: from the kubeconfig file at path when
// given (running outside the cluster), else from the pod's service account.
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("reading kubeconfig %s: %w", kubeconfig, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no in-cluster configuration (outside a pod, give --kubeconfig): %w", err)
	}
	return cfg, nil
}

// serviceAccountNamespace is where Kubernetes mounts the pod's namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// PodIdentity is this replica's name and namespace: $POD_NAME and
// $POD_NAMESPACE (the chart sets both from the downward API), else the host
// name and the service account's namespace.
func PodIdentity() (name, namespace string, err error) {
	name = os.Getenv("POD_NAME")
	if name == "" {
		if name, err = os.Hostname(); err != nil {
			return "", "", fmt.Errorf("naming this replica: %w", err)
		}
	}
	namespace = os.Getenv("POD_NAMESPACE")
	if namespace == "" {
		b, err := os.ReadFile(serviceAccountNamespace)
		if err != nil {
			return "", "", fmt.Errorf("finding this replica's namespace (set POD_NAMESPACE): %w", err)
		}
		namespace = strings.TrimSpace(string(b))
	}
	return name, namespace, nil
}
