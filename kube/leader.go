package kube

import (
	"context"
	"sync"
	"time"

	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// runElection takes part in electing the status writer until ctx is done:
// one replica at a time holds the Lease and writes status; the others wait
// to take over. The Lease is released as a replica stops, so the next one
// takes over at once rather than after LeaseDuration.
func (c *Controller) runElection(ctx context.Context) {
	for ctx.Err() == nil {
		e := &election{
			leases: c.dyn.Resource(leases).Namespace(c.opts.Namespace),
			name:   c.opts.LeaseName, identity: c.opts.Identity,
			leaseDuration: c.opts.LeaseDuration, renewDeadline: c.opts.RenewDeadline, retryPeriod: c.opts.RetryPeriod,
			log: c.log,
			onNewLeader: func(id string) {
				c.log.Info("status writer elected", "lease", c.opts.LeaseName, "leader", id, "self", id == c.opts.Identity)
			},
		}
		e.Run(ctx, c.lead) // returns when leadership is lost, or ctx is done
	}
}

// lead writes status while ctx (the leadership) lasts, each write bounded by
// the term t.
func (c *Controller) lead(ctx context.Context, t *term) {
	c.log.Info("leading: writing ServicePolicy status", "lease", c.opts.LeaseName)
	q := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[cache.ObjectName](),
		workqueue.TypedRateLimitingQueueConfig[cache.ObjectName]{Name: "servicepolicy-status"})
	c.status.Store(&q)
	c.leading.Store(true)
	c.opts.Metrics.setLeader(true)
	c.enqueueAllStatus()

	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() { c.runStatus(ctx, t, q) })
	}
	tick := time.NewTicker(c.opts.ReportHeartbeat)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case now := <-tick.C:
			for _, name := range c.acks.expire(now, c.opts.ReportHeartbeat) {
				if t.live() { // a leader's write, as status is
					c.deleteReport(name)
				}
			}
		}
	}
	c.status.Store(nil)
	q.ShutDown()
	wg.Wait()
	c.leading.Store(false)
	c.opts.Metrics.setLeader(false)
	c.mu.Lock()
	clear(c.lastProgrammed)
	c.mu.Unlock()
	c.log.Info("no longer leading: status is another replica's to write", "lease", c.opts.LeaseName)
}
