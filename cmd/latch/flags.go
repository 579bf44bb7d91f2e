package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"

	"latch.dev/latch/identity"
)

// The flags below are shared by the subcommands, so each concept has one
// name and one meaning everywhere.

// workloadAPIFlag defines --workload-api, the SPIFFE Workload API socket.
// The empty default means $SPIFFE_ENDPOINT_SOCKET, read when the socket is
// dialled (identity.NewWorkloadSource).
func workloadAPIFlag(fs *flag.FlagSet) *string {
	return fs.String("workload-api", "", "SPIFFE Workload API socket `address`, e.g. unix:///run/spire/agent.sock (default $"+identity.SocketEnv+")")
}

// logFlags defines --log-format and --log-level.
type logFlags struct{ format, level *string }

func defineLogFlags(fs *flag.FlagSet) logFlags {
	return logFlags{
		format: fs.String("log-format", "json", "log `format`: json or text"),
		level:  fs.String("log-level", "info", "log `level`: debug, info, warn or error"),
	}
}

// logger builds the daemon's logger from the flags; a bad value is a usage
// error.
func (f logFlags) logger(w io.Writer) (*slog.Logger, error) {
	log, err := newLogger(w, *f.format, *f.level)
	if err != nil {
		return nil, usageError{err}
	}
	return log, nil
}

// newLogger is the one logger constructor of every latch daemon: JSON (the
// default, for log collectors) or text, at the given level. A duration is
// written one way in both formats and by every daemon: as Go's duration
// string ("30s", "1.5ms"), which a person reads at a glance, where slog's
// JSON handler would write integer nanoseconds (30000000000).
func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lvl, ReplaceAttr: durationsAsStrings}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want json or text", format)
}

// durationsAsStrings is the loggers' ReplaceAttr: it applies to every
// attribute, those bound with With and inside groups included.
func durationsAsStrings(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}

// checkHostPort checks the host:port value of flag name before anything is
// started: a malformed address is a usage error (exit 2), where a bind or a
// connection that fails later is not. An address to dial needs a host and a
// port other than 0; one to listen on may leave the host empty (every
// address) and ask for port 0 (any free port).
func checkHostPort(name, value string, dial bool) error {
	host, port, err := net.SplitHostPort(value)
	if err != nil {
		return usagef("--%s %q: want host:port (%v)", name, value, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return usagef("--%s %q: port %q is not a number from 0 to 65535", name, value, port)
	}
	if dial && (host == "" || n == 0) {
		return usagef("--%s %q: want a host and a port other than 0 to connect to", name, value)
	}
	return nil
}
