package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// ioTimeout bounds every single read or write of the load client, so a proxy
// that stalls fails the measurement instead of hanging the run.
const ioTimeout = 10 * time.Second

// frameSize is the bulk payload per frame; large enough that the 4-byte
// header is noise, small enough to interleave with the checksum.
const frameSize = 64 << 10

// framePool holds pre-built bulk frames ([length][random payload]) so the
// client spends its time writing, not generating data. Random bytes keep any
// compression or deduplication from flattering a peer.
type framePool struct {
	frames [][]byte
}

func newFramePool(seed uint64) *framePool {
	rng := rand.New(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}))
	p := &framePool{}
	for range 16 {
		f := make([]byte, 4+frameSize)
		binary.BigEndian.PutUint32(f, frameSize)
		for i := 4; i < len(f); i += 8 {
			binary.LittleEndian.PutUint64(f[i:], rng.Uint64())
		}
		p.frames = append(p.frames, f)
	}
	return p
}

// BulkResult is one bulk transfer over parallel connections.
type BulkResult struct {
	Bytes   uint64        // payload bytes the backend received and checked
	Elapsed time.Duration // from the first dial to the last checksum reply
}

// MBps is payload megabytes (10^6) per second.
func (r BulkResult) MBps() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Bytes) / 1e6 / r.Elapsed.Seconds()
}

// runBulk streams frames over conns parallel connections for d and checks
// that the backend saw exactly the bytes sent, by count and CRC-32C.
func runBulk(ctx context.Context, dial dialFunc, conns int, d time.Duration, pool *framePool) (BulkResult, error) {
	start := time.Now()
	deadline := start.Add(d)
	var (
		mu    sync.Mutex
		total uint64
		first error
		wg    sync.WaitGroup
	)
	for i := range conns {
		wg.Go(func() {
			n, err := bulkOne(ctx, dial, deadline, pool, i)
			mu.Lock()
			defer mu.Unlock()
			total += n
			if err != nil && first == nil {
				first = err
			}
		})
	}
	wg.Wait()
	if first != nil {
		return BulkResult{}, first
	}
	return BulkResult{Bytes: total, Elapsed: time.Since(start)}, nil
}

func bulkOne(ctx context.Context, dial dialFunc, deadline time.Time, pool *framePool, offset int) (uint64, error) {
	c, err := dial(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()

	if err := writeAll(c, []byte{modeSink}); err != nil {
		return 0, fmt.Errorf("bulk: writing mode: %w", err)
	}
	var sent uint64
	var sum uint32
	for i := offset; time.Now().Before(deadline); i++ {
		f := pool.frames[i%len(pool.frames)]
		if err := writeAll(c, f); err != nil {
			return 0, fmt.Errorf("bulk: after %d bytes: %w", sent, err)
		}
		sum = crc32.Update(sum, castagnoli, f[4:])
		sent += uint64(len(f) - 4)
	}
	if err := writeAll(c, []byte{0, 0, 0, 0}); err != nil {
		return 0, fmt.Errorf("bulk: writing the end frame: %w", err)
	}
	var reply [sinkReplyLen]byte
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return 0, fmt.Errorf("bulk: reading the backend's checksum after %d bytes: %w", sent, err)
	}
	gotN, gotSum := binary.BigEndian.Uint64(reply[:8]), binary.BigEndian.Uint32(reply[8:])
	if gotN != sent || gotSum != sum {
		return 0, fmt.Errorf("bulk: backend received %d bytes with CRC-32C %08x, client sent %d bytes with %08x", gotN, gotSum, sent, sum)
	}
	return sent, nil
}

// runLatency sends size-byte messages on one persistent connection, one at a
// time, for d, and returns each round-trip time. Every echo is compared with
// what was sent. One more round trip than samples went through the pair (the
// warm-up).
func runLatency(ctx context.Context, dial dialFunc, size int, d time.Duration) ([]time.Duration, error) {
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()

	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte(i*7 + 1)
	}
	got := make([]byte, size)
	// The mode byte travels with the first message, so the first sample also
	// pays for it; one warm-up exchange keeps that out of the figures.
	first := append([]byte{modeEcho}, msg...)
	if err := roundTrip(c, first, got, msg); err != nil {
		return nil, fmt.Errorf("latency: warm-up: %w", err)
	}
	samples := make([]time.Duration, 0, 1<<16)
	end := time.Now().Add(d)
	for {
		t0 := time.Now()
		if !t0.Before(end) {
			return samples, nil
		}
		if err := roundTrip(c, msg, got, msg); err != nil {
			return nil, fmt.Errorf("latency: after %d messages: %w", len(samples), err)
		}
		samples = append(samples, time.Since(t0))
	}
}

func roundTrip(c net.Conn, send, got, want []byte) error {
	c.SetDeadline(time.Now().Add(ioTimeout))
	if err := writeAll(c, send); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return errors.New("echo differs from the message sent")
	}
	return nil
}

// connectRun is a run of short-lived connections.
type connectRun struct {
	Count   int             // connections that completed their echo
	Elapsed time.Duration   // wall time of the run
	TTFB    []time.Duration // dial start to the echoed byte, per connection
}

// runConnect has workers each loop over connect, one-byte echo, close for d.
// Any failed connection fails the measurement: a proxy that drops
// connections under load has no rate worth printing.
func runConnect(ctx context.Context, dial dialFunc, workers int, d time.Duration) (connectRun, error) {
	start := time.Now()
	end := start.Add(d)
	var (
		mu    sync.Mutex
		res   connectRun
		first error
		wg    sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			ttfb := make([]time.Duration, 0, 4096)
			var err error
			for time.Now().Before(end) && ctx.Err() == nil {
				var t time.Duration
				if t, err = connectOnce(ctx, dial); err != nil {
					err = fmt.Errorf("connect: after %d connections: %w", len(ttfb), err)
					break
				}
				ttfb = append(ttfb, t)
			}
			mu.Lock()
			defer mu.Unlock()
			res.Count += len(ttfb)
			res.TTFB = append(res.TTFB, ttfb...)
			if err != nil && first == nil {
				first = err
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	if first == nil {
		first = ctx.Err()
	}
	return res, first
}

func connectOnce(ctx context.Context, dial dialFunc) (time.Duration, error) {
	t0 := time.Now()
	c, err := dial(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if err := echoByte(c); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// echoByte sends the echo mode and one byte and waits for the byte: proof
// that the whole chain, backend included, is connected.
func echoByte(c net.Conn) error {
	c.SetDeadline(time.Now().Add(ioTimeout))
	if err := writeAll(c, []byte{modeEcho, 'x'}); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if b[0] != 'x' {
		return fmt.Errorf("echo returned %q, sent 'x'", b[0])
	}
	return c.SetDeadline(time.Time{})
}

// openIdle opens n connections with dial, each proven end to end with a
// one-byte echo, and leaves them open. The caller closes them.
func openIdle(ctx context.Context, dial dialFunc, n, workers int) ([]net.Conn, error) {
	var (
		mu    sync.Mutex
		conns = make([]net.Conn, 0, n)
		first error
		wg    sync.WaitGroup
		next  = make(chan struct{}, n)
	)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range workers {
		wg.Go(func() {
			for range next {
				if ctx.Err() != nil {
					return
				}
				c, err := dial(ctx)
				if err == nil {
					if err = echoByte(c); err != nil {
						c.Close()
					}
				}
				mu.Lock()
				if err != nil {
					if first == nil {
						first = fmt.Errorf("idle connections: after %d: %w", len(conns), err)
					}
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	if first != nil {
		closeAll(conns)
		return nil, first
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// dialFunc opens one connection to a topology's entry.
type dialFunc func(ctx context.Context) (net.Conn, error)

// plainDial connects over TCP to addr: the entry of every proxy pair.
func plainDial(addr string) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		d := net.Dialer{Timeout: ioTimeout}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("dialing %s: %w", addr, err)
		}
		return c, nil
	}
}

// tlsDial connects to addr and completes a TLS handshake with cfg: the load
// client speaking mTLS itself (the Go mTLS baseline).
func tlsDial(addr string, cfg *tls.Config) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: ioTimeout}, Config: cfg}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("dialing %s with TLS: %w", addr, err)
		}
		return c, nil
	}
}

func writeAll(c net.Conn, b []byte) error {
	c.SetWriteDeadline(time.Now().Add(ioTimeout))
	_, err := c.Write(b)
	return err
}
