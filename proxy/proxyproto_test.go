package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// parsedHeader is what an app that reads the PROXY protocol with
// go-proxyproto learns from latch's header.
type parsedHeader struct {
	hdr  *proxyproto.Header
	tlvs map[proxyproto.PP2Type][]byte
	ssl  tlvparse.PP2SSL
	data []byte // what followed the header, up to the peer's end of stream
	err  error
}

// proxyProtocolApp parses a PROXY protocol header with go-proxyproto, then
// echoes what follows it and reports the header and the data.
func proxyProtocolApp(got chan<- parsedHeader) func(net.Conn) {
	return func(c net.Conn) {
		br := bufio.NewReader(c)
		var p parsedHeader
		defer func() { got <- p }()
		c.SetReadDeadline(time.Now().Add(waitFor))
		if p.hdr, p.err = proxyproto.Read(br); p.err != nil {
			return
		}
		tlvs, err := p.hdr.TLVs()
		if err != nil {
			p.err = err
			return
		}
		p.tlvs = make(map[proxyproto.PP2Type][]byte)
		for _, tlv := range tlvs {
			p.tlvs[tlv.Type] = tlv.Value
		}
		ssl, ok := tlvparse.FindSSL(tlvs)
		if !ok {
			p.err = fmt.Errorf("no PP2_TYPE_SSL in %v", tlvs)
			return
		}
		p.ssl = ssl
		buf := make([]byte, 64)
		for {
			n, err := br.Read(buf)
			p.data = append(p.data, buf[:n]...)
			if _, werr := c.Write(buf[:n]); werr != nil || err != nil {
				return
			}
		}
	}
}

// TestProxyProtocolHeaderReachesApp: an app that parses the header with
// go-proxyproto learns the peer's address, the address it connected to, its
// SPIFFE ID, its leaf certificate's SHA-256, and the TLS version, cipher
// suite and group; the peer's bytes follow the header untouched. A resumed
// session says so (the certificate came with the session, not this
// connection) and carries the same identity.
func TestProxyProtocolHeaderReachesApp(t *testing.T) {
	got := make(chan parsedHeader, 2)
	ca := identitytest.NewCA(t, trustDomain)
	feSrc := ca.Source(t, frontendID)
	m := newMeshWith(t, proxyProtocolApp(got), meshOptions{inbound: func(in *Inbound) { in.ProxyProtocol = true }},
		identity.NewTLS(ca.Source(t, backendID)), identity.NewTLS(feSrc), ca)
	svid, err := feSrc.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(svid.Certificates[0].Raw)
	wantFP := hex.EncodeToString(sum[:])
	client := identity.NewTLS(feSrc).ClientConfig(identity.Modern(), mustID(t, backendID))

	for _, resumed := range []bool{false, true} {
		t.Run(fmt.Sprintf("resumed=%v", resumed), func(t *testing.T) {
			tc, err := m.dialInbound(t, client)
			if err != nil {
				t.Fatal(err)
			}
			cs := tc.ConnectionState()
			if cs.DidResume != resumed {
				t.Fatalf("DidResume %v, want %v", cs.DidResume, resumed)
			}
			const msg = "GET / after the header\n"
			if err := roundTrip(tc, msg); err != nil {
				t.Fatal(err)
			}
			tc.CloseWrite()
			p := <-got
			if p.err != nil {
				t.Fatalf("app could not parse the header: %v", p.err)
			}
			h := p.hdr
			if h.Version != 2 || h.Command != proxyproto.PROXY || h.TransportProtocol != proxyproto.TCPv4 {
				t.Errorf("header version %d, command %v, family %v", h.Version, h.Command, h.TransportProtocol)
			}
			if h.SourceAddr.String() != tc.LocalAddr().String() {
				t.Errorf("source %v, want the peer's address %v", h.SourceAddr, tc.LocalAddr())
			}
			if h.DestinationAddr.String() != tc.RemoteAddr().String() {
				t.Errorf("destination %v, want the listener's address %v", h.DestinationAddr, tc.RemoteAddr())
			}
			if id := string(p.tlvs[proxyproto.PP2Type(TLVSPIFFEID)]); id != frontendID {
				t.Errorf("SPIFFE ID TLV %q, want %q", id, frontendID)
			}
			if fp := string(p.tlvs[proxyproto.PP2Type(TLVPeerCertSHA256)]); fp != wantFP {
				t.Errorf("certificate SHA-256 TLV %q, want %q", fp, wantFP)
			}
			if v, _ := p.ssl.SSLVersion(); v != "TLSv1.3" {
				t.Errorf("SSL version %q", v)
			}
			if c, _ := p.ssl.SSLCipher(); c != tls.CipherSuiteName(cs.CipherSuite) {
				t.Errorf("SSL cipher %q, want %q", c, tls.CipherSuiteName(cs.CipherSuite))
			}
			if g, _ := p.ssl.SSLGroup(); g != identity.GroupName(cs.CurveID) {
				t.Errorf("SSL group %q, want %q", g, identity.GroupName(cs.CurveID))
			}
			if !p.ssl.ClientSSL() || !p.ssl.Verified() || !p.ssl.ClientCertSess() || p.ssl.ClientCertConn() == resumed {
				t.Errorf("SSL client bits %#x verify %d (resumed %v)", p.ssl.Client, p.ssl.Verify, resumed)
			}
			if string(p.data) != msg {
				t.Errorf("app read %q after the header, want %q", p.data, msg)
			}
		})
	}
}

// TestProxyProtocolOnlyWhereAsked: the header goes to the app of a
// listener that asks for it and to no other, including after a policy
// change moves the setting from one listener to the other; each app sees
// exactly what it asked for.
func TestProxyProtocolOnlyWhereAsked(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	type first struct {
		app  string
		data []byte
	}
	got := make(chan first, 4)
	record := func(name string) func(net.Conn) {
		return func(c net.Conn) {
			c.SetReadDeadline(time.Now().Add(waitFor))
			b, _ := io.ReadAll(c)
			got <- first{name, b}
		}
	}
	plainApp, ppApp := newApp(t, record("plain")), newApp(t, record("pp"))
	cfg := func(ppOn string) *Config {
		return &Config{Version: "v-" + ppOn, TLS: identity.Modern(), Inbound: []Inbound{
			{Name: "plain", Listen: "127.0.0.1:0", App: plainApp.addr(), Allow: allowIDs(t, frontendID), ProxyProtocol: ppOn == "plain"},
			{Name: "pp", Listen: "127.0.0.1:0", App: ppApp.addr(), Allow: allowIDs(t, frontendID), ProxyProtocol: ppOn == "pp"},
		}}
	}
	srv := startServer(t, identity.NewTLS(ca.Source(t, backendID)), cfg("pp"), Options{})
	client := identity.NewTLS(ca.Source(t, frontendID))
	const msg = "exactly these bytes"
	send := func(listener string) []byte {
		t.Helper()
		tc, err := tlsDial(addrOf(t, srv, listener), client, backendID)
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		if _, err := io.WriteString(tc, msg); err != nil {
			t.Fatal(err)
		}
		tc.CloseWrite()
		f := <-got
		if f.app != listener {
			t.Fatalf("app %q answered a connection to listener %q", f.app, listener)
		}
		return f.data
	}
	isHeader := func(b []byte) bool {
		_, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
		return err == nil
	}
	check := func(on string) {
		t.Helper()
		for _, l := range []string{"plain", "pp"} {
			b := send(l)
			switch {
			case l == on && !isHeader(b):
				t.Errorf("listener %q asks for the header, its app got %q", l, b)
			case l == on && !bytes.HasSuffix(b, []byte(msg)):
				t.Errorf("listener %q: the peer's bytes do not follow the header: %q", l, b)
			case l != on && string(b) != msg:
				t.Errorf("listener %q does not ask for the header, its app got %q, want exactly %q", l, b, msg)
			}
		}
	}
	check("pp")
	if err := srv.Apply(cfg("plain")); err != nil {
		t.Fatal(err)
	}
	check("plain")
}

// haproxyPath finds HAProxy, installing Debian's package when running as
// root in CI (CI=true). Anywhere else a missing HAProxy skips the test.
func haproxyPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p
	}
	if os.Geteuid() != 0 || os.Getenv("CI") != "true" {
		t.Skip("haproxy not installed (apt-get install haproxy; the test installs it itself as root with CI=true)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	install := func() error {
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%w\n%s", err, out)
		}
		return nil
	}
	if err := install(); err != nil {
		if out, uerr := exec.CommandContext(ctx, "apt-get", "update", "-q").CombinedOutput(); uerr != nil {
			t.Fatalf("apt-get update: %v\n%s", uerr, out)
		}
		if err := install(); err != nil {
			t.Fatalf("installing haproxy: %v", err)
		}
	}
	p, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// haproxy runs HAProxy in the foreground with a TCP frontend that takes
// the PROXY protocol (accept-proxy) in front of backend, logging to stdout
// the addresses it read from the header. lines receives every log line.
type haproxy struct {
	addr  string
	mu    sync.Mutex
	lines []string
	more  chan struct{}
}

func startHAProxy(t *testing.T, bin, backend string) *haproxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &haproxy{addr: ln.Addr().String(), more: make(chan struct{}, 1)}
	ln.Close() // HAProxy binds it; the window for another process to take it is small
	cfg := fmt.Sprintf(`global
  log stdout format raw local0
defaults
  mode tcp
  log global
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind %s accept-proxy
  log-format "latch-pp src=%%ci:%%cp dst=%%fi:%%fp"
  default_backend be
backend be
  server app %s
`, h.addr, backend)
	file := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", file)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			h.mu.Lock()
			h.lines = append(h.lines, sc.Text())
			h.mu.Unlock()
			select {
			case h.more <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		cmd.Wait()
	})
	// HAProxy binds before it logs anything; wait until it accepts.
	deadline := time.Now().Add(waitFor)
	for {
		c, err := net.Dial("tcp", h.addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy does not listen on %s: %v\n%s", h.addr, err, h.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return h
}

func (h *haproxy) log() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return strings.Join(h.lines, "\n")
}

// waitLine returns the first log line containing every one of want.
func (h *haproxy) waitLine(t *testing.T, want ...string) string {
	t.Helper()
	deadline := time.NewTimer(waitFor)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		for _, l := range h.lines {
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				h.mu.Unlock()
				return l
			}
		}
		h.mu.Unlock()
		select {
		case <-h.more:
		case <-deadline.C:
			t.Fatalf("haproxy logged no line with %q; log:\n%s", want, h.log())
		}
	}
}

// TestProxyProtocolHAProxy: a parser not written here, HAProxy's
// accept-proxy, takes latch's header: the connection goes through to the
// backend and HAProxy logs the peer's address it read from the header. The
// same HAProxy refuses a malformed header and a connection without one, and
// forwards nothing of either, so its acceptance means something.
func TestProxyProtocolHAProxy(t *testing.T) {
	bin := haproxyPath(t)
	backend := newApp(t, echo)
	hap := startHAProxy(t, bin, backend.addr())

	ca := identitytest.NewCA(t, trustDomain)
	srv := startServer(t, identity.NewTLS(ca.Source(t, backendID)), &Config{Version: "1", TLS: identity.Modern(), Inbound: []Inbound{{
		Name: "web", Listen: "127.0.0.1:0", App: hap.addr, Allow: allowIDs(t, frontendID), ProxyProtocol: true,
	}}}, Options{})

	t.Run("latch's header accepted", func(t *testing.T) {
		tc, err := tlsDial(addrOf(t, srv, "web"), identity.NewTLS(ca.Source(t, frontendID)), backendID)
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		if err := roundTrip(tc, "through haproxy\n"); err != nil {
			t.Fatalf("no echo through HAProxy: %v\nhaproxy log:\n%s", err, hap.log())
		}
		tc.Close()
		hap.waitLine(t, "latch-pp", "src="+tc.LocalAddr().String(), "dst="+tc.RemoteAddr().String())
	})

	t.Run("malformed header refused", func(t *testing.T) {
		accepted := backend.accepted.Load()
		for _, tc := range []struct {
			name  string
			bytes []byte
			log   string
		}{
			// The v2 signature, then TCP over IPv4 with 4 bytes of
			// addresses where 12 are needed.
			{"short addresses", append([]byte("\r\n\r\n\x00\r\nQUIT\n"), 0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4), "invalid PROXY protocol header"},
			{"no header", []byte("GET / HTTP/1.0\r\n\r\n"), "does not look like a PROXY protocol header"},
		} {
			c, err := net.Dial("tcp", hap.addr)
			if err != nil {
				t.Fatal(err)
			}
			c.Write(tc.bytes)
			if err := expectClosed(t, c); err == nil {
				t.Errorf("%s: connection not closed", tc.name)
			}
			c.Close()
			hap.waitLine(t, c.LocalAddr().String(), tc.log)
		}
		if n := backend.accepted.Load(); n != accepted {
			t.Errorf("HAProxy forwarded %d connections with a bad header to the backend", n-accepted)
		}
	})
}
