//go:build tools

// Package tools pins the Kubernetes API server and etcd that the tests run
// against. It is a module of its own so that the latch module never requires
// k8s.io/kubernetes; internal/kubetest builds the two commands from here.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
