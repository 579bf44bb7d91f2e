package server

import (
	"crypto/tls"

	"google.golang.org/grpc"
)

// GRPCServerOptions are the options NewGRPCServer gives gRPC, for the floor
// benchmark: it measures bare gRPC and go-control-plane under exactly the
// control plane's transport (handshake admission, limits, windows, buffers,
// keepalive).
func (s *Server) GRPCServerOptions(tlsConfig *tls.Config) []grpc.ServerOption {
	return s.serverOptions(tlsConfig)
}
