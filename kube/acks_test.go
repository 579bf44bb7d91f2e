package kube

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"latch.dev/latch/xds/server"
)

// TestReportSize: one replica's report for 10,000 workloads — each with a
// connected sidecar, a distinct version, one in a hundred refusing it with a
// 1 KiB reason — fits a ConfigMap (1 MiB) many times over, and reads back
// as written.
func TestReportSize(t *testing.T) {
	const n = 10000
	acks := make([]server.NodeAcks, n)
	for i := range acks {
		sum := sha256.Sum256([]byte(fmt.Sprint(i)))
		acks[i] = server.NodeAcks{
			Node:    fmt.Sprintf("spiffe://cluster.example.org/ns/team-%03d/sa/service-%05d", i%300, i),
			Version: hex.EncodeToString(sum[:8]), Connected: 3, Acked: 3,
		}
		if i%100 == 0 {
			acks[i].Acked, acks[i].NACKed, acks[i].NACK = 2, 1, strings.Repeat("listener refused: ", 57)
		}
	}
	data := encodeReport("latch-control-plane-5d9c7b-x2x7z", acks)
	t.Logf("report for %d workloads: %d bytes (%.1f bytes a workload)", n, len(data), float64(len(data))/n)
	if len(data) > 512<<10 {
		t.Errorf("report of %d bytes: too close to the 1 MiB a ConfigMap holds", len(data))
	}
	r, err := decodeReport(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Nodes) != n || r.Nodes[100].NACKed != 1 || r.Nodes[100].NACK != acks[100].NACK || r.Nodes[n-1].ID != acks[n-1].Node {
		t.Errorf("report read back differs: %d nodes, %+v", len(r.Nodes), r.Nodes[100])
	}
}

// TestReportHostile: a report that is not gzip, not JSON, or that inflates
// beyond any real report is refused, never read whole.
func TestReportHostile(t *testing.T) {
	for name, data := range map[string][]byte{
		"not gzip": []byte("{}"),
		"empty":    nil,
		"not JSON": gzipped([]byte("nodes: [")),
		"a bomb":   gzipped(make([]byte, maxReportBytes+1)),
	} {
		if _, err := decodeReport(data); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func gzipped(b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	_, _ = zw.Write(b)
	_ = zw.Close()
	return buf.Bytes()
}
