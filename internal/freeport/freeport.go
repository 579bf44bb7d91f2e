// Package freeport hands out loopback ports for servers that bind them a
// moment later: a proxy process started with the port in its configuration,
// or a listener opened after the configuration naming it is written.
//
// Listening on port 0 and closing is the usual trick, and it races: the
// kernel picks port 0 listeners and the local end of every outgoing
// connection from the same ephemeral range, so between the close and the
// real bind a busy machine (a CI run with every test package at once, each
// making thousands of connections) can hand that very port to someone else.
// The ports here come from below the ephemeral range, where neither kind of
// kernel pick ever lands, in sequence from a random start, so two processes
// using this package rarely walk over the same ports at the same time.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// floor is the lowest port handed out: clear of the registered ports most
// local services use.
const floor = 10000

var (
	mu   sync.Mutex
	low  int // the kernel's first ephemeral port, read on first use
	next int // the next port to try, in [floor, low)
)

// Port returns a loopback port nothing listened on at the time of the call
// and that this process has not handed out before.
func Port() (int, error) {
	mu.Lock()
	defer mu.Unlock()
	if low == 0 {
		low = ephemeralLow()
		if low > floor {
			next = floor + rand.IntN(low-floor)
		}
	}
	for range max(low-floor, 0) {
		port := next
		if next++; next >= low {
			next = floor
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // somebody's; try the next
		}
		ln.Close()
		return port, nil
	}
	// No room below the ephemeral range: fall back to the kernel's pick,
	// with its race.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free loopback port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Addr is Port as "127.0.0.1:PORT".
func Addr() (string, error) {
	p, err := Port()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)), nil
}

// ephemeralLow is the first port of the kernel's ephemeral range: Linux's
// ip_local_port_range, else 32768 (Linux's default; BSDs and macOS start
// higher, at 49152, so the ports below stay clear there too).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return 32768
	}
	return n
}
