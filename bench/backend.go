package bench

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"sync"
)

// The backend speaks a one-byte mode header so one listener serves every
// measurement, and every proxy pair needs a single route:
//
//	'E' then anything: echo every byte back until EOF (latency, new
//	    connections, idle connections);
//	'S' then frames of [4-byte big-endian length][payload], ended by a
//	    zero-length frame: the backend answers with the 8-byte payload count
//	    and the 4-byte CRC-32C of the payload stream (bulk throughput).
//
// Framing rather than half-close ends a bulk transfer because not every peer
// propagates a half-close the same way, and the harness measures speed, not
// that.
const (
	modeEcho = 'E'
	modeSink = 'S'
)

// castagnoli is CRC-32C: hardware-accelerated on amd64 and arm64, so checking
// every byte costs the load generator little next to the proxies.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sinkReplyLen is the size of the bulk reply: byte count and checksum.
const sinkReplyLen = 12

// Backend is the application behind the inbound proxy.
type Backend struct {
	ln    net.Listener
	tls   *tls.Config // non-nil: every connection is TLS (the Go mTLS baseline)
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

// StartBackend listens on a free loopback port and serves until Close.
func StartBackend() (*Backend, error) { return newBackend("127.0.0.1:0", nil) }

// newBackend starts a backend on addr; with cfg, it terminates TLS itself.
func newBackend(addr string, cfg *tls.Config) (*Backend, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening for the backend: %w", err)
	}
	b := &Backend{ln: ln, tls: cfg, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.serve()
	return b, nil
}

// Addr is the backend's host:port.
func (b *Backend) Addr() string { return b.ln.Addr().String() }

func (b *Backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or similar: the client sees the failure as
			// a dial or read error; keep serving the others.
			continue
		}
		b.mu.Lock()
		if b.done {
			b.mu.Unlock()
			c.Close()
			return
		}
		b.conns[c] = struct{}{}
		b.wg.Add(1)
		b.mu.Unlock()
		go func() {
			defer b.wg.Done()
			if b.tls != nil {
				// Close below closes the TCP connection under it, which
				// is what Close must reach to end a blocked handler.
				handle(tls.Server(c, b.tls))
			} else {
				handle(c)
			}
			b.mu.Lock()
			delete(b.conns, c)
			b.mu.Unlock()
			c.Close()
		}()
	}
}

// handle serves one connection; errors just end it, the client reports them.
func handle(c net.Conn) {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case modeEcho:
		// Not io.Copy(c, c): between two sockets that splices, and a splice
		// waiting for data holds a pipe (two descriptors) per connection,
		// which halved the idle connections that fit under RLIMIT_NOFILE.
		buf := make([]byte, 4<<10)
		_, _ = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, buf)
	case modeSink:
		n, sum, err := sink(c)
		if err != nil {
			return
		}
		var reply [sinkReplyLen]byte
		binary.BigEndian.PutUint64(reply[:8], n)
		binary.BigEndian.PutUint32(reply[8:], sum)
		_, _ = c.Write(reply[:])
	}
}

// sink reads frames until the empty one and returns the payload count and
// checksum.
func sink(r io.Reader) (uint64, uint32, error) {
	buf := make([]byte, 256<<10)
	var hdr [4]byte
	var n uint64
	var sum uint32
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return 0, 0, fmt.Errorf("reading frame header: %w", err)
		}
		left := int(binary.BigEndian.Uint32(hdr[:]))
		if left == 0 {
			return n, sum, nil
		}
		for left > 0 {
			chunk := buf[:min(left, len(buf))]
			m, err := io.ReadFull(r, chunk)
			sum = crc32.Update(sum, castagnoli, chunk[:m])
			n += uint64(m)
			left -= m
			if err != nil {
				return 0, 0, fmt.Errorf("reading frame payload: %w", err)
			}
		}
	}
}

// Close stops accepting, closes every open connection and waits for the
// handlers.
func (b *Backend) Close() error {
	err := b.ln.Close()
	b.mu.Lock()
	b.done = true
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
	return err
}
