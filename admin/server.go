package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultAddr is where the admin server listens unless told otherwise:
// loopback only, because /status and pprof say more than a peer should know.
const DefaultAddr = "127.0.0.1:15000"

// Options configure a Server. The zero value serves on DefaultAddr, is always
// ready, has an empty /status and exposes the default Prometheus registry.
type Options struct {
	// Addr is the host:port to listen on; "" means DefaultAddr.
	Addr string
	// Ready reports why the daemon is not ready yet (nil: ready). /readyz
	// answers 200 only when it returns nil, and otherwise 503 with the
	// error's text, which should say what is missing (see Readiness).
	Ready func() error
	// Status returns the value /status serves as JSON. It is called per
	// request and must be safe for concurrent use.
	Status func() any
	// Gatherer is what /metrics exposes; nil means prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// EnablePprof mounts net/http/pprof under /debug/pprof/. Off by default:
	// profiles can leak memory contents and cost CPU.
	EnablePprof bool
	// Logger receives the server's own errors; nil means slog.Default().
	Logger *slog.Logger
}

// Server is the admin HTTP server. It binds its listener in New, so a port
// conflict is reported at start-up and Addr is known before Serve.
type Server struct {
	opts Options
	ln   net.Listener
	srv  *http.Server
	log  *slog.Logger
}

// New binds the admin listener and builds the handler. Serve starts serving.
func New(opts Options) (*Server, error) {
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	if opts.Gatherer == nil {
		opts.Gatherer = prometheus.DefaultGatherer
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", opts.Addr, err)
	}
	s := &Server{opts: opts, ln: ln, log: log}
	s.srv = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// Addr is the bound address (useful when Options.Addr had port 0).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve serves until ctx is done, then shuts down, giving in-flight requests
// up to five seconds. It returns nil after a shutdown caused by ctx.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	s.log.Info("admin server listening", "addr", s.ln.Addr().String(), "pprof", s.opts.EnablePprof)
	select {
	case err := <-errc:
		return fmt.Errorf("admin: serve on %s: %w", s.ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(sctx)
	<-errc // Serve has returned http.ErrServerClosed
	if err != nil {
		return fmt.Errorf("admin: shutdown: %w", err)
	}
	return nil
}

// Handler returns the admin mux; Serve uses it, and tests or an embedding
// daemon may mount it elsewhere.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		ErrorHandling: promhttp.ContinueOnError,
	}))
	mux.HandleFunc("GET /status", s.status)
	if s.opts.EnablePprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

func (s *Server) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	var err error
	if s.opts.Ready != nil {
		err = s.opts.Ready()
	}
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "not ready:\n%s\n", err)
		return
	}
	fmt.Fprintln(w, "ready")
}

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	var v any = struct{}{}
	if s.opts.Status != nil {
		v = s.opts.Status()
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		s.log.Error("admin: encode /status", "reason", err.Error())
		http.Error(w, "encode status: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(append(b, '\n'))
}

// ReadyCheck is one named condition of readiness, such as "svid" or
// "policy". Check returns nil when the condition holds, or what is missing.
type ReadyCheck struct {
	Name  string
	Check func() error
}

// Readiness combines checks into an Options.Ready function. Every check runs
// on every probe (they must be cheap: no dialling), and the error names each
// one that failed, one per line, so /readyz says everything that is missing.
func Readiness(checks ...ReadyCheck) func() error {
	checks = append([]ReadyCheck(nil), checks...)
	return func() error {
		var errs []error
		for _, c := range checks {
			if err := c.Check(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.Name, err))
			}
		}
		return errors.Join(errs...)
	}
}

// Flag is a settable readiness condition for things that happen once, such
// as "first policy applied" or "listeners bound". The zero Flag is unset.
type Flag struct {
	mu     sync.Mutex
	set    bool
	reason string
}

// Set marks the condition as met.
func (f *Flag) Set() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = true
}

// Unset marks the condition as not met, with reason saying why.
func (f *Flag) Unset(reason string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set, f.reason = false, reason
}

// Check returns nil when the flag is set, and otherwise an error with the
// last reason given (or "not yet").
func (f *Flag) Check() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.set {
		return nil
	}
	if strings.TrimSpace(f.reason) == "" {
		return errors.New("not yet")
	}
	return errors.New(f.reason)
}
