package proxy

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The copy loop reads and writes its sockets with raw system calls, which
// must never block (a blocked raw call holds its P and stalls the Go
// scheduler). A TCP connection whose descriptor was put in blocking mode
// behind net's back (os.File.Fd on a dup of it does that: the flag belongs
// to the open file, which the dup shares) gets no socket, so the loop reads
// it with ordinary blocking reads instead.
func TestBlockingDescriptorGetsNoSocket(t *testing.T) {
	client, server := tcpPair(t)
	defer client.Close()
	defer server.Close()
	if newSocket(client) == nil {
		t.Fatal("newSocket refused a non-blocking TCP connection")
	}
	rc, err := server.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = syscall.SetNonblock(int(fd), false) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if newSocket(server) != nil {
		t.Fatal("newSocket accepted a descriptor in blocking mode: its raw reads could block the scheduler")
	}
}

// What the TLS stack writes from the other direction (its answer to a
// KeyUpdate) while the copy loop has a batch open must neither interleave
// with a batched write nor overtake the records batched before it: each
// write arrives whole, and the batch's writes in their order.
func TestBatchedWritesStayWhole(t *testing.T) {
	client, server := tcpPair(t)
	s := newSocket(server)
	const rounds, perBatch = 300, 5
	record := func(who byte, i int) []byte {
		return fmt.Appendf(bytes.Repeat([]byte{who}, 1000+i%3000), "|%c%06d\n", who, i)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // the copy loop
		defer wg.Done()
		for i := range rounds {
			s.beginBatch(copyBufferSize)
			for j := range perBatch {
				if _, err := s.Write(record('b', i*perBatch+j)); err != nil {
					t.Error(err)
					return
				}
			}
			if err := s.endBatch(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() { // the other direction's TLS stack
		defer wg.Done()
		for i := range rounds {
			if _, err := s.Write(record('k', i)); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() { wg.Wait(); server.CloseWrite() }()

	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	next := map[byte]int{'b': 0, 'k': 0}
	for len(got) > 0 {
		who := got[0]
		want := record(who, next[who])
		if !bytes.HasPrefix(got, want) {
			t.Fatalf("stream broken at %c record %d: %.40q", who, next[who], got)
		}
		got = got[len(want):]
		next[who]++
	}
	if next['b'] != rounds*perBatch || next['k'] != rounds {
		t.Fatalf("got %d batched and %d direct records, want %d and %d", next['b'], next['k'], rounds*perBatch, rounds)
	}
}

// The records made of one copy buffer leave in one write at endBatch, for
// both buffer sizes: nothing reaches the peer before it, all of it after.
// (A batch buffer too small for a bulk buffer's records would send part of
// them early, in more system calls.)
func TestBatchHoldsACopyBuffersRecords(t *testing.T) {
	for _, size := range []int{copyBufferSize, bulkBufferSize} {
		t.Run(fmt.Sprint(size>>10, "KiB"), func(t *testing.T) {
			client, server := tcpPair(t)
			s := newSocket(server)
			// A full buffer's records, each 16 KiB of plaintext sealed: the
			// largest a tls.Conn writes for it.
			record := bytes.Repeat([]byte{'r'}, 16<<10+22)
			s.beginBatch(size)
			for range size / (16 << 10) {
				if _, err := s.Write(record); err != nil {
					t.Fatal(err)
				}
			}
			client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if n, err := client.Read(make([]byte, 1)); n > 0 || err == nil {
				t.Fatalf("%d bytes reached the peer before endBatch", n)
			}
			if err := s.endBatch(); err != nil {
				t.Fatal(err)
			}
			client.SetReadDeadline(time.Now().Add(5 * time.Second))
			want := size / (16 << 10) * len(record)
			got, err := io.ReadFull(client, make([]byte, want))
			if err != nil {
				t.Fatalf("after endBatch: %d of %d bytes: %v", got, want, err)
			}
		})
	}
}
