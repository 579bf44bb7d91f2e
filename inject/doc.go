// Package inject is the Kubernetes side of latch: a mutating admission
// webhook (`latch inject`) that adds the latch proxy to opted-in pods as a
// native sidecar, i.e. an init container with restartPolicy Always, so it
// starts before the application's containers and stops after them.
//
// The package is a pure function from (pod, chart defaults) to a JSON patch
// (Plan, Mutate), an http.Handler speaking AdmissionReview v1 around it
// (Webhook), and the HTTPS server that serves it with a certificate reloaded
// from disk when cert-manager or the chart rotates it (CertReloader, Serve).
//
// What a pod asks for is read from its annotations (see the Annotation*
// constants); what the cluster operator decides (image, resources, Workload
// API socket, control plane) comes from the Config the chart renders.
package inject
