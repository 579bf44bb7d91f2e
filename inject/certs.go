package inject

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// CertReloader serves the webhook's certificate from a PEM certificate and key
// file pair and picks up new files without a restart: cert-manager and the
// kubelet replace Secret volume files in place (an atomic symlink swap), so
// the files are re-read at most once per Interval, from the handshake path.
// Reading two small files once in a while is cheaper and simpler than
// watching a symlinked directory, and it cannot miss an update.
type CertReloader struct {
	certPath, keyPath string
	// Interval between checks of the files; 0 means every handshake.
	interval time.Duration
	log      *slog.Logger
	now      func() time.Time

	mu        sync.Mutex
	cert      *tls.Certificate
	certPEM   []byte
	keyPEM    []byte
	checkedAt time.Time
}

// NewCertReloader loads the pair once; a pair that cannot be loaded at start
// is an error (the injector would serve nothing).
func NewCertReloader(certPath, keyPath string, interval time.Duration, log *slog.Logger) (*CertReloader, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &CertReloader{certPath: certPath, keyPath: keyPath, interval: interval, log: log, now: time.Now}
	if _, err := r.reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// GetCertificate is for tls.Config.GetCertificate.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := r.now(); now.Sub(r.checkedAt) >= r.interval {
		r.checkedAt = now
		if changed, err := r.reload(); err != nil {
			// Half-written pair (the cert replaced, the key not yet): keep
			// serving the previous one and try again at the next check.
			r.log.Warn("serving certificate not reloaded; keeping the previous one", "reason", err.Error())
		} else if changed {
			r.log.Info("serving certificate reloaded", "cert", r.certPath, "not_after", r.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		}
	}
	return r.cert, nil
}

// reload reads the files and swaps in the pair if it changed and is valid.
// Callers hold r.mu (or own r exclusively).
func (r *CertReloader) reload() (bool, error) {
	certPEM, err := os.ReadFile(r.certPath)
	if err != nil {
		return false, fmt.Errorf("reading serving certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(r.keyPath)
	if err != nil {
		return false, fmt.Errorf("reading serving key: %w", err)
	}
	if r.cert != nil && bytes.Equal(certPEM, r.certPEM) && bytes.Equal(keyPEM, r.keyPEM) {
		return false, nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return false, fmt.Errorf("loading serving certificate %s and key %s: %w", r.certPath, r.keyPath, err)
	}
	r.cert, r.certPEM, r.keyPEM = &cert, certPEM, keyPEM
	return true, nil
}
