package demo

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/check"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

// PartnerTrustDomain is a second trust domain, with a development CA of its
// own, that the demo mesh federates with: each CA serves the other's bundle
// as federated, as two SPIRE servers federating would.
const PartnerTrustDomain = "partner.latch.test"

// PartnerID is a workload of the partner trust domain that calls the
// backend's whoami listener, which federates with the partner trust domain.
var PartnerID = spiffeid.RequireFromString("spiffe://" + PartnerTrustDomain + "/ns/billing/sa/reporter")

// Federation is what the demo's federated call showed: the partner workload
// admitted on the backend's whoami listener, verified against the partner
// trust domain's bundle, and the PROXY protocol v2 header the app behind that
// listener read; and the same workload refused on the backend's other
// listener, which does not federate.
type Federation struct {
	Listener string `json:"listener"`
	PeerID   string `json:"peer_id"`
	// ClientBundle is the bundle that verified the partner on the backend's
	// side (the partner trust domain's, federated there), as the backend's
	// TLS test endpoint reports it; ServerBundle the one that verified the
	// backend on the partner's side (the demo trust domain's).
	ClientBundle string  `json:"client_bundle"`
	ServerBundle string  `json:"server_bundle"`
	App          AppView `json:"app"`
	// Refused is the backend's refusal of the partner on its echo
	// listener, which does not federate with the partner trust domain.
	Refused Denial `json:"refused"`
}

// AppView is what the whoami app read from the PROXY protocol v2 header,
// parsed with go-proxyproto as any app would.
type AppView struct {
	PeerID     string `json:"peer_id"`
	Source     string `json:"source"`
	TLSVersion string `json:"tls_version"`
	Cipher     string `json:"cipher"`
	CertSHA256 string `json:"cert_sha256"`
}

// whoamiApp answers every connection with one JSON line: what the PROXY
// protocol v2 header in front of it said.
type whoamiApp struct {
	net.Listener
	wg sync.WaitGroup
}

func startWhoami(log *slog.Logger) (*whoamiApp, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the whoami app: %w", err)
	}
	a := &whoamiApp{Listener: l}
	a.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			a.wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				v, err := readProxyHeader(bufio.NewReader(c))
				if err != nil {
					log.Warn("whoami app: no usable PROXY protocol header", "error", err.Error())
					return
				}
				_ = json.NewEncoder(c).Encode(v)
			})
		}
	})
	return a, nil
}

func (a *whoamiApp) Close() error {
	err := a.Listener.Close()
	a.wg.Wait()
	return err
}

func readProxyHeader(r *bufio.Reader) (AppView, error) {
	h, err := proxyproto.Read(r)
	if err != nil {
		return AppView{}, err
	}
	tlvs, err := h.TLVs()
	if err != nil {
		return AppView{}, err
	}
	v := AppView{Source: h.SourceAddr.String()}
	for _, t := range tlvs {
		switch byte(t.Type) {
		case proxy.TLVSPIFFEID:
			v.PeerID = string(t.Value)
		case proxy.TLVPeerCertSHA256:
			v.CertSHA256 = string(t.Value)
		}
	}
	if ssl, ok := tlvparse.FindSSL(tlvs); ok {
		v.TLSVersion, _ = ssl.SSLVersion()
		v.Cipher, _ = ssl.SSLCipher()
	}
	return v, nil
}

// federatedCall is the partner workload calling the backend directly, as its
// own sidecar would: on the whoami listener (federated, PROXY protocol to
// the app) it is admitted; on the echo listener it is refused.
func federatedCall(ctx context.Context, m *mesh, partner *devca.CA, whoami, echo, testEndpoint string, denials *denialRecorder) (Federation, error) {
	f := Federation{Listener: whoami, PeerID: PartnerID.String()}
	src, err := m.source(ctx, partner, "partner", PartnerID)
	if err != nil {
		return f, err
	}
	partnerTLS := identity.NewTLS(src)
	// The backend's TLS test endpoint answers the trust domains its
	// inbound listeners federate with, and says which bundle verified us.
	res, err := check.Run(ctx, check.Options{Addr: testEndpoint, TLS: partnerTLS, ServerID: BackendID})
	if err != nil {
		return f, fmt.Errorf("the partner workload checking the backend's TLS test endpoint: %w", err)
	}
	f.ClientBundle = res.Connection.ClientBundle
	cfg := partnerTLS.ClientConfig(identity.Modern(), BackendID, identity.FederatesWith(BackendID.TrustDomain()))
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	c, err := d.DialContext(ctx, "tcp", whoami)
	if err != nil {
		return f, fmt.Errorf("the partner workload calling the whoami listener: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	tc := c.(*tls.Conn)
	f.ServerBundle = identity.DescribeConnection(tc.ConnectionState(), false).ServerBundle
	line, err := io.ReadAll(tc)
	if err != nil && len(line) == 0 {
		return f, fmt.Errorf("reading the whoami app's answer: %w", err)
	}
	if err := json.Unmarshal(line, &f.App); err != nil {
		return f, fmt.Errorf("the whoami app's answer %q: %w", line, err)
	}
	if f.App.PeerID != PartnerID.String() {
		return f, fmt.Errorf("the app behind the whoami listener saw peer %q, want %s", f.App.PeerID, PartnerID)
	}

	// The echo listener does not federate: refused in the handshake.
	c2, err := d.DialContext(ctx, "tcp", echo)
	if err == nil {
		_ = c2.SetDeadline(time.Now().Add(5 * time.Second))
		n, _ := c2.Read(make([]byte, 1))
		c2.Close()
		if n > 0 {
			return f, fmt.Errorf("the echo listener, which does not federate, let the partner in")
		}
	}
	f.Refused, err = denials.wait(ctx, PartnerID.String(), 5*time.Second)
	return f, err
}
