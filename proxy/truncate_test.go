package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// A TLS stream ends cleanly only with close_notify. These are the ways the
// TLS side of a connection (the peer of an inbound listener, the upstream of
// an outbound one) can end its stream after one record of data.
type tlsEnd struct {
	name string
	// end ends the stream of tc, whose TCP connection is raw.
	end func(t *testing.T, tc *tls.Conn, raw *cuttableConn)
	// clean: the other side must see the data and a clean end of stream,
	// else the data and a reset.
	clean  bool
	reason string
}

var tlsEnds = []tlsEnd{
	{"close_notify then FIN", func(t *testing.T, tc *tls.Conn, raw *cuttableConn) {
		if err := tc.CloseWrite(); err != nil {
			t.Error(err)
		}
		raw.CloseWrite()
	}, true, reasonEOF},
	// What an attacker on the path does: a FIN injected after a record.
	{"bare FIN after a record", func(t *testing.T, tc *tls.Conn, raw *cuttableConn) {
		raw.CloseWrite()
	}, false, reasonTruncated},
	// The same with the FIN inside the next record.
	{"bare FIN inside a record", func(t *testing.T, tc *tls.Conn, raw *cuttableConn) {
		raw.cut.Store(true)
		if _, err := tc.Write([]byte("never complete")); err != nil {
			t.Error(err)
		}
		raw.CloseWrite()
	}, false, reasonTruncated},
}

// cuttableConn is a TCP connection whose writes, once cut is set, send only
// the first half of what they are given (and claim to have sent it all):
// under a tls.Conn, half a record.
type cuttableConn struct {
	*net.TCPConn
	cut atomic.Bool
}

func (c *cuttableConn) Write(p []byte) (int, error) {
	if !c.cut.Load() {
		return c.TCPConn.Write(p)
	}
	if _, err := c.TCPConn.Write(p[:len(p)/2]); err != nil {
		return 0, err
	}
	return len(p), nil
}

// TestTruncatedStreamResets: a TLS stream that ends without close_notify
// reaches the plain side as a reset (ECONNRESET) and is logged as truncated,
// in both directions and both TLS versions; a stream ended with close_notify
// still reaches it as a clean end of stream.
func TestTruncatedStreamResets(t *testing.T) {
	tls12 := func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 }
	for _, v := range []struct {
		name    string
		profile identity.Profile
		tweak   func(*tls.Config)
	}{
		{"TLS 1.3", identity.Modern(), func(*tls.Config) {}},
		{"TLS 1.2", identity.Intermediate(), tls12},
	} {
		for _, e := range tlsEnds {
			t.Run("inbound/"+v.name+"/"+e.name, func(t *testing.T) {
				testTruncatedInbound(t, v.profile, v.tweak, e)
			})
			t.Run("outbound/"+v.name+"/"+e.name, func(t *testing.T) {
				testTruncatedOutbound(t, v.profile, v.tweak, e, false)
			})
		}
	}
}

// appResult is what the app behind a listener read, and how its stream
// ended.
type appResult struct {
	data string
	err  error // nil: a clean end of stream
}

// testTruncatedInbound: a peer sidecar sends one record to the inbound
// listener and ends its stream; the app must read the record and then the
// end the peer chose (a clean end only after close_notify).
func testTruncatedInbound(t *testing.T, profile identity.Profile, tweak func(*tls.Config), e tlsEnd) {
	got := make(chan appResult, 1)
	m := newMesh(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(waitFor))
		b, err := io.ReadAll(c)
		got <- appResult{string(b), err}
	}, meshOptions{profile: profile})
	mark := m.logs.mark()
	cfg := identity.NewTLS(m.ca.Source(t, frontendID)).ClientConfig(profile, mustID(t, backendID))
	tweak(cfg)
	nc, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	raw := &cuttableConn{TCPConn: nc.(*net.TCPConn)}
	raw.SetDeadline(time.Now().Add(waitFor))
	tc := tls.Client(raw, cfg)
	if _, err := tc.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	e.end(t, tc, raw)
	r := <-got
	checkEnd(t, r, "request", e)
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "direction": "inbound", "reason": e.reason, "peer_id": frontendID})
}

// testTruncatedOutbound: an upstream sends one record to the outbound
// listener and ends its stream; the app that dialed the listener must read
// the record and then the end the upstream chose. With halfClosed, the app
// has sent its request and half-closed first, and the upstream must have
// read the request and close_notify (not a bare FIN) before it answers.
func testTruncatedOutbound(t *testing.T, profile identity.Profile, tweak func(*tls.Config), e tlsEnd, halfClosed bool) {
	const request = "go"
	ca := identitytest.NewCA(t, trustDomain)
	backend := identity.NewTLS(ca.Source(t, backendID))
	scfg := backend.ServerConfig(profile, func(spiffeid.ID) error { return nil })
	tweak(scfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	served := make(chan struct{})
	go func() {
		defer close(served)
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		raw := &eofConn{cuttableConn: &cuttableConn{TCPConn: nc.(*net.TCPConn)}}
		raw.SetDeadline(time.Now().Add(waitFor))
		tc := tls.Server(raw, scfg)
		if halfClosed {
			b, err := io.ReadAll(tc)
			if string(b) != request || err != nil || raw.eof.Load() {
				t.Errorf("the upstream read %q, %v (TCP stream ended before close_notify: %v), want the request and close_notify", b, err, raw.eof.Load())
				return
			}
		} else if _, err := io.ReadFull(tc, make([]byte, len(request))); err != nil {
			t.Error(err)
			return
		}
		if _, err := tc.Write([]byte("response")); err != nil {
			t.Error(err)
			return
		}
		e.end(t, tc, raw.cuttableConn)
		// Read until latch ends its side (with a reset after a
		// truncation), so that nothing here closes first.
		io.Copy(io.Discard, raw)
	}()
	t.Cleanup(func() { <-served })

	logs := newLogs()
	s := startServer(t, identity.NewTLS(ca.Source(t, frontendID)), &Config{TLS: profile, Outbound: []Outbound{{
		Name: "backend", Listen: "127.0.0.1:0", Upstreams: []string{ln.Addr().String()}, ServerID: mustID(t, backendID),
	}}}, Options{Logger: logs.logger()})
	c, err := net.Dial("tcp", addrOf(t, s, "backend"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	// The upstream answers this: a reset that came before Dial returned
	// would fail the Dial instead of the read.
	if _, err := c.Write([]byte(request)); err != nil {
		t.Fatal(err)
	}
	if halfClosed {
		c.(*net.TCPConn).CloseWrite()
	}
	b, err := io.ReadAll(c)
	checkEnd(t, appResult{string(b), err}, "response", e)
	c.Close()
	logs.wait(t, 0, "connection closed", map[string]string{"listener": "backend", "direction": "outbound", "reason": e.reason, "peer_id": backendID})
}

// checkEnd checks what the plain side read: all of want, then a clean end
// or a reset as e says.
func checkEnd(t *testing.T, r appResult, want string, e tlsEnd) {
	t.Helper()
	if r.data != want {
		t.Errorf("read %q before the end, want %q", r.data, want)
	}
	if e.clean && r.err != nil {
		t.Errorf("the stream ended with %v, want a clean end of stream", r.err)
	}
	if !e.clean && !errors.Is(r.err, syscall.ECONNRESET) {
		t.Errorf("the stream ended with %v, want ECONNRESET: a truncated stream passed on as complete", r.err)
	}
}

// TestTruncatedByOpenSSLPeer: the same with OpenSSL's s_client as the peer
// of an inbound listener, ending its stream the two ways a real client
// does: at the end of its input (it sends close_notify) and by dying (its
// kernel sends a FIN, and no close_notify).
func TestTruncatedByOpenSSLPeer(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl is not installed")
	}
	for _, tc := range []struct {
		name   string
		end    func(cmd *exec.Cmd, stdin io.WriteCloser)
		clean  bool
		reason string
	}{
		{"end of input", func(_ *exec.Cmd, stdin io.WriteCloser) { stdin.Close() }, true, reasonEOF},
		{"killed", func(cmd *exec.Cmd, _ io.WriteCloser) { cmd.Process.Kill() }, false, reasonTruncated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const request = "request\n"
			arrived := make(chan struct{})
			got := make(chan appResult, 1)
			m := newMesh(t, func(c net.Conn) {
				c.SetDeadline(time.Now().Add(waitFor))
				first := make([]byte, len(request))
				if _, err := io.ReadFull(c, first); err != nil {
					got <- appResult{string(first), err}
					return
				}
				close(arrived)
				rest, err := io.ReadAll(c)
				got <- appResult{string(first) + string(rest), err}
			}, meshOptions{})
			dir := t.TempDir()
			certs, key, err := m.ca.SVID(t, frontendID).Marshal()
			if err != nil {
				t.Fatal(err)
			}
			bundle, err := m.ca.Bundle().Marshal()
			if err != nil {
				t.Fatal(err)
			}
			for name, b := range map[string][]byte{"cert.pem": certs, "key.pem": key, "ca.pem": bundle} {
				if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			mark := m.logs.mark()
			cmd := exec.Command(openssl, "s_client", "-connect", addrOf(t, m.inbound, "web"),
				"-cert", filepath.Join(dir, "cert.pem"), "-key", filepath.Join(dir, "key.pem"),
				"-CAfile", filepath.Join(dir, "ca.pem"), "-verify_return_error", "-no_ign_eof", "-nocommands")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			out := newLineWatcher()
			cmd.Stdout, cmd.Stderr = out, io.Discard
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			// Once s_client has read the session ticket latch sends after
			// the handshake, nothing is left unread on its socket, and
			// its kernel ends the connection with a FIN, not a reset.
			out.wait(t, "New Session Ticket arrived")
			io.WriteString(stdin, request)
			select {
			case <-arrived:
			case r := <-got:
				t.Fatalf("the app got %q, %v", r.data, r.err)
			}
			tc.end(cmd, stdin)
			checkEnd(t, <-got, request, tlsEnd{clean: tc.clean})
			m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "reason": tc.reason, "peer_id": frontendID})
		})
	}
}

// lineWatcher is an io.Writer for a child's output that lets a test wait for
// a line containing some text.
type lineWatcher struct {
	mu      sync.Mutex
	text    strings.Builder
	changed chan struct{}
}

func newLineWatcher() *lineWatcher { return &lineWatcher{changed: make(chan struct{})} }

func (w *lineWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.text.Write(p)
	close(w.changed)
	w.changed = make(chan struct{})
	return len(p), nil
}

func (w *lineWatcher) wait(t *testing.T, want string) {
	t.Helper()
	deadline := time.NewTimer(waitFor)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		found, ch, all := strings.Contains(w.text.String(), want), w.changed, w.text.String()
		w.mu.Unlock()
		if found {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("no %q in the output:\n%s", want, all)
		}
	}
}

// eofConn notes whether its TCP stream ended (a read returned io.EOF): a
// tls.Conn over it that returns io.EOF without it having been set read a
// close_notify.
type eofConn struct {
	*cuttableConn
	eof atomic.Bool
}

func (c *eofConn) Read(p []byte) (int, error) {
	n, err := c.cuttableConn.Read(p)
	if err == io.EOF {
		c.eof.Store(true)
	}
	return n, err
}

// TestTruncatedAfterHalfClose: the plain side ends its stream first (a
// clean half-close, which latch passes on as close_notify and FIN: the TLS
// side reads a close_notify, not a bare FIN), and the TLS side, which goes
// on sending, ends its stream afterwards each of the ways: only after
// close_notify does the plain side see a clean end. Both directions, both
// TLS versions.
func TestTruncatedAfterHalfClose(t *testing.T) {
	tls12 := func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 }
	for _, v := range []struct {
		name    string
		profile identity.Profile
		tweak   func(*tls.Config)
	}{
		{"TLS 1.3", identity.Modern(), func(*tls.Config) {}},
		{"TLS 1.2", identity.Intermediate(), tls12},
	} {
		for _, e := range tlsEnds {
			t.Run("inbound/"+v.name+"/"+e.name, func(t *testing.T) {
				got := make(chan appResult, 1)
				m := newMesh(t, func(c net.Conn) {
					c.SetDeadline(time.Now().Add(waitFor))
					first := make([]byte, len("request"))
					if _, err := io.ReadFull(c, first); err != nil {
						got <- appResult{string(first), err}
						return
					}
					// The app answers and says it is done.
					io.WriteString(c, "response")
					c.(interface{ CloseWrite() error }).CloseWrite()
					rest, err := io.ReadAll(c)
					got <- appResult{string(first) + string(rest), err}
				}, meshOptions{profile: v.profile})
				mark := m.logs.mark()
				cfg := identity.NewTLS(m.ca.Source(t, frontendID)).ClientConfig(v.profile, mustID(t, backendID))
				v.tweak(cfg)
				nc, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { nc.Close() })
				raw := &eofConn{cuttableConn: &cuttableConn{TCPConn: nc.(*net.TCPConn)}}
				raw.SetDeadline(time.Now().Add(waitFor))
				tc := tls.Client(raw, cfg)
				if _, err := tc.Write([]byte("request")); err != nil {
					t.Fatal(err)
				}
				b, err := io.ReadAll(tc)
				if string(b) != "response" || err != nil || raw.eof.Load() {
					t.Fatalf("the peer read %q, %v (TCP stream ended before close_notify: %v), want the response and close_notify", b, err, raw.eof.Load())
				}
				if _, err := tc.Write([]byte(" and more")); err != nil {
					t.Fatal(err)
				}
				e.end(t, tc, raw.cuttableConn)
				checkEnd(t, <-got, "request and more", e)
				m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "direction": "inbound", "reason": e.reason})
			})
			t.Run("outbound/"+v.name+"/"+e.name, func(t *testing.T) {
				testTruncatedOutbound(t, v.profile, v.tweak, e, true)
			})
		}
	}
}
