package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
)

// goMTLS is the baseline for what a pair adds over the crypto it must do:
// the load client speaks mTLS to the backend itself, with Go's crypto/tls,
// the same certificates, TLS 1.3, the same key exchange groups as latch's
// modern profile, and the SPIFFE ID checked both ways. It is one TLS hop,
// the same encryption and decryption per byte a pair does, without the two
// plain hops and the two proxy processes. Its CPU time is spent in the
// harness process and is not reported.
type goMTLS struct{}

func (goMTLS) Name() string { return "go-mtls" }
func (goMTLS) Check() error { return nil }

func (goMTLS) Start(ctx context.Context, env *Env) (*Pair, error) {
	if env.PKI == nil {
		return nil, errNoPKI
	}
	server, client, err := goMTLSConfigs(env.PKI)
	if err != nil {
		return nil, err
	}
	if env.Resumption {
		client.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	b, err := newBackend("127.0.0.1:0", server)
	if err != nil {
		return nil, err
	}
	p := &Pair{Entry: b.Addr(), Version: runtime.Version(), dial: tlsDial(b.Addr(), client), closers: []func(){func() { b.Close() }}}
	if err := waitReady(ctx, p); err != nil {
		p.Stop()
		return nil, fmt.Errorf("go-mtls: %w", err)
	}
	return p, nil
}

// modernCurves are latch's modern profile's key exchange groups, in its
// order (identity.Modern).
var modernCurves = []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256}

// goMTLSConfigs builds both ends of the baseline from the pair's
// certificate files: each verifies the other's chain against the CA file
// and checks its SPIFFE ID, as a latch sidecar does.
func goMTLSConfigs(pki *PKI) (server, client *tls.Config, err error) {
	pem, err := os.ReadFile(pki.CAFile)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", pki.CAFile, err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, nil, fmt.Errorf("%s holds no certificate", pki.CAFile)
	}
	serverCert, err := tls.LoadX509KeyPair(pki.Server.Cert, pki.Server.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the server certificate: %w", err)
	}
	clientCert, err := tls.LoadX509KeyPair(pki.Client.Cert, pki.Client.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the client certificate: %w", err)
	}
	verify := func(want string, usage x509.ExtKeyUsage) func(tls.ConnectionState) error {
		return func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no peer certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				return err
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
				return fmt.Errorf("peer is %v, want %s", leaf.URIs, want)
			}
			return nil
		}
	}
	server = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: slices.Clone(modernCurves),
		Certificates:     []tls.Certificate{serverCert},
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: verify(clientID, x509.ExtKeyUsageClientAuth),
	}
	client = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: slices.Clone(modernCurves),
		Certificates:     []tls.Certificate{clientCert},
		// Go's own checks would want a host name; VerifyConnection does
		// the chain and the SPIFFE ID instead, as latch does.
		InsecureSkipVerify: true,
		VerifyConnection:   verify(serverID, x509.ExtKeyUsageServerAuth),
	}
	return server, client, nil
}
