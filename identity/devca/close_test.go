package devca_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"

	"latch.dev/latch/identity/devca"
)

func socketPath(addr string) string { return strings.TrimPrefix(addr, "unix://") }

// Not parallel: goleak must see only this test's goroutines. Parallel tests
// start only after every sequential one has finished.
func TestCloseRemovesSocketsAndStopsEverything(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	ca, err := devca.New(td, devca.Options{SVIDTTL: 2 * time.Second, RotateEvery: 100 * time.Millisecond, Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	dir := ca.SocketDir()
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory %s: %v, mode %v; want 0700", dir, err, fi.Mode().Perm())
	}
	addrs := []string{
		addWorkloadNoCleanup(t, ca, "spiffe://devca.test/one"),
		addWorkloadNoCleanup(t, ca, "spiffe://devca.test/two"),
	}
	for _, a := range addrs {
		if fi, err := os.Stat(socketPath(a)); err != nil || fi.Mode().Type() != fs.ModeSocket {
			t.Fatalf("%s is not a socket: %v", a, err)
		}
		if filepath.Dir(socketPath(a)) != dir {
			t.Errorf("%s is outside the socket directory %s", a, dir)
		}
	}
	events, _ := ca.Subscribe(1024)

	// A client with a live stream while the CA closes.
	ctx, cancel := context.WithCancel(context.Background())
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addrs[0]))
	if err != nil {
		t.Fatal(err)
	}
	w := &watcher{updates: make(chan *workloadapi.X509Context, 256)}
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		_ = client.WatchX509Context(ctx, w)
	}()
	w.next(t)

	if err := ca.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, a := range addrs {
		if _, err := os.Stat(socketPath(a)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s survives Close: %v", a, err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket directory %s survives Close: %v", dir, err)
	}
	for range events { // drained, then closed by Close
	}
	if err := ca.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	calls := map[string]error{}
	_, calls["AddWorkload"] = ca.AddWorkload("spiffe://devca.test/late")
	_, calls["Issue"] = ca.Issue("spiffe://devca.test/late")
	calls["RotateNow"] = ca.RotateNow()
	calls["RollCA"] = ca.RollCA()
	calls["ActivateCA"] = ca.ActivateCA()
	for name, err := range calls {
		if !errors.Is(err, devca.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	if _, open := <-mustSubscribe(ca); open {
		t.Error("Subscribe after Close returned an open channel")
	}

	cancel()
	<-watchDone
	client.Close()
}

func mustSubscribe(ca *devca.CA) <-chan devca.Event {
	ch, _ := ca.Subscribe(1)
	return ch
}

func addWorkloadNoCleanup(t *testing.T, ca *devca.CA, id string) string {
	t.Helper()
	addr, err := ca.AddWorkload(id)
	if err != nil {
		t.Fatalf("AddWorkload(%s): %v", id, err)
	}
	return addr
}

func TestCallerSocketDirIsKept(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "sockets")
	ca, err := devca.New(td, devca.Options{SocketDir: dir, Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	addr := addWorkloadNoCleanup(t, ca, "spiffe://devca.test/kept")
	if filepath.Dir(socketPath(addr)) != dir {
		t.Errorf("socket %s not in the chosen directory %s", addr, dir)
	}
	if err := ca.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(socketPath(addr)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket survives Close: %v", err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("caller's directory removed by Close: %v", err)
	}
}

func TestServeClosesWhenContextEnds(t *testing.T) {
	ca, err := devca.New(td, devca.Options{Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	addr := addWorkloadNoCleanup(t, ca, "spiffe://devca.test/served")
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- ca.Serve(ctx) }()
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := os.Stat(socketPath(addr)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket survives Serve's end: %v", err)
	}
	if _, err := ca.AddWorkload("spiffe://devca.test/after"); !errors.Is(err, devca.ErrClosed) {
		t.Errorf("AddWorkload after Serve ended: %v, want ErrClosed", err)
	}
}

func TestRelativeSocketDirYieldsAbsoluteAddress(t *testing.T) {
	t.Chdir(t.TempDir())
	ca := newCA(t, devca.Options{SocketDir: "sockets"})
	addr := addWorkload(t, ca, "spiffe://devca.test/rel")
	if p := socketPath(addr); !filepath.IsAbs(p) {
		t.Fatalf("AddWorkload = %q, want an absolute unix:// address", addr)
	}
	client, err := workloadapi.New(testContext(t), workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.FetchX509SVID(testContext(t)); err != nil {
		t.Errorf("FetchX509SVID over %s: %v", addr, err)
	}
}
