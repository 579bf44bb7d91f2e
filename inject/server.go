package inject

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"latch.dev/latch/identity"
)

// Server timeouts. The API server gives a webhook at most 30 s (10 s by
// default) per call, so anything slower is a stuck or hostile client.
const (
	ReadHeaderTimeout = 5 * time.Second
	ReadTimeout       = 10 * time.Second
	WriteTimeout      = 10 * time.Second
	IdleTimeout       = 90 * time.Second
	ShutdownTimeout   = 10 * time.Second
)

// NewServer returns the HTTPS server for h with the injector's timeouts and
// limits, serving the certificate from certs under the TLS profile p.
func NewServer(h http.Handler, certs *CertReloader, p identity.Profile, log *slog.Logger) *http.Server {
	tc := &tls.Config{GetCertificate: certs.GetCertificate, NextProtos: []string{"h2", "http/1.1"}}
	p.Apply(tc)
	var errLog *slog.Logger
	if log != nil {
		errLog = log
	} else {
		errLog = slog.New(slog.DiscardHandler)
	}
	return &http.Server{
		Handler:           h,
		TLSConfig:         tc,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(errLog.Handler(), slog.LevelDebug),
	}
}

// Serve runs srv on ln until ctx is done, then shuts it down gracefully
// (in-flight reviews finish, up to ShutdownTimeout).
func Serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving webhook: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("shutting down webhook: %w", err)
	}
	return nil
}
