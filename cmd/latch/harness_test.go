package main

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

// echoApp serves an echo on loopback until the test ends.
func echoApp(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// newDevCA is a quiet development CA of trust domain td, closed when the
// test ends.
func newDevCA(t *testing.T, td string) *devca.CA {
	t.Helper()
	ca, err := devca.New(td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	return ca
}

// workloadSource is the Workload API source at socket, closed when the test
// ends.
func workloadSource(t *testing.T, socket string) *identity.WorkloadSource {
	t.Helper()
	src, err := identity.NewWorkloadSource(t.Context(), socket, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}
