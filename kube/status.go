package kube

import (
	"context"
	"fmt"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"

	"latch.dev/latch/xds/policy"
)

// Condition types and reasons of a ServicePolicy's status.
const (
	condAccepted   = "Accepted"
	condProgrammed = "Programmed"

	// Programmed's reasons; Accepted's are policy.Reason*.
	ReasonProgrammed  = "Programmed"  // every connected sidecar applied it
	ReasonPending     = "Pending"     // not every connected sidecar has yet, or none is connected
	ReasonRefused     = "Refused"     // a sidecar refused it (NACK)
	ReasonNotAccepted = "NotAccepted" // the latest generation is not accepted
)

// maxMessage bounds a condition's message: the decoder's refusals of a big
// object, or a sidecar's NACK, must not make the status unwritable.
const maxMessage = 4096

// condition is what the control plane says in one condition; the API server
// stores it with a transition time.
type condition struct {
	Type, Status, Reason, Message string
	ObservedGeneration            int64
}

// desiredStatus is a ServicePolicy's status as the control plane sees it.
type desiredStatus struct {
	observedGeneration, servedGeneration int64
	conditions                           []condition
}

// statusFor computes u's status from what the store made of it (st) and
// what the sidecars of its workload acknowledged.
func (c *Controller) statusFor(u *unstructured.Unstructured, st policy.State) desiredStatus {
	gen := u.GetGeneration()
	ds := desiredStatus{observedGeneration: gen, servedGeneration: st.ServingGeneration}
	accepted := condition{Type: condAccepted, ObservedGeneration: gen}
	programmed := condition{Type: condProgrammed, ObservedGeneration: gen, Status: string(metav1.ConditionFalse)}
	if st.Accepted() {
		accepted.Status, accepted.Reason = string(metav1.ConditionTrue), policy.ReasonAccepted
		d := st.Serving[0]
		accepted.Message = fmt.Sprintf("generation %d is served to the sidecars of %s", gen, d.ID)
		programmed.Reason, programmed.Message = c.programmed(d)
		if programmed.Reason == ReasonProgrammed {
			programmed.Status = string(metav1.ConditionTrue)
		}
	} else {
		accepted.Status, accepted.Reason = string(metav1.ConditionFalse), st.Reason
		var msgs []string
		for _, e := range st.Errors {
			msgs = append(msgs, e.Reason)
		}
		accepted.Message = clip(strings.Join(msgs, "; "), maxMessage)
		programmed.Reason = ReasonNotAccepted
		programmed.Message = fmt.Sprintf("generation %d is not accepted", gen)
		if st.ServingGeneration > 0 {
			programmed.Message += fmt.Sprintf("; generation %d is served instead", st.ServingGeneration)
		} else {
			programmed.Message += "; nothing is served for it"
		}
	}
	ds.conditions = []condition{accepted, programmed}
	return ds
}

// programmed says whether every sidecar of d's workload connected to any
// replica has applied the version d is served as.
func (c *Controller) programmed(d policy.Declaration) (reason, message string) {
	version := c.opts.XDS.VersionFor(d)
	t := c.acks.total(d.ID.String(), version)
	switch {
	case t.connected == 0:
		return ReasonPending, fmt.Sprintf("no sidecar of %s is connected to the control plane", d.ID)
	case t.nacked > 0:
		return ReasonRefused, clip(fmt.Sprintf("%d of %d connected sidecars refused version %s: %s", t.nacked, t.connected, version, t.nack), maxMessage)
	case t.acked < t.connected:
		return ReasonPending, fmt.Sprintf("%d of %d connected sidecars have applied version %s", t.acked, t.connected, version)
	}
	return ReasonProgrammed, fmt.Sprintf("all %d connected sidecars have applied version %s", t.connected, version)
}

// currentStatus reads u's status as stored.
func currentStatus(u *unstructured.Unstructured) (desiredStatus, map[string]string) {
	var ds desiredStatus
	ds.observedGeneration, _, _ = unstructured.NestedInt64(u.Object, "status", "observedGeneration")
	ds.servedGeneration, _, _ = unstructured.NestedInt64(u.Object, "status", "servedGeneration")
	times := map[string]string{}
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, x := range conds {
		m, ok := x.(map[string]any)
		if !ok {
			continue
		}
		var cd condition
		cd.Type, _ = m["type"].(string)
		cd.Status, _ = m["status"].(string)
		cd.Reason, _ = m["reason"].(string)
		cd.Message, _ = m["message"].(string)
		cd.ObservedGeneration, _, _ = unstructured.NestedInt64(m, "observedGeneration")
		times[cd.Type], _ = m["lastTransitionTime"].(string)
		ds.conditions = append(ds.conditions, cd)
	}
	return ds, times
}

func (a desiredStatus) equal(b desiredStatus) bool {
	if a.observedGeneration != b.observedGeneration || a.servedGeneration != b.servedGeneration || len(a.conditions) != len(b.conditions) {
		return false
	}
	for i := range a.conditions {
		if a.conditions[i] != b.conditions[i] {
			return false
		}
	}
	return true
}

// writeStatus brings name's status in line with what the control plane
// knows. It writes nothing when the status already says it.
func (c *Controller) writeStatus(ctx context.Context, name cache.ObjectName) error {
	u, ok := c.get(name)
	if !ok {
		c.forgetProgrammed(name)
		return nil
	}
	st, ok := c.opts.Store.State(policy.ObjectSource(name.Namespace, name.Name))
	if !ok || st.Generation != u.GetGeneration() {
		return nil // not read into the store yet; it is queued again when it is
	}
	want := c.statusFor(u, st)
	c.noteProgrammed(name, want.conditions[1])
	have, times := currentStatus(u)
	if want.equal(have) {
		c.opts.Metrics.statusWrite("unchanged")
		return nil
	}
	now := metav1.Now().UTC().Format(time.RFC3339)
	var conds []any
	for _, cd := range want.conditions {
		t := now
		for _, h := range have.conditions {
			if h.Type == cd.Type && h.Status == cd.Status && times[cd.Type] != "" {
				t = times[cd.Type] // the status did not change: neither did its time
			}
		}
		conds = append(conds, map[string]any{
			"type": cd.Type, "status": cd.Status, "reason": cd.Reason, "message": cd.Message,
			"observedGeneration": cd.ObservedGeneration, "lastTransitionTime": t,
		})
	}
	status := map[string]any{"observedGeneration": want.observedGeneration, "conditions": conds}
	if want.servedGeneration > 0 {
		status["servedGeneration"] = want.servedGeneration
	}
	apply := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": policy.APIVersion, "kind": policy.Kind,
		"metadata": map[string]any{"name": name.Name, "namespace": name.Namespace},
		"status":   status,
	}}
	_, err := c.dyn.Resource(GVR).Namespace(name.Namespace).ApplyStatus(ctx, name.Name, apply, metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	switch {
	case apierrors.IsNotFound(err):
		c.opts.Metrics.statusWrite("gone")
		return nil
	case err != nil:
		c.opts.Metrics.statusWrite("failed")
		return fmt.Errorf("writing the status of %s %s: %w", policy.Kind, name, err)
	}
	c.opts.Metrics.statusWrite("written")
	c.log.Debug("status written", "object", name.String(), "generation", want.observedGeneration,
		"accepted", want.conditions[0].Reason, "programmed", want.conditions[1].Reason)
	return nil
}

func (c *Controller) noteProgrammed(name cache.ObjectName, cd condition) {
	c.mu.Lock()
	c.lastProgrammed[name] = cd
	c.mu.Unlock()
}

func (c *Controller) forgetProgrammed(name cache.ObjectName) {
	c.mu.Lock()
	delete(c.lastProgrammed, name)
	c.mu.Unlock()
}

// runStatus writes status from q until it shuts down, each write within
// the term t: a write the term's end cuts off fails, and is queued again for
// the next leader's term on this replica, if any (the next leader writes
// every status anyway).
func (c *Controller) runStatus(ctx context.Context, t *term, q statusQueue) {
	for {
		name, shutdown := q.Get()
		if shutdown {
			return
		}
		wctx, cancel := t.context(ctx)
		err := c.writeStatus(wctx, name)
		cancel()
		if err != nil {
			if ctx.Err() == nil && t.live() {
				c.log.Warn("status not written; retrying", "object", name.String(), "reason", err)
			}
			q.AddRateLimited(name)
		} else {
			q.Forget(name)
		}
		q.Done(name)
	}
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}
