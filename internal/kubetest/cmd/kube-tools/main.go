// Command kube-tools builds (once, into the user's cache) the kube-apiserver
// and etcd that the Kubernetes tests run, and prints where they are. `make
// test` runs it as a step of its own so that the first run's long build is
// visible rather than hidden in a test's time.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"latch.dev/latch/internal/kubetest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	t, err := kubetest.Binaries(ctx, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-tools:", err)
		os.Exit(1)
	}
	fmt.Printf("kube-tools: kube-apiserver %s at %s\nkube-tools: etcd at %s\n", t.Version, t.APIServer, t.Etcd)
}
