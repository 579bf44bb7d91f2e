package kube

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
)

// GVR is the ServicePolicy resource.
var GVR = schema.GroupVersionResource{Group: policy.Group, Version: policy.Version, Resource: "servicepolicies"}

var configMaps = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}

// FieldManager is the name under which the control plane writes status and
// its ACK reports (server-side apply).
const FieldManager = "latch-control-plane"

// DefaultLeaseName names the Lease the replicas elect a status writer with,
// and prefixes their ACK reports.
const DefaultLeaseName = "latch-control-plane"

// XDS is what the controller needs of the replica's xDS server.
type XDS interface {
	// Acks is what the sidecars connected to this replica acknowledged.
	Acks() []server.NodeAcks
	// AcksChanged is signalled when Acks may have changed.
	AcksChanged() <-chan struct{}
	// VersionFor is the xDS version a declaration is served as.
	VersionFor(policy.Declaration) string
}

// Options configure a Controller.
type Options struct {
	// Config reaches the API server. Its rate limits default to 50 QPS
	// (burst 100) rather than client-go's 5: status writes come in bursts.
	Config *rest.Config
	// Store receives the objects; its Options decide what they may declare
	// (set Owners to enforce namespace ownership).
	Store *policy.Store
	// Namespaces to read ServicePolicies from; empty reads every namespace.
	Namespaces []string
	// OnChange is called after an object changed what the store serves or
	// says, one call at a time, before the status reflects it.
	OnChange func(policy.Change)
	// XDS is this replica's xDS server.
	XDS XDS
	// Identity names this replica (its pod name) in the Lease and its ACK
	// report. Namespace is where both live: the control plane's own.
	Identity  string
	Namespace string
	// LeaseName names the Lease (default DefaultLeaseName).
	LeaseName string
	// LeaseDuration, RenewDeadline and RetryPeriod are the leader
	// election's timing (defaults 15s, 10s, 2s: client-go's usual).
	// LeaseDuration is at least a second (the Lease holds whole seconds),
	// RenewDeadline shorter than it and longer than 1.2 RetryPeriods.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// ReportInterval is the least time between two writes of this
	// replica's ACK report (default 1s); ReportHeartbeat the most (default
	// 30s). The leader ignores a report not rewritten for three heartbeats
	// and deletes one not rewritten for ten.
	ReportInterval, ReportHeartbeat time.Duration
	Logger                          *slog.Logger
	Metrics                         *Metrics
}

// Controller keeps a policy.Store in step with the ServicePolicy objects of
// the API server and, while this replica holds the Lease, their status in
// step with the store and the sidecars' acknowledgements.
type Controller struct {
	opts Options
	log  *slog.Logger
	// The dynamic client reads and writes everything: ServicePolicies, ACK
	// reports, the Lease. Nothing here may import a typed client, the
	// generated clientset or informers, or client-go's leaderelection: they
	// register every API group at package init, which every sidecar would
	// run too (latch is one binary). See lease.go and cmd/latch's
	// TestSidecarBinaryLinksNoKubernetesClients.
	dyn dynamic.Interface

	policies map[string]cache.SharedIndexInformer // by namespace ("" for all)
	reports  cache.SharedIndexInformer

	queue  workqueue.TypedRateLimitingInterface[cache.ObjectName] // objects to read into the store
	status atomic.Pointer[statusQueue]                            // objects whose status to write; nil unless leading

	synced  atomic.Bool
	leading atomic.Bool
	acks    *ackView

	mu             sync.Mutex
	lastProgrammed map[cache.ObjectName]condition // the leader's last Programmed, for metrics
}

type statusQueue = workqueue.TypedRateLimitingInterface[cache.ObjectName]

// New returns a Controller; nothing happens until Run.
func New(opts Options) (*Controller, error) {
	if opts.Config == nil || opts.Store == nil || opts.XDS == nil {
		return nil, errors.New("kube: Config, Store and XDS are required")
	}
	if opts.Identity == "" || opts.Namespace == "" {
		return nil, errors.New("kube: Identity and Namespace are required (the pod's name and namespace)")
	}
	opts.LeaseName = cmp.Or(opts.LeaseName, DefaultLeaseName)
	opts.LeaseDuration = cmp.Or(opts.LeaseDuration, 15*time.Second)
	opts.RenewDeadline = cmp.Or(opts.RenewDeadline, 10*time.Second)
	opts.RetryPeriod = cmp.Or(opts.RetryPeriod, 2*time.Second)
	if err := validateElection(opts.LeaseDuration, opts.RenewDeadline, opts.RetryPeriod); err != nil {
		return nil, fmt.Errorf("kube: leader election: %w", err)
	}
	opts.ReportInterval = cmp.Or(opts.ReportInterval, time.Second)
	opts.ReportHeartbeat = cmp.Or(opts.ReportHeartbeat, 30*time.Second)
	if opts.OnChange == nil {
		opts.OnChange = func(policy.Change) {}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg := rest.CopyConfig(opts.Config)
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 50, 100
	}
	cfg.UserAgent = cmp.Or(cfg.UserAgent, "latch-control-plane")
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kube: client for ServicePolicies: %w", err)
	}
	c := &Controller{
		opts: opts, log: log, dyn: dyn,
		policies: map[string]cache.SharedIndexInformer{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[cache.ObjectName](),
			workqueue.TypedRateLimitingQueueConfig[cache.ObjectName]{Name: "servicepolicies"}),
		lastProgrammed: map[cache.ObjectName]condition{},
	}
	c.acks = newAckView(c)
	namespaces := slices.Compact(slices.Sorted(slices.Values(opts.Namespaces)))
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	for _, ns := range namespaces {
		inf := newInformer(dyn, GVR, ns, nil)
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: c.policyChanged,
			UpdateFunc: func(old, cur any) {
				// Status writes and metadata edits leave the generation
				// alone: only the status needs a look then.
				if o, ok := old.(*unstructured.Unstructured); ok {
					if n, ok := cur.(*unstructured.Unstructured); ok && o.GetGeneration() == n.GetGeneration() {
						c.enqueueStatus(cache.MetaObjectToName(n))
						return
					}
				}
				c.policyChanged(cur)
			},
			DeleteFunc: c.policyChanged,
		}); err != nil {
			return nil, err
		}
		c.policies[ns] = inf
	}
	c.reports = newInformer(dyn, configMaps, opts.Namespace,
		func(o *metav1.ListOptions) { o.LabelSelector = reportLabel + "=" + opts.LeaseName })
	if _, err := c.reports.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { c.acks.update(o) },
		UpdateFunc: func(_, o any) { c.acks.update(o) },
		DeleteFunc: func(o any) { c.acks.remove(o) },
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// newInformer is a shared informer of the objects of gvr in namespace ("":
// all), as dynamicinformer.NewFilteredDynamicInformer builds it. Not that
// package itself: it imports client-go's typed informers for one interface,
// and with them every API group (see the Controller's dyn).
func newInformer(dyn dynamic.Interface, gvr schema.GroupVersionResource, namespace string, tweak func(*metav1.ListOptions)) cache.SharedIndexInformer {
	r := dyn.Resource(gvr).Namespace(namespace)
	if tweak == nil {
		tweak = func(*metav1.ListOptions) {}
	}
	return cache.NewSharedIndexInformerWithOptions(
		cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				tweak(&o)
				return r.List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				tweak(&o)
				return r.Watch(ctx, o)
			},
		}, dyn),
		&unstructured.Unstructured{},
		cache.SharedIndexInformerOptions{
			Indexers:          cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
			ObjectDescription: gvr.String(),
		})
}

func (c *Controller) policyChanged(obj any) {
	name, err := cache.DeletionHandlingObjectToName(obj)
	if err != nil {
		c.log.Warn("ServicePolicy event without a name", "reason", err)
		return
	}
	c.queue.Add(name)
}

// Synced reports whether the informers have synced and every object they
// listed has been read into the store: until then the store is missing
// policy, and the control plane must not say it is ready.
func (c *Controller) Synced() bool { return c.synced.Load() }

// Leading reports whether this replica holds the Lease and writes status.
func (c *Controller) Leading() bool { return c.leading.Load() }

// Run reads objects into the store, publishes this replica's ACK report and
// takes part in the election of the status writer, until ctx is done. It
// returns an error only if the informers cannot sync before ctx is done.
func (c *Controller) Run(ctx context.Context) error {
	var informers sync.WaitGroup
	defer informers.Wait()
	for _, inf := range c.policies {
		informers.Go(func() { inf.RunWithContext(ctx) })
	}
	informers.Go(func() { c.reports.RunWithContext(ctx) })
	var wg sync.WaitGroup
	defer wg.Wait()
	defer c.queue.ShutDown()
	start := time.Now()
	syncs := []cache.InformerSynced{c.reports.HasSynced}
	for _, inf := range c.policies {
		syncs = append(syncs, inf.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		return fmt.Errorf("ServicePolicy informers did not sync: %w", ctx.Err())
	}
	n, ch := c.initialSync()
	c.synced.Store(true)
	c.opts.Metrics.setSynced(true)
	c.opts.OnChange(ch)
	c.log.Info("ServicePolicies synced", "objects", n, "duration", time.Since(start).Round(time.Millisecond).String())

	wg.Go(func() {
		for c.processNext() {
		}
	})
	wg.Go(func() { c.runReporter(ctx) })
	wg.Go(func() { c.runElection(ctx) })
	<-ctx.Done()
	return nil
}

// initialSync reads every listed object into the store at once, in the order
// that keeps incumbency across restarts and replicas: objects whose status
// says their current generation was accepted first, then the oldest. It
// returns how many objects there were and what changed.
func (c *Controller) initialSync() (int, policy.Change) {
	var objs []*unstructured.Unstructured
	for _, inf := range c.policies {
		for _, o := range inf.GetStore().List() {
			if u, ok := o.(*unstructured.Unstructured); ok {
				objs = append(objs, u)
			}
		}
	}
	slices.SortFunc(objs, func(a, b *unstructured.Unstructured) int {
		if ia, ib := incumbent(a), incumbent(b); ia != ib {
			if ia {
				return -1
			}
			return 1
		}
		return cmp.Or(
			a.GetCreationTimestamp().Compare(b.GetCreationTimestamp().Time),
			cmp.Compare(a.GetNamespace(), b.GetNamespace()),
			cmp.Compare(a.GetName(), b.GetName()))
	})
	var ch policy.Change
	for _, u := range objs {
		ch.Merge(c.opts.Store.SetObject(objectOf(u)))
	}
	return len(objs), ch
}

// incumbent reports whether u's status says its current generation is
// accepted: what the last leader decided, which a restart should not undo.
func incumbent(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == condAccepted && m["status"] == string(metav1.ConditionTrue) {
			g, _, _ := unstructured.NestedInt64(m, "observedGeneration")
			return g == u.GetGeneration()
		}
	}
	return false
}

func objectOf(u *unstructured.Unstructured) policy.Object {
	spec, _ := json.Marshal(u.Object["spec"]) // from JSON, so it encodes
	return policy.Object{Namespace: u.GetNamespace(), Name: u.GetName(), Generation: u.GetGeneration(), Spec: spec}
}

// get returns the cached object name, if it exists.
func (c *Controller) get(name cache.ObjectName) (*unstructured.Unstructured, bool) {
	inf := c.policies[metav1.NamespaceAll]
	if inf == nil {
		inf = c.policies[name.Namespace]
	}
	if inf == nil {
		return nil, false
	}
	o, ok, err := inf.GetStore().GetByKey(name.String())
	if err != nil || !ok {
		return nil, false
	}
	u, ok := o.(*unstructured.Unstructured)
	return u, ok
}

// processNext reads one changed object into the store.
func (c *Controller) processNext() bool {
	name, shutdown := c.queue.Get()
	if shutdown {
		return false
	}
	defer c.queue.Done(name)
	var ch policy.Change
	if u, ok := c.get(name); ok {
		ch = c.opts.Store.SetObject(objectOf(u))
	} else {
		ch = c.opts.Store.Remove(policy.ObjectSource(name.Namespace, name.Name))
	}
	if ch.Empty() {
		return true
	}
	c.opts.OnChange(ch)
	for _, src := range ch.Sources {
		if src.IsObject() {
			c.enqueueStatus(cache.ObjectName{Namespace: src.Namespace, Name: src.Name})
		}
	}
	return true
}

// enqueueStatus asks for name's status to be checked, if this replica writes
// status.
func (c *Controller) enqueueStatus(name cache.ObjectName) {
	if q := c.status.Load(); q != nil {
		(*q).Add(name)
	}
}

// enqueueAllStatus asks for every object's status to be checked.
func (c *Controller) enqueueAllStatus() {
	for _, inf := range c.policies {
		for _, o := range inf.GetStore().List() {
			if u, ok := o.(*unstructured.Unstructured); ok {
				c.enqueueStatus(cache.MetaObjectToName(u))
			}
		}
	}
}
