// Package kube connects the control plane to the Kubernetes API server.
//
// ServicePolicy objects are read with client-go shared informers over the
// dynamic client and fed, one changed object at a time, into the same
// policy.Store (and so through the same decoder) as declaration files. Their
// status — Accepted and Programmed conditions, Gateway API style — is
// written by the one replica holding a coordination.k8s.io Lease (an
// election of its own, lease.go), while every replica serves xDS. Each
// replica publishes what the sidecars connected to it have acknowledged, per
// workload, in a ConfigMap of its own; the leader reads them all to decide
// Programmed.
//
// It sits beside the file source at the start of the control plane's flow:
// API server → policy.Store → translate → xDS → sidecars, and back from the
// sidecars' ACKs to the objects' status.
//
// Everything goes through the dynamic client: latch is one binary, and
// client-go's typed clients, the informers built on them and its
// leaderelection register every API group at package init, which every
// sidecar would pay for (cmd/latch's TestSidecarBinaryLinksNoKubernetesClients
// keeps them out).
package kube
