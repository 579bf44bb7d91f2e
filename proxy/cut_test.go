package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// TestCutResets: a connection that latch cuts in the middle of a stream — a
// policy change revokes the peer or the server, a drain runs out of time —
// must reach both ends as a reset, never as a clean end of a truncated
// stream. Each cut is tried with the stream flowing either way, and the
// reset is checked at the end that is only reading: on Linux a reset is
// reported to one system call only, so an end that also writes could have
// its write take the ECONNRESET and its read see 0 bytes (that is the
// kernel, not the proxy).
func TestCutResets(t *testing.T) {
	cuts := []struct {
		name   string
		reason string
		mo     meshOptions
		cut    func(t *testing.T, m *mesh)
	}{
		{"policy revoked", reasonPolicyRevoked, meshOptions{}, func(t *testing.T, m *mesh) {
			next := *m.inCfg
			next.Version = "in-2"
			next.Inbound = []Inbound{next.Inbound[0]}
			next.Inbound[0].Allow = allowIDs(t, otherID)
			if err := m.inbound.Apply(&next); err != nil {
				t.Fatal(err)
			}
		}},
		{"server id changed", reasonServerIDChanged, meshOptions{}, func(t *testing.T, m *mesh) {
			next := *m.outbound.Current()
			next.Version = "out-2"
			next.Outbound = []Outbound{next.Outbound[0]}
			next.Outbound[0].ServerID = mustID(t, otherID)
			if err := m.outbound.Apply(&next); err != nil {
				t.Fatal(err)
			}
		}},
		{"shutdown deadline", reasonDrain, meshOptions{}, func(t *testing.T, m *mesh) {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			if err := m.inbound.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Shutdown: %v, want DeadlineExceeded", err)
			}
		}},
		{"drain timeout", reasonDrain, meshOptions{drainTimeout: 50 * time.Millisecond}, func(t *testing.T, m *mesh) {
			if err := m.inbound.Apply(&Config{Version: "empty"}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	chunk := make([]byte, 16<<10)
	for _, cut := range cuts {
		// upload: the client streams, the app only reads; the app must
		// see ECONNRESET.
		t.Run(cut.name+"/upload", func(t *testing.T) {
			appErr := make(chan error, 1)
			appRead := make(chan struct{})
			m := newMesh(t, func(c net.Conn) {
				c.SetDeadline(time.Now().Add(waitFor))
				if _, err := io.ReadFull(c, make([]byte, 64<<10)); err != nil {
					appErr <- err
					return
				}
				close(appRead)
				_, err := io.Copy(io.Discard, c)
				appErr <- err
			}, cut.mo)
			mark := m.logs.mark()
			c := m.dial(t)
			c.SetDeadline(time.Now().Add(waitFor))
			go func() {
				for {
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			}()
			select {
			case <-appRead:
			case err := <-appErr:
				t.Fatalf("app before the cut: %v", err)
			}
			cut.cut(t, m)
			if err := <-appErr; !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("app read after the cut: %v, want ECONNRESET", err)
			}
			m.logs.wait(t, mark, "connection closed", map[string]string{"reason": cut.reason})
		})
		// download: the app streams, the client only reads; the client
		// must see ECONNRESET.
		t.Run(cut.name+"/download", func(t *testing.T) {
			m := newMesh(t, func(c net.Conn) {
				c.SetDeadline(time.Now().Add(waitFor))
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					return
				}
				for {
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			}, cut.mo)
			mark := m.logs.mark()
			c := m.dial(t)
			c.SetDeadline(time.Now().Add(waitFor))
			if _, err := c.Write([]byte{1}); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 64<<10)); err != nil {
				t.Fatalf("client before the cut: %v", err)
			}
			cut.cut(t, m)
			if err := expectClosed(t, c); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("client read after the cut: %v, want ECONNRESET", err)
			}
			m.logs.wait(t, mark, "connection closed", map[string]string{"reason": cut.reason})
		})
	}
}

// TestIdleTimeoutCloses: the idle timeout is a normal end (nothing was in
// flight), passed on as a clean end of stream, not a reset.
func TestIdleTimeoutCloses(t *testing.T) {
	m := newMesh(t, echo, meshOptions{inbound: func(in *Inbound) { in.IdleTimeout = 100 * time.Millisecond }})
	mark := m.logs.mark()
	c := m.dial(t)
	if err := roundTrip(c, "once"); err != nil {
		t.Fatal(err)
	}
	if err := expectClosed(t, c); err != io.EOF {
		t.Errorf("read after the idle timeout: %v, want a clean EOF", err)
	}
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "reason": reasonIdleTimeout})
}

// TestWasReset: an end of stream read from a socket is told apart from a
// reset whose ECONNRESET a write on the same socket already took (Linux
// reports it to one system call only), also after the proxy half-closed.
func TestWasReset(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("only Linux can tell")
	}
	cases := []struct {
		name string
		// end ends the stream from the peer's side; ours is the proxy's
		// socket and s its side.
		end  func(t *testing.T, ours, peer *net.TCPConn, s *side)
		want bool
	}{
		{"peer FIN", func(t *testing.T, ours, peer *net.TCPConn, s *side) {
			peer.CloseWrite()
		}, false},
		{"half-closed, then peer FIN", func(t *testing.T, ours, peer *net.TCPConn, s *side) {
			s.shut.Store(true)
			ours.CloseWrite()
			io.Copy(io.Discard, peer)
			peer.CloseWrite()
		}, false},
		{"peer reset, error taken by a write", func(t *testing.T, ours, peer *net.TCPConn, s *side) {
			peer.SetLinger(0)
			peer.Close()
			// Write until the reset has arrived and a write took it.
			deadline := time.Now().Add(waitFor)
			for {
				if _, err := ours.Write([]byte("x")); err != nil {
					return
				}
				if time.Now().After(deadline) {
					t.Fatal("writes never failed after the peer's reset")
				}
				time.Sleep(time.Millisecond)
			}
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ours, peer := tcpPair(t)
			s := &side{rw: ours, raw: ours}
			tc.end(t, ours, peer, s)
			ours.SetReadDeadline(time.Now().Add(waitFor))
			if n, err := ours.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Fatalf("read after the end: %d, %v; want 0, EOF (the error must have been taken)", n, err)
			}
			if got := wasReset(s); got != tc.want {
				t.Errorf("wasReset = %v, want %v", got, tc.want)
			}
		})
	}
}
