package kube_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"
)

// TestNoStatusWriteAfterTheTerm: a leader whose renewal is held up past its
// renew deadline (the goroutine renewing the Lease does not get to run, or
// its transport does not give up at the deadline) stops writing status at
// the deadline all the same: no status write is sent after the renew
// deadline of the last renewal that succeeded, even while changes keep
// coming. Another replica may take the Lease once it has seen it unchanged
// for its duration; a write of the old leader's after its deadline could
// land beside the new leader's.
func TestNoStatusWriteAfterTheTerm(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "term")
	var (
		mu      sync.Mutex
		renewed time.Time // start of the last Lease update that succeeded
		late    []string
		writes  int
		hold    atomic.Bool
	)
	cfg := rest.CopyConfig(c.Config)
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripper(func(req *http.Request) (*http.Response, error) {
			start := time.Now()
			switch {
			case (req.Method == http.MethodPut || req.Method == http.MethodPost) && strings.Contains(req.URL.Path, "/leases"):
				if hold.Load() {
					time.Sleep(testRenewDeadline + time.Second) // regardless of the request's context
					return nil, errors.New("renewal held up")
				}
				resp, err := rt.RoundTrip(req)
				if err == nil && resp.StatusCode/100 == 2 {
					mu.Lock()
					renewed = start
					mu.Unlock()
				}
				return resp, err
			case strings.HasSuffix(req.URL.Path, "/status"):
				if dl, ok := req.Context().Deadline(); ok && !start.Before(dl) {
					// What a transport does with a request whose
					// context has run out: it does not send it.
					return nil, context.DeadlineExceeded
				}
				mu.Lock()
				writes++
				if !renewed.IsZero() && start.After(renewed.Add(testRenewDeadline)) {
					late = append(late, fmt.Sprintf("%s %v after the renew deadline", req.URL.Path, start.Sub(renewed.Add(testRenewDeadline)).Round(time.Millisecond)))
				}
				mu.Unlock()
			}
			return rt.RoundTrip(req)
		})
	})
	a := m.replica("cp-a", replicaOptions{lease: "term", cfg: cfg})
	waitFor(t, "cp-a to lead", a.ctl.Leading)
	id := spiffeid.RequireFromString("spiffe://mesh.test/ns/term/sa/api")
	port := freePort(t)
	m.apply("api", inboundSpec(id, port, "127.0.0.1:9"))
	m.waitStatus("api", "a first status", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Generation == 1 })

	time.Sleep(500 * time.Millisecond) // a renewal or two
	hold.Store(true)
	held := time.Now()
	// Changes until well past the deadline, each of which the leader
	// would write the status of.
	for i := 1; time.Since(held) < testRenewDeadline+time.Second; i++ {
		m.apply("api", inboundSpec(id, port+i%50, "127.0.0.1:9"))
		time.Sleep(20 * time.Millisecond)
	}
	waitFor(t, "cp-a to stop leading", func() bool { return !a.ctl.Leading() })
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d status writes sent", writes)
	if len(late) > 0 {
		t.Errorf("%d status writes sent after the term ended, the first: %s", len(late), late[0])
	}
}
