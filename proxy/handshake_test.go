package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"latch.dev/latch/identity"
)

// TestSessionResumptionOff: by default an outbound listener resumes its TLS
// session with the upstream from the second connection on; turned off in
// the listener's configuration or for the whole Server, every connection is
// a full handshake, on both sidecars' account.
func TestSessionResumptionOff(t *testing.T) {
	for _, tc := range []struct {
		name        string
		mo          meshOptions
		wantResumed bool
	}{
		{"default", meshOptions{}, true},
		{"listener", meshOptions{outbound: func(o *Outbound) { o.DisableSessionResumption = true }}, false},
		{"server", meshOptions{noResumption: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, echo, tc.mo)
			for i := range 3 {
				mark := m.logs.mark()
				c := m.dial(t)
				if err := roundTrip(c, "hello"); err != nil {
					t.Fatal(err)
				}
				c.Close()
				resumed := fmt.Sprint(tc.wantResumed && i > 0)
				for _, l := range []string{"web", "backend"} {
					m.logs.wait(t, mark, "connection closed", map[string]string{"listener": l, "reason": reasonEOF, "tls_resumed": resumed})
				}
			}
		})
	}
}

// TestAccessLogTLS: the access-log line of both sidecars names the TLS
// version, cipher suite and key exchange group the connection negotiated,
// and latch_handshakes_total counts handshakes by group, so operators see
// which connections still use a classical group.
func TestAccessLogTLS(t *testing.T) {
	tls12 := identity.Intermediate()
	tls12.MaxVersion = tls.VersionTLS12
	only := func(p identity.Profile, g tls.CurveID) identity.Profile {
		p.Curves = []tls.CurveID{g}
		return p
	}
	for _, tc := range []struct {
		name    string
		profile identity.Profile
		version string
		cipher  string
		// group of the first connection (a full handshake) and of the
		// second (resumed).
		group, resumedGroup string
	}{
		{"modern", identity.Modern(), "TLS 1.3", "TLS_AES_128_GCM_SHA256", "X25519MLKEM768", "X25519MLKEM768"},
		{"modern, X25519 only", only(identity.Modern(), tls.X25519), "TLS 1.3", "TLS_AES_128_GCM_SHA256", "X25519", "X25519"},
		{"modern, P-256 only", only(identity.Modern(), tls.CurveP256), "TLS 1.3", "TLS_AES_128_GCM_SHA256", "P-256", "P-256"},
		// A TLS 1.2 resumption runs no key exchange: Go reports the
		// group of the session's original handshake.
		{"TLS 1.2", tls12, "TLS 1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "X25519", "X25519"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, echo, meshOptions{profile: tc.profile, metrics: NewMetrics(nil)})
			handshakes := func(s *Server, name string, dir Direction, group string) prometheus.Counter {
				return s.metrics.handshakes.WithLabelValues(name, string(dir), group)
			}
			for i, group := range []string{tc.group, tc.resumedGroup} {
				in, out := handshakes(m.inbound, "web", DirectionInbound, group), handshakes(m.outbound, "backend", DirectionOutbound, group)
				inBefore, outBefore := metricValue(t, in), metricValue(t, out)
				mark := m.logs.mark()
				c := m.dial(t)
				if err := roundTrip(c, "hello"); err != nil {
					t.Fatal(err)
				}
				c.Close()
				want := map[string]string{
					"reason": reasonEOF, "tls_version": tc.version, "tls_cipher_suite": tc.cipher,
					"tls_key_exchange_group": group, "tls_resumed": map[bool]string{false: "false", true: "true"}[i == 1],
				}
				for _, side := range []struct {
					name string
					dir  Direction
				}{{"web", DirectionInbound}, {"backend", DirectionOutbound}} {
					w := map[string]string{"listener": side.name, "direction": string(side.dir)}
					for k, v := range want {
						w[k] = v
					}
					m.logs.wait(t, mark, "connection closed", w)
				}
				if n := metricValue(t, in) - inBefore; n != 1 {
					t.Errorf("connection %d: latch_handshakes_total{listener=web,group=%q} grew by %v, want 1", i+1, group, n)
				}
				if n := metricValue(t, out) - outBefore; n != 1 {
					t.Errorf("connection %d: latch_handshakes_total{listener=backend,group=%q} grew by %v, want 1", i+1, group, n)
				}
			}
		})
	}
}

// TestClientRefusedIsClassified: when the upstream refuses the outbound
// sidecar's identity, the outbound sidecar says so with the class latch
// check uses, client_refused: in TLS 1.2 the refusal ends the handshake; in
// TLS 1.3 the client's handshake completes first and the refusal arrives on
// the first read, so the access-log line of the connection carries the
// class too. Either way the app's connection ends, and is counted as a
// refused handshake.
func TestClientRefusedIsClassified(t *testing.T) {
	tls12 := identity.Intermediate()
	tls12.MaxVersion = tls.VersionTLS12
	for _, tc := range []struct {
		name    string
		profile identity.Profile
		// accessLog: the refusal came after the handshake, inside the
		// connection's pipe, so its access-log line has the class.
		accessLog bool
	}{
		{"TLS 1.3", identity.Modern(), true},
		{"TLS 1.2", tls12, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, echo, meshOptions{
				profile: tc.profile, metrics: NewMetrics(nil),
				inbound: func(in *Inbound) { in.Allow = allowIDs(t, otherID) },
			})
			refusals := m.outbound.metrics.handshakeFailures.WithLabelValues("backend", "outbound", string(identity.ClassClientRefused))
			mark := m.logs.mark()
			// The sidecar handshakes as soon as it accepted the app's
			// connection, and in TLS 1.3 reads the refusal at once: its
			// reset of the app's connection can come before the app's
			// Dial has returned, and fail it.
			c, err := net.Dial("tcp", addrOf(t, m.outbound, "backend"))
			switch {
			case err == nil:
				defer c.Close()
				c.SetDeadline(time.Now().Add(waitFor))
				c.Write([]byte("request"))
				if n, _ := io.Copy(io.Discard, c); n != 0 {
					t.Errorf("the app read %d bytes from a server that refused it", n)
				}
			case !errors.Is(err, syscall.ECONNRESET):
				t.Fatal(err)
			}
			out := map[string]string{"listener": "backend", "direction": "outbound", "class": string(identity.ClassClientRefused)}
			if tc.accessLog {
				// The handshake completed: the server's ID is verified.
				out["peer_id"] = backendID
			}
			r := m.logs.wait(t, mark, "handshake refused", out)
			if r.level != slog.LevelWarn || r.attrs["reason"] == "" || r.attrs["app_addr"] == "" {
				t.Errorf("refusal logged as %v", r)
			}
			// The server's side of the same refusal.
			m.logs.wait(t, mark, "handshake refused", map[string]string{"listener": "web", "class": string(identity.ClassNotAllowed), "peer_id": frontendID})
			if tc.accessLog {
				m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "backend", "class": string(identity.ClassClientRefused), "reason": reasonUpstreamReset})
			}
			if n := metricValue(t, refusals); n != 1 {
				t.Errorf("latch_handshake_failures_total{class=client_refused} = %v, want 1", n)
			}
		})
	}
}
