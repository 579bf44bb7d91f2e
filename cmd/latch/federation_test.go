package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

// TestProxyCommandFederation runs `latch proxy` against two development
// CAs that federate: a workload of the partner trust domain is admitted on
// the listener that federates with it, /status and /metrics list the
// federated bundle and count the peer under it, and when the mesh's CA stops
// handing out the partner's bundle the live connection is cut (the Workload
// API update reaches the proxy) and the next handshake is refused.
func TestProxyCommandFederation(t *testing.T) {
	const (
		backend = "spiffe://mesh.test/ns/default/sa/backend"
		partner = "spiffe://partner.test/ns/billing/sa/reporter"
	)
	quiet := devca.Options{Logger: slog.New(slog.DiscardHandler)}
	mesh, err := devca.New("mesh.test", quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mesh.Close() })
	partnerCA, err := devca.New("partner.test", quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { partnerCA.Close() })
	if err := mesh.FederateWith(partnerCA); err != nil {
		t.Fatal(err)
	}
	if err := partnerCA.FederateWith(mesh); err != nil {
		t.Fatal(err)
	}
	beSocket, err := mesh.AddWorkload(backend)
	if err != nil {
		t.Fatal(err)
	}
	pSocket, err := partnerCA.AddWorkload(partner)
	if err != nil {
		t.Fatal(err)
	}
	pSrc := workloadSource(t, pSocket)

	app := echoApp(t)
	path := filepath.Join(t.TempDir(), "latch.yaml")
	cfg := "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: " + app +
		"\n    federatesWith: [partner.test]\n    allow:\n      - pathPrefix: spiffe://partner.test/ns/billing\n"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	logs := newJSONLines()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	exited := make(chan error, 1)
	go func() {
		exited <- runProxy(ctx, []string{"--config", path, "--workload-api", beSocket, "--drain-timeout", "1s", "--admin-address", "127.0.0.1:0"}, io.Discard, logs.w)
	}()
	adminAddr := logs.wait(t, "admin endpoint listening", nil)["addr"].(string)
	addr := logs.wait(t, "listening", func(l map[string]any) bool { return l["listener"] == "web" })["addr"].(string)

	clientCfg := identity.NewTLS(pSrc).ClientConfig(identity.Modern(), spiffeid.RequireFromString(backend),
		identity.FederatesWith(spiffeid.RequireTrustDomainFromString("mesh.test")))
	clientCfg.ClientSessionCache = nil
	dial := func() (*tls.Conn, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientCfg)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "hi"); err != nil {
			c.Close()
			return nil, err
		}
		if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
			c.Close()
			return nil, err
		}
		c.SetDeadline(time.Time{})
		return c, nil
	}
	live, err := dial()
	if err != nil {
		t.Fatalf("federated peer through latch proxy: %v", err)
	}
	defer live.Close()

	get := func(p string) string {
		t.Helper()
		resp, err := http.Get("http://" + adminAddr + p)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	var st struct {
		Identity struct {
			Bundles []struct {
				TrustDomain string `json:"trust_domain"`
				Federated   bool   `json:"federated"`
				CAs         []struct {
					NotAfter time.Time `json:"not_after"`
				} `json:"cas"`
			} `json:"bundles"`
		} `json:"identity"`
		Listeners []struct {
			Name               string         `json:"name"`
			FederatesWith      []string       `json:"federates_with"`
			PeersByTrustDomain map[string]int `json:"peers_by_trust_domain"`
		} `json:"listeners"`
	}
	if err := json.Unmarshal([]byte(get("/status")), &st); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, b := range st.Identity.Bundles {
		if b.TrustDomain == "partner.test" {
			found = b.Federated && len(b.CAs) == 1 && !b.CAs[0].NotAfter.IsZero()
		}
	}
	if !found {
		t.Errorf("/status does not list partner.test's federated bundle with its CA: %+v", st.Identity.Bundles)
	}
	if len(st.Listeners) != 1 || strings.Join(st.Listeners[0].FederatesWith, ",") != "partner.test" || st.Listeners[0].PeersByTrustDomain["partner.test"] != 1 {
		t.Errorf("/status listeners %+v", st.Listeners)
	}
	if m := get("/metrics"); !strings.Contains(m, `latch_federated_bundle_refused{trust_domain="partner.test"} 0`) || !strings.Contains(m, `latch_bundle_cas{trust_domain="partner.test"} 1`) {
		t.Error("/metrics lacks the federated bundle")
	}

	mesh.RemoveFederatedBundle(spiffeid.RequireTrustDomainFromString("partner.test"))
	logs.wait(t, "connection closed", func(l map[string]any) bool { return l["reason"] == "trust_revoked" && l["peer_id"] == partner })
	live.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := live.Read(make([]byte, 1)); err == nil || n > 0 {
		t.Errorf("the live connection survived the bundle's removal: %d bytes, %v", n, err)
	}
	if c, err := dial(); err == nil {
		c.Close()
		t.Error("a new handshake was admitted after the bundle's removal")
	}
	logs.wait(t, "handshake refused", func(l map[string]any) bool { return l["class"] == "unknown_ca" && l["peer_id"] == partner })
	logs.wait(t, "federated bundle removed", func(l map[string]any) bool { return l["trust_domain"] == "partner.test" })

	cancel()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("latch proxy exited with %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("latch proxy did not exit after cancellation")
	}
	logs.w.Close()
	<-logs.done
}
