// Package policy reads ServicePolicy declarations: the CRD-shaped YAML
// (apiVersion latch.dev/v1alpha1) in which a service owner names a workload's
// SPIFFE ID, the ports its sidecar accepts peers on with the peers allowed,
// and the upstreams it calls with the identity each must prove.
//
// Declarations come from a directory of files, each holding one or more YAML
// documents. Decoding is strict and every refusal names the file, the line and
// the reason. A Store keeps, per file, the last version that was good, so a
// broken edit never removes or changes the policy of any other file and the
// broken file keeps serving what it said before. The same schema is emitted as
// a Kubernetes CRD manifest (CRD), so files and API objects are interchangeable.
//
// Policy sits at the start of the control plane's flow: declarations →
// translate → Envoy resources → sidecars.
package policy
