package bench

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// The identities of every pair: the outbound sidecar is the client workload,
// the inbound sidecar the server workload.
const (
	trustDomain = "bench.test"
	clientID    = "spiffe://bench.test/client"
	serverID    = "spiffe://bench.test/server"
	// serverName is a DNS SAN the peers' server certificate carries in
	// addition to its SPIFFE ID: nginx's proxy_ssl_verify always checks a
	// host name and cannot match a URI SAN.
	serverName = "server.bench.test"
)

// PKI is the certificate material of one pair, as PEM files the peers read.
type PKI struct {
	// CAFile holds the trust bundle (the CA certificates).
	CAFile string
	// Server and Client are the two sidecars' certificates.
	Server, Client KeyPair
}

// KeyPair is one workload's certificate chain and key on disk.
type KeyPair struct {
	Cert string // certificate chain, leaf first
	Key  string // PKCS#8 private key
	// Combined holds the chain followed by the key, the single file HAProxy
	// and stunnel like.
	Combined string
}

// writePKI writes a bundle and two SVIDs (chain + key each) under dir.
func writePKI(dir string, bundle []*x509.Certificate, server, client svidFiles) (*PKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating certificate directory: %w", err)
	}
	p := &PKI{CAFile: filepath.Join(dir, "ca.pem")}
	if err := os.WriteFile(p.CAFile, certsPEM(bundle), 0o600); err != nil {
		return nil, fmt.Errorf("writing CA bundle: %w", err)
	}
	var err error
	if p.Server, err = writeKeyPair(dir, "server", server); err != nil {
		return nil, err
	}
	if p.Client, err = writeKeyPair(dir, "client", client); err != nil {
		return nil, err
	}
	return p, nil
}

// svidFiles is what writePKI needs of an SVID: its chain and key.
type svidFiles struct {
	chain []*x509.Certificate
	key   crypto.Signer
}

func writeKeyPair(dir, name string, s svidFiles) (KeyPair, error) {
	der, err := x509.MarshalPKCS8PrivateKey(s.key)
	if err != nil {
		return KeyPair{}, fmt.Errorf("encoding %s key: %w", name, err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	chainPEM := certsPEM(s.chain)
	kp := KeyPair{
		Cert:     filepath.Join(dir, name+".crt"),
		Key:      filepath.Join(dir, name+".key"),
		Combined: filepath.Join(dir, name+".pem"),
	}
	for path, data := range map[string][]byte{
		kp.Cert:     chainPEM,
		kp.Key:      keyPEM,
		kp.Combined: append(append([]byte{}, chainPEM...), keyPEM...),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return KeyPair{}, fmt.Errorf("writing %s: %w", path, err)
		}
	}
	return kp, nil
}

func certsPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// newNamedPKI makes a throwaway CA and two leaves shaped like devca's SVIDs
// (ECDSA P-256, one SPIFFE URI SAN, digitalSignature, both TLS EKUs, signed
// by the root) plus a DNS SAN for the host-name check nginx cannot turn off.
// The CA key lives only in memory and is dropped on return.
func newNamedPKI(dir string) (*PKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating bench CA key: %w", err)
	}
	now := time.Now()
	td, _ := url.Parse("spiffe://" + trustDomain)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"latch bench - NOT FOR PRODUCTION"}, CommonName: "latch bench CA"},
		URIs:                  []*url.URL{td},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("self-signing bench CA: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("parsing bench CA: %w", err)
	}
	leaf := func(serial int64, id, dns string) (svidFiles, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return svidFiles{}, fmt.Errorf("generating key for %s: %w", id, err)
		}
		u, err := url.Parse(id)
		if err != nil {
			return svidFiles{}, fmt.Errorf("parsing %s: %w", id, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(serial),
			Subject:               pkix.Name{Organization: []string{"latch bench - NOT FOR PRODUCTION"}},
			URIs:                  []*url.URL{u},
			DNSNames:              []string{dns},
			NotBefore:             now.Add(-time.Minute),
			NotAfter:              now.Add(12 * time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return svidFiles{}, fmt.Errorf("signing %s: %w", id, err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return svidFiles{}, fmt.Errorf("parsing %s: %w", id, err)
		}
		return svidFiles{chain: []*x509.Certificate{c}, key: key}, nil
	}
	server, err := leaf(2, serverID, serverName)
	if err != nil {
		return nil, err
	}
	client, err := leaf(3, clientID, "client.bench.test")
	if err != nil {
		return nil, err
	}
	return writePKI(dir, []*x509.Certificate{ca}, server, client)
}
