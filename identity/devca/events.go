package devca

import (
	"crypto/x509"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// EventKind says what happened in an Event.
type EventKind string

const (
	// EventSVIDIssued: an SVID was signed (for a workload, or by Issue).
	EventSVIDIssued EventKind = "svid_issued"
	// EventCAPublished: rollover phase 1, a new CA entered the bundle and signs
	// nothing yet.
	EventCAPublished EventKind = "ca_published"
	// EventCAActivated: rollover phase 2, the new CA signs from now on and the
	// previous one is retired (still in the bundle).
	EventCAActivated EventKind = "ca_activated"
	// EventCADropped: rollover phase 3, a retired CA left the bundle because the
	// last SVID it signed has expired.
	EventCADropped EventKind = "ca_dropped"
)

// Event reports one change of the CA's state. Events are delivered in the
// order they happened.
type Event struct {
	Kind EventKind
	Time time.Time
	// SVID is the new SVID for EventSVIDIssued.
	SVID *x509svid.SVID
	// CA is the authority concerned: the signer for EventSVIDIssued, the new CA
	// for EventCAPublished and EventCAActivated, the removed one for
	// EventCADropped.
	CA *x509.Certificate
	// Bundle is the bundle as published right after the event.
	Bundle *x509bundle.Bundle
}

type subscriber struct {
	ch      chan Event
	dropped int
}

// Subscribe returns a channel of every Event from now on, buffered for buffer
// events, and a function that ends the subscription (and closes the channel).
// The CA never blocks on a slow reader: an event that does not fit the buffer
// is dropped and logged. Close closes every subscription's channel.
func (ca *CA) Subscribe(buffer int) (<-chan Event, func()) {
	s := &subscriber{ch: make(chan Event, max(buffer, 0))}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		close(s.ch)
		return s.ch, func() {}
	}
	ca.subs[s] = struct{}{}
	return s.ch, func() {
		ca.mu.Lock()
		defer ca.mu.Unlock()
		if _, ok := ca.subs[s]; ok {
			delete(ca.subs, s)
			close(s.ch)
		}
	}
}

// emitLocked sends e to every subscriber without blocking.
func (ca *CA) emitLocked(e Event) {
	if len(ca.subs) == 0 {
		return
	}
	e.Bundle = ca.bundleLocked()
	for s := range ca.subs {
		select {
		case s.ch <- e:
		default:
			s.dropped++
			ca.log.Warn("event subscriber too slow; event dropped", "event", string(e.Kind), "dropped", s.dropped)
		}
	}
}

// AuthorityState is where a CA stands in the rollover cycle.
type AuthorityState string

const (
	// AuthorityPending: published in the bundle, not signing yet.
	AuthorityPending AuthorityState = "pending"
	// AuthorityActive: signs every new SVID.
	AuthorityActive AuthorityState = "active"
	// AuthorityRetired: no longer signing, published until its last SVID expired.
	AuthorityRetired AuthorityState = "retired"
)

// AuthorityStatus describes one CA in the bundle.
type AuthorityStatus struct {
	Certificate *x509.Certificate
	State       AuthorityState
	// ActivateAt is when a pending CA starts signing (or started, if active).
	ActivateAt time.Time
	// LastSVIDExpiry is the latest expiry of an SVID this CA signed; a retired
	// CA leaves the bundle just after it.
	LastSVIDExpiry time.Time
}

// WorkloadStatus describes one registered workload.
type WorkloadStatus struct {
	ID   spiffeid.ID
	Addr string
	// SVID is the one currently served.
	SVID *x509svid.SVID
	// RotateAt is when it will be replaced.
	RotateAt time.Time
	// Streams counts the open FetchX509SVID streams on its socket.
	Streams int
}

// Status is a snapshot of the CA.
type Status struct {
	TrustDomain spiffeid.TrustDomain
	// Authorities are the CAs in the bundle: retired (oldest first), the active
	// one, then the pending one if a rollover is in progress.
	Authorities []AuthorityStatus
	// Workloads in registration order.
	Workloads []WorkloadStatus
}

// Active returns the certificate of the CA that signs new SVIDs.
func (s Status) Active() *x509.Certificate {
	for _, a := range s.Authorities {
		if a.State == AuthorityActive {
			return a.Certificate
		}
	}
	return nil
}

// Status returns a snapshot of the CAs in the bundle and of the workloads.
func (ca *CA) Status() Status {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	st := Status{TrustDomain: ca.td}
	add := func(a *authority, state AuthorityState) {
		st.Authorities = append(st.Authorities, AuthorityStatus{
			Certificate:    a.cert,
			State:          state,
			ActivateAt:     a.activateAt,
			LastSVIDExpiry: a.lastSVIDExpiry,
		})
	}
	for _, a := range ca.retired {
		add(a, AuthorityRetired)
	}
	add(ca.active, AuthorityActive)
	if ca.pending != nil {
		add(ca.pending, AuthorityPending)
	}
	for _, id := range ca.order {
		w := ca.workloads[id]
		st.Workloads = append(st.Workloads, WorkloadStatus{
			ID: w.id, Addr: w.addr, SVID: w.svid, RotateAt: w.rotateAt, Streams: w.streams,
		})
	}
	return st
}

// String renders the status compactly for logs and test failures.
func (s Status) String() string {
	var b strings.Builder
	b.WriteString(s.TrustDomain.Name())
	for _, a := range s.Authorities {
		b.WriteString(" ca[")
		b.WriteString(string(a.State))
		b.WriteString(" ")
		b.WriteString(serialHex(a.Certificate))
		b.WriteString("]")
	}
	ids := make([]string, 0, len(s.Workloads))
	for _, w := range s.Workloads {
		ids = append(ids, w.ID.String())
	}
	slices.Sort(ids)
	b.WriteString(" workloads=")
	b.WriteString(strings.Join(ids, ","))
	return b.String()
}
