package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// SocketEnv is the environment variable naming the Workload API socket when
// no socket is configured, by SPIFFE convention.
const SocketEnv = workloadapi.SocketEnv

// NewWorkloadSource connects to the SPIFFE Workload API at socket ("" means
// $SPIFFE_ENDPOINT_SOCKET) and waits, up to ctx's deadline, for the first
// X.509-SVID and bundle. A bare path is taken as a unix socket. The source
// follows rotations until Close; log receives the Workload API client's
// messages (nil discards them).
func NewWorkloadSource(ctx context.Context, socket string, log *slog.Logger) (*workloadapi.X509Source, error) {
	if socket == "" {
		socket = os.Getenv(SocketEnv)
	}
	if socket == "" {
		return nil, errors.New("no SPIFFE Workload API socket: pass the socket address (e.g. unix:///run/spire/agent.sock) or set " + SocketEnv)
	}
	if strings.HasPrefix(socket, "/") {
		socket = "unix://" + socket
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr(socket),
		workloadapi.WithLogger(spiffeLogger{log.With("component", "workloadapi", "socket", socket)}),
	))
	if err != nil {
		return nil, fmt.Errorf("waiting for the first X.509-SVID from the Workload API at %s: %w", socket, err)
	}
	return src, nil
}

// spiffeLogger adapts slog to go-spiffe's printf-style logger.
type spiffeLogger struct{ l *slog.Logger }

func (s spiffeLogger) Debugf(format string, args ...any) { s.l.Debug(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Infof(format string, args ...any)  { s.l.Info(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Warnf(format string, args ...any)  { s.l.Warn(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Errorf(format string, args ...any) { s.l.Error(fmt.Sprintf(format, args...)) }
