package inject_test

import (
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
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"

	"latch.dev/latch/identity"
	"latch.dev/latch/inject"
)

// testCA issues serving certificates for the webhook.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "latch injector test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue returns PEM cert and key for the injector's Service name and loopback.
func (ca *testCA) issue(t testing.TB, serial int64) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "latch-injector.latch.svc"},
		DNSNames:     []string{"latch-injector.latch.svc"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// writeAtomic replaces path the way the kubelet updates a Secret volume: the
// new content appears at once, never half-written.
func writeAtomic(t testing.TB, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// testServer is the real injector HTTPS server on loopback.
type testServer struct {
	url      string
	client   *http.Client
	certPath string
	keyPath  string
	ca       *testCA
}

func startServer(t testing.TB, cfg inject.Config) *testServer {
	t.Helper()
	ca := newTestCA(t)
	dir := t.TempDir()
	ts := &testServer{ca: ca, certPath: filepath.Join(dir, "tls.crt"), keyPath: filepath.Join(dir, "tls.key")}
	c, k := ca.issue(t, 100)
	writeAtomic(t, ts.certPath, c)
	writeAtomic(t, ts.keyPath, k)

	wh, err := inject.NewWebhook(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Interval 0: every handshake re-checks the files, so the reload test
	// needs no waiting.
	certs, err := inject.NewCertReloader(ts.certPath, ts.keyPath, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inject.Serve(ctx, inject.NewServer(wh, certs, identity.Modern(), nil), ln) }()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool, MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true}
	ts.client = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	ts.url = "https://" + ln.Addr().String()
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve returned %v after cancel, want nil", err)
		}
	})
	return ts
}

// review posts an AdmissionReview and decodes the answer.
func (ts *testServer) review(t testing.TB, path string, body []byte) admissionv1.AdmissionReview {
	t.Helper()
	resp, err := ts.client.Post(ts.url+path, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %s: %s", path, resp.Status, b)
	}
	var out admissionv1.AdmissionReview
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("decoding response: %v\n%s", err, b)
	}
	if out.APIVersion != "admission.k8s.io/v1" || out.Kind != "AdmissionReview" || out.Response == nil {
		t.Fatalf("response is not an AdmissionReview v1 with a response: %s", b)
	}
	return out
}

// readReview loads a fixture.
func readReview(t testing.TB, name string) admissionv1.AdmissionReview {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	var r admissionv1.AdmissionReview
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return r
}

// podReview wraps pod in the fixture's request.
func podReview(t testing.TB, pod *corev1.Pod) []byte {
	t.Helper()
	r := readReview(t, "review-pod.json")
	raw, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	r.Request.Object.Raw = raw
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fixturePod is the pod of review-pod.json.
func fixturePod(t testing.TB) *corev1.Pod {
	t.Helper()
	r := readReview(t, "review-pod.json")
	var pod corev1.Pod
	if err := json.Unmarshal(r.Request.Object.Raw, &pod); err != nil {
		t.Fatal(err)
	}
	return &pod
}

// applyPatch applies the response's JSON patch to pod with an independent
// RFC 6902 implementation and decodes the result strictly: a field the
// Pod type does not know fails the test.
func applyPatch(t testing.TB, pod *corev1.Pod, resp *admissionv1.AdmissionResponse) *corev1.Pod {
	t.Helper()
	if resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
		t.Fatalf("patchType = %v, want JSONPatch", resp.PatchType)
	}
	p, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatalf("decoding patch: %v\n%s", err, resp.Patch)
	}
	orig, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	out, err := p.Apply(orig)
	if err != nil {
		t.Fatalf("applying patch: %v\n%s", err, resp.Patch)
	}
	var got corev1.Pod
	dec := json.NewDecoder(bytes.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("patched pod does not decode as a Pod: %v\n%s", err, out)
	}
	return &got
}

func pemDER(t testing.TB, b []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("no PEM block")
	}
	return blk.Bytes
}
