package kube

import (
	"math"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestReadLeaseHostile: whatever a Lease's spec holds — fields missing, of
// the wrong type, negative, beyond int32 — it reads as a holder (or none), a
// duration that is zero (expired) unless positive, and a transition count
// that cannot wrap negative when incremented; a spec that is not an object
// is unreadable (never competed for), and a Lease without resourceVersion
// cannot be written conditionally.
func TestReadLeaseHostile(t *testing.T) {
	lease := func(spec any) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{"metadata": map[string]any{"name": "l", "resourceVersion": "7"}}}
		if spec != nil {
			u.Object["spec"] = spec
		}
		return u
	}
	for _, tt := range []struct {
		name        string
		spec        any
		holder      string
		duration    time.Duration
		transitions int32
		unreadable  bool
	}{
		{name: "no spec"},
		{name: "empty spec", spec: map[string]any{}},
		{name: "client-go's record", spec: map[string]any{"holderIdentity": "cp-0", "leaseDurationSeconds": int64(15), "leaseTransitions": int64(3),
			"acquireTime": "2026-01-02T03:04:05.000000Z", "renewTime": "2026-01-02T03:04:06.123456Z"},
			holder: "cp-0", duration: 15 * time.Second, transitions: 3},
		{name: "negative duration", spec: map[string]any{"holderIdentity": "cp-0", "leaseDurationSeconds": int64(-5)}, holder: "cp-0"},
		{name: "zero duration", spec: map[string]any{"holderIdentity": "cp-0", "leaseDurationSeconds": int64(0)}, holder: "cp-0"},
		{name: "duration as a string", spec: map[string]any{"holderIdentity": "cp-0", "leaseDurationSeconds": "15"}, holder: "cp-0"},
		{name: "duration as a float", spec: map[string]any{"leaseDurationSeconds": 2.9}, duration: 2 * time.Second},
		{name: "duration NaN", spec: map[string]any{"leaseDurationSeconds": math.NaN()}},
		{name: "duration beyond int64", spec: map[string]any{"leaseDurationSeconds": 1e300}},
		{name: "duration beyond int32", spec: map[string]any{"leaseDurationSeconds": int64(math.MaxInt64)}, duration: math.MaxInt32 * time.Second},
		{name: "holder not a string", spec: map[string]any{"holderIdentity": int64(7), "leaseDurationSeconds": int64(15)}, duration: 15 * time.Second},
		{name: "holder a map", spec: map[string]any{"holderIdentity": map[string]any{"x": "y"}}},
		{name: "transitions negative", spec: map[string]any{"leaseTransitions": int64(-1)}},
		{name: "transitions beyond int32", spec: map[string]any{"leaseTransitions": int64(1) << 40}, transitions: math.MaxInt32},
		{name: "times garbled", spec: map[string]any{"holderIdentity": "x", "renewTime": "yesterday", "acquireTime": int64(3)}, holder: "x"},
		{name: "spec a string", spec: "garbage", unreadable: true},
		{name: "spec a list", spec: []any{"a"}, unreadable: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := readLease(lease(tt.spec))
			if r.holder != tt.holder || r.duration != tt.duration || r.transitions != tt.transitions || r.unreadable != tt.unreadable || r.noVersion {
				t.Errorf("read as holder %q duration %v transitions %d unreadable %v noVersion %v; want %q %v %d %v false",
					r.holder, r.duration, r.transitions, r.unreadable, r.noVersion, tt.holder, tt.duration, tt.transitions, tt.unreadable)
			}
			if r.transitions < 0 || r.duration < 0 {
				t.Errorf("negative values read: %+v", r)
			}
		})
	}

	noVersion := lease(map[string]any{"holderIdentity": "cp-0"})
	noVersion.SetResourceVersion("")
	if r := readLease(noVersion); !r.noVersion {
		t.Error("a Lease without resourceVersion read as writable")
	}
	// The same spec reads as the same text whatever the order its keys
	// came in: a holder's renewals are told from a spec merely re-read.
	a := readLease(lease(map[string]any{"holderIdentity": "a", "renewTime": "t1"}))
	b := readLease(lease(map[string]any{"renewTime": "t1", "holderIdentity": "a"}))
	c := readLease(lease(map[string]any{"renewTime": "t2", "holderIdentity": "a"}))
	if a.raw != b.raw || a.raw == c.raw {
		t.Errorf("raw specs: %q %q %q", a.raw, b.raw, c.raw)
	}
}

// TestLeaseRecordWrittenAsClientGo: the spec written carries the fields
// client-go's LeaderElectionRecordToLeaseSpec does, times in microseconds
// (MicroTime), and reads back as written.
func TestLeaseRecordWrittenAsClientGo(t *testing.T) {
	at := time.Date(2026, 5, 6, 7, 8, 9, 123456789, time.FixedZone("X", 3600))
	r := leaseRecord{holder: "cp-1", duration: 15 * time.Second, acquire: at, renew: at.Add(time.Second), transitions: 4}
	spec := r.spec()
	want := map[string]any{
		"holderIdentity": "cp-1", "leaseDurationSeconds": int64(15), "leaseTransitions": int64(4),
		"acquireTime": "2026-05-06T06:08:09.123456Z", "renewTime": "2026-05-06T06:08:10.123456Z",
	}
	for k, v := range want {
		if spec[k] != v {
			t.Errorf("%s = %v, want %v", k, spec[k], v)
		}
	}
	if len(spec) != len(want) {
		t.Errorf("spec has %d fields: %v", len(spec), spec)
	}
	back := readLease(&unstructured.Unstructured{Object: map[string]any{"spec": spec, "metadata": map[string]any{"resourceVersion": "1"}}})
	if back.holder != r.holder || back.duration != r.duration || back.transitions != r.transitions ||
		!back.acquire.Equal(at.Truncate(time.Microsecond)) || !back.renew.Equal(at.Add(time.Second).Truncate(time.Microsecond)) {
		t.Errorf("read back as %+v", back)
	}
}

// TestElectionTiming: what client-go's NewLeaderElector refuses is refused,
// and a lease shorter than a second (written as 0 s: expired for everyone
// else the moment it is written) or a renew deadline not shorter than the
// whole seconds written.
func TestElectionTiming(t *testing.T) {
	for _, tt := range []struct {
		lease, renew, retry time.Duration
		refused             string
	}{
		{15 * time.Second, 10 * time.Second, 2 * time.Second, ""},
		{3 * time.Second, 2 * time.Second, 200 * time.Millisecond, ""},
		{500 * time.Millisecond, 200 * time.Millisecond, 50 * time.Millisecond, "at least 1s"},
		{0, 10 * time.Second, 2 * time.Second, "at least 1s"},
		{15 * time.Second, 15 * time.Second, 2 * time.Second, "shorter than LeaseDuration"},
		{2500 * time.Millisecond, 2200 * time.Millisecond, 100 * time.Millisecond, "shorter than LeaseDuration"},
		{15 * time.Second, 2 * time.Second, 2 * time.Second, "longer than 1.2"},
		{15 * time.Second, 0, 2 * time.Second, "must be positive"},
		{15 * time.Second, 10 * time.Second, -time.Second, "must be positive"},
	} {
		err := validateElection(tt.lease, tt.renew, tt.retry)
		switch {
		case tt.refused == "" && err != nil:
			t.Errorf("%v/%v/%v refused: %v", tt.lease, tt.renew, tt.retry, err)
		case tt.refused != "" && (err == nil || !strings.Contains(err.Error(), tt.refused)):
			t.Errorf("%v/%v/%v: got %v, want refused with %q", tt.lease, tt.renew, tt.retry, err, tt.refused)
		}
	}
}
