// Package kubetest runs a real Kubernetes API server for the tests: an etcd
// and a kube-apiserver on loopback, built from the pinned versions in the
// tools module next to this package (its own go.mod, so the latch module never
// requires k8s.io/kubernetes) and started with throwaway keys.
//
// Building kube-apiserver from source takes 10–30 minutes on two cold cores,
// so the binaries are built once per version into the user's cache directory
// (os.UserCacheDir()/latch/kubetest/<version>-<hash of the tools module>),
// under a file lock so that test packages running in parallel wait for one
// build instead of each starting their own. `make kube-tools` builds them as a
// visible step before the suite. LATCH_KUBE_TOOLS names a directory holding
// prebuilt kube-apiserver and etcd binaries instead.
//
// A test package that needs the API server calls Main from its TestMain and
// Shared from its tests: the first Shared starts one cluster for the package,
// Main stops it when the tests are done. In -short mode Shared skips.
package kubetest
