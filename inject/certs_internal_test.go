package inject

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func selfSigned(t *testing.T, serial int64) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "x"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// The files are checked at most once per interval, and a pair that cannot
// be read keeps the previous certificate in service.
func TestCertReloaderInterval(t *testing.T) {
	dir := t.TempDir()
	cp, kp := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	put := func(serial int64) {
		c, k := selfSigned(t, serial)
		if err := os.WriteFile(cp, c, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(kp, k, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	put(1)
	r, err := NewCertReloader(cp, kp, 10*time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_000_000, 0)
	r.now = func() time.Time { return now }
	serial := func() int64 {
		t.Helper()
		c, err := r.GetCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf.SerialNumber.Int64()
	}
	if s := serial(); s != 1 {
		t.Fatalf("serial %d, want 1", s)
	}
	put(2)
	now = now.Add(5 * time.Second)
	if s := serial(); s != 1 {
		t.Errorf("reloaded within the interval: serial %d", s)
	}
	now = now.Add(10 * time.Second)
	if s := serial(); s != 2 {
		t.Errorf("not reloaded after the interval: serial %d", s)
	}
	if err := os.Remove(kp); err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Minute)
	if s := serial(); s != 2 {
		t.Errorf("missing key file: serial %d, want the previous 2", s)
	}
	if _, err := NewCertReloader(cp, kp, time.Second, nil); err == nil {
		t.Error("NewCertReloader accepted a missing key")
	}
}
