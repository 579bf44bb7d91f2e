package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
)

// TestInjectCommand runs `latch inject` as main wires it, with the files the
// chart mounts, and drives one admission review through it over HTTPS.
func TestInjectCommand(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM, pool := injectTestCert(t)
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg := write("config.yaml", []byte("image: latch:test\ncontrolPlane: {address: 'cp.latch.svc:18000', serverID: 'spiffe://mesh.test/ns/latch/sa/cp'}\n"))
	crt, key := write("tls.crt", certPEM), write("tls.key", keyPEM)

	// The listen address is only known once bound: read it from the
	// start-up log line.
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runInject(ctx, []string{"--config", cfg, "--tls-cert", crt, "--tls-key", key, "--listen", "127.0.0.1:0"}, io.Discard, pw)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("latch inject returned %v after cancel, want nil", err)
		}
	})
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			var line struct {
				Msg    string `json:"msg"`
				Listen string `json:"listen"`
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "injector serving" {
				addrc <- line.Listen
			}
		}
		close(addrc)
	}()
	addr, ok := <-addrc
	if !ok {
		t.Fatal("latch inject exited without serving")
	}

	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "latch-injector.latch.svc"}}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	review := `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1",
		"kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
		"namespace":"shop","operation":"CREATE","userInfo":{},
		"object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"app","image":"app"}]}}}}`
	resp, err := client.Post("https://"+addr+"/inject/namespace", "application/json", strings.NewReader(review))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out admissionv1.AdmissionReview
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	if out.Response == nil || !out.Response.Allowed || out.Response.UID != "u1" || !bytes.Contains(out.Response.Patch, []byte("--xds-address=cp.latch.svc:18000")) {
		t.Fatalf("response %+v, want an allowed patch adding a control-plane sidecar", out.Response)
	}
}

func TestInjectCommandRefusesBadSetup(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM, _ := injectTestCert(t)
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", "image: latch:test\n")
	crt, key := write("tls.crt", string(certPEM)), write("tls.key", string(keyPEM))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing config", []string{"--config", filepath.Join(dir, "none.yaml"), "--tls-cert", crt, "--tls-key", key}, "reading injector config"},
		{"config typo", []string{"--config", write("typo.yaml", "image: x\nimag: y\n"), "--tls-cert", crt, "--tls-key", key}, "imag"},
		{"no image", []string{"--config", write("empty.yaml", "adminPort: 15000\n"), "--tls-cert", crt, "--tls-key", key}, "image: required"},
		{"key does not match", []string{"--config", good, "--tls-cert", crt, "--tls-key", write("other.key", string(injectOtherKey(t)))}, "loading serving certificate"},
		{"weak profile", []string{"--config", good, "--tls-cert", crt, "--tls-key", key, "--tls-profile", "old"}, "--tls-profile"},
		{"bad log level", []string{"--config", good, "--tls-cert", crt, "--tls-key", key, "--log-level", "loud"}, "--log-level"},
		{"zero reload", []string{"--config", good, "--tls-cert", crt, "--tls-key", key, "--cert-reload-interval", "0s"}, "--cert-reload-interval"},
		{"stray argument", []string{"--config", good, "extra"}, "unexpected argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // nothing may start serving anyway
			err := runInject(ctx, append(tt.args, "--listen", "127.0.0.1:0"), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func injectTestCert(t *testing.T) (certPEM, keyPEM []byte, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		Subject:               pkix.Name{CommonName: "latch-injector.latch.svc"},
		DNSNames:              []string{"latch-injector.latch.svc"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	kder, _ := x509.MarshalECPrivateKey(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), pool
}

func injectOtherKey(t *testing.T) []byte {
	t.Helper()
	_, k, _ := injectTestCert(t)
	return k
}
