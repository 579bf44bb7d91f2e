package kube

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"

	"latch.dev/latch/xds/server"
)

// How replicas tell the leader what their sidecars acknowledged.
//
// Every replica serves xDS, but only the leader writes status, so each
// replica publishes its share in a ConfigMap of its own (named after the
// Lease and the replica, labelled reportLabel), and the leader watches them
// all. A report is aggregated per workload ID — one ServicePolicy — not per
// sidecar: an entry says how many of the replica's streams of that ID are
// open, have applied which version, and have refused it, with one refusal's
// text. It is JSON, gzipped into binaryData: SPIFFE IDs share long prefixes,
// so 10,000 workloads take about 160 KiB, far from the 1 MiB a ConfigMap may
// hold. A replica rewrites its report when its ACKs change (at most once per
// ReportInterval) and at least every ReportHeartbeat; the leader stops
// counting a report it has not seen change for three heartbeats (a replica
// that died without deleting it) and deletes it after ten.
const (
	reportLabel         = "latch.dev/ack-report" // value: the Lease's name
	reportKey           = "acks.json.gz"
	reportAnnotation    = "latch.dev/written-at"
	maxReportBytes      = 16 << 20 // decompressed: a report is never near this
	staleHeartbeats     = 3
	collectedHeartbeats = 10
)

type report struct {
	Replica string       `json:"replica"`
	Nodes   []reportNode `json:"nodes"`
}

type reportNode struct {
	ID        string `json:"id"`
	Version   string `json:"v"`
	Connected int    `json:"c"`
	Acked     int    `json:"a,omitempty"`
	NACKed    int    `json:"n,omitempty"`
	NACK      string `json:"e,omitempty"`
}

func encodeReport(replica string, acks []server.NodeAcks) []byte {
	r := report{Replica: replica, Nodes: make([]reportNode, 0, len(acks))}
	for _, a := range acks {
		r.Nodes = append(r.Nodes, reportNode{ID: a.Node, Version: a.Version, Connected: a.Connected, Acked: a.Acked, NACKed: a.NACKed, NACK: a.NACK})
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	_ = json.NewEncoder(zw).Encode(r) // plain values: cannot fail
	_ = zw.Close()
	return buf.Bytes()
}

func decodeReport(data []byte) (report, error) {
	var r report
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return r, err
	}
	raw, err := io.ReadAll(io.LimitReader(zr, maxReportBytes+1))
	if err != nil {
		return r, err
	}
	if len(raw) > maxReportBytes {
		return r, fmt.Errorf("larger than %d bytes decompressed", maxReportBytes)
	}
	err = json.Unmarshal(raw, &r)
	return r, err
}

// reportName is the ConfigMap of one replica's report: a DNS subdomain
// (253 characters at most), made short with a hash if need be.
func reportName(lease, identity string) string {
	name := lease + "-acks-" + identity
	if len(name) <= 253 {
		return name
	}
	sum := sha256.Sum256([]byte(identity))
	return lease[:min(len(lease), 200)] + "-acks-" + hex.EncodeToString(sum[:16])
}

// runReporter publishes this replica's report until ctx is done, then
// deletes it.
func (c *Controller) runReporter(ctx context.Context) {
	name := reportName(c.opts.LeaseName, c.opts.Identity)
	heartbeat := time.NewTicker(c.opts.ReportHeartbeat)
	defer heartbeat.Stop()
	var (
		last      []byte
		lastWrite time.Time
		pending   = true
	)
	for {
		if pending {
			// At most one write per interval: ACKs come in bursts (a
			// change reaches every sidecar at once).
			if wait := time.Until(lastWrite.Add(c.opts.ReportInterval)); wait > 0 {
				select {
				case <-ctx.Done():
					c.deleteReport(name)
					return
				case <-time.After(wait):
				}
			}
			payload := encodeReport(c.opts.Identity, c.opts.XDS.Acks())
			pending = false
			if !bytes.Equal(payload, last) || time.Since(lastWrite) >= c.opts.ReportHeartbeat/2 {
				lastWrite = time.Now()
				if err := c.writeReport(ctx, name, payload); err != nil {
					if ctx.Err() == nil {
						c.log.Warn("ACK report not written; retrying", "configmap", name, "reason", err)
					}
					c.opts.Metrics.reportWrite("failed")
					pending = true
				} else {
					c.opts.Metrics.reportWrite("written")
					last = payload
				}
			}
		}
		var retry <-chan time.Time
		if pending {
			retry = time.After(c.opts.ReportInterval)
		}
		select {
		case <-ctx.Done():
			c.deleteReport(name)
			return
		case <-c.opts.XDS.AcksChanged():
			pending = true
		case <-heartbeat.C:
			pending = true
		case <-retry:
		}
	}
}

func (c *Controller) writeReport(ctx context.Context, name string, payload []byte) error {
	cm := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{
			"name": name, "namespace": c.opts.Namespace,
			"labels":      map[string]any{reportLabel: c.opts.LeaseName, "app.kubernetes.io/managed-by": "latch"},
			"annotations": map[string]any{reportAnnotation: time.Now().UTC().Format(time.RFC3339Nano)},
		},
		"binaryData": map[string]any{reportKey: base64.StdEncoding.EncodeToString(payload)},
	}}
	_, err := c.dyn.Resource(configMaps).Namespace(c.opts.Namespace).Apply(ctx, name, cm, metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	return err
}

// deleteReport removes this replica's report as it stops, so the leader
// stops counting its sidecars at once (they are reconnecting elsewhere).
func (c *Controller) deleteReport(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := c.dyn.Resource(configMaps).Namespace(c.opts.Namespace).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		c.log.Warn("ACK report not deleted; the leader will expire it", "configmap", name, "reason", err)
	}
}

// ackView is the leader's picture of every replica's report.
type ackView struct {
	c        *Controller
	mu       sync.Mutex
	replicas map[string]*replicaReport // by ConfigMap name
}

type replicaReport struct {
	seen  time.Time // when this process last saw the report change: no clock skew between nodes
	stale bool
	nodes map[string]reportNode
}

func newAckView(c *Controller) *ackView {
	return &ackView{c: c, replicas: map[string]*replicaReport{}}
}

func (v *ackView) update(obj any) {
	cm, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return
	}
	rep := &replicaReport{seen: time.Now(), nodes: map[string]reportNode{}}
	encoded, _, _ := unstructured.NestedString(cm.Object, "binaryData", reportKey)
	data, err := base64.StdEncoding.DecodeString(encoded)
	var r report
	if err == nil {
		r, err = decodeReport(data)
	}
	if err != nil {
		v.c.log.Warn("unreadable ACK report ignored", "configmap", cm.GetName(), "reason", err)
	} else {
		for _, n := range r.Nodes {
			rep.nodes[n.ID] = n
		}
	}
	v.mu.Lock()
	old := v.replicas[cm.GetName()]
	v.replicas[cm.GetName()] = rep
	v.mu.Unlock()
	var changed []string
	for id, n := range rep.nodes {
		if old == nil || old.stale || old.nodes[id] != n {
			changed = append(changed, id)
		}
	}
	if old != nil {
		for id := range old.nodes {
			if _, ok := rep.nodes[id]; !ok {
				changed = append(changed, id)
			}
		}
	}
	v.c.enqueueIDs(changed)
}

func (v *ackView) remove(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	cm, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return
	}
	v.mu.Lock()
	old := v.replicas[cm.GetName()]
	delete(v.replicas, cm.GetName())
	v.mu.Unlock()
	if old != nil {
		var ids []string
		for id := range old.nodes {
			ids = append(ids, id)
		}
		v.c.enqueueIDs(ids)
	}
}

// totals are one workload's sidecars over every replica.
type totals struct {
	connected, acked, nacked int
	nack                     string
}

// total adds up, for id, what every live replica reports about version.
// Sidecars a replica reports on another version count as connected and not
// applied: that replica has not caught up yet.
func (v *ackView) total(id, version string) totals {
	v.mu.Lock()
	defer v.mu.Unlock()
	var t totals
	for _, r := range v.replicas {
		n, ok := r.nodes[id]
		if !ok || r.stale {
			continue
		}
		t.connected += n.Connected
		if n.Version != version {
			continue
		}
		t.acked += n.Acked
		t.nacked += n.NACKed
		if n.NACKed > 0 && t.nack == "" {
			t.nack = n.NACK
		}
	}
	return t
}

// expire stops counting reports not seen for three heartbeats and returns
// those not seen for ten, to delete.
func (v *ackView) expire(now time.Time, heartbeat time.Duration) (collect []string) {
	var ids []string
	v.mu.Lock()
	for name, r := range v.replicas {
		age := now.Sub(r.seen)
		if age > staleHeartbeats*heartbeat && !r.stale {
			r.stale = true
			for id := range r.nodes {
				ids = append(ids, id)
			}
			v.c.log.Warn("ACK report not rewritten for three heartbeats: its sidecars are no longer counted", "configmap", name)
		}
		if age > collectedHeartbeats*heartbeat {
			collect = append(collect, name)
		}
	}
	v.mu.Unlock()
	v.c.enqueueIDs(ids)
	return collect
}

// enqueueIDs asks for the status of the objects serving ids to be checked.
func (c *Controller) enqueueIDs(ids []string) {
	for _, s := range ids {
		id, err := spiffeid.FromString(s)
		if err != nil {
			continue
		}
		if src, ok := c.opts.Store.Owner(id); ok && src.IsObject() {
			c.enqueueStatus(cache.ObjectName{Namespace: src.Namespace, Name: src.Name})
		}
	}
}
