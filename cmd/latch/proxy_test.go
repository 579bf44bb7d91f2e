package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/internal/freeport"
)

// jsonLines collects the JSON log lines a command writes and lets the test
// wait for one. It also keeps every line that repeats a key.
type jsonLines struct {
	mu       sync.Mutex
	lines    []map[string]any
	repeated []string
	changed  chan struct{}
	w        *io.PipeWriter
	done     chan struct{}
}

func newJSONLines() *jsonLines {
	r, w := io.Pipe()
	j := &jsonLines{changed: make(chan struct{}), w: w, done: make(chan struct{})}
	go func() {
		defer close(j.done)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				m = map[string]any{"msg": sc.Text()}
			}
			j.mu.Lock()
			if dup := repeatedKeys(sc.Bytes()); len(dup) > 0 {
				j.repeated = append(j.repeated, fmt.Sprintf("%v in %s", dup, sc.Text()))
			}
			j.lines = append(j.lines, m)
			close(j.changed)
			j.changed = make(chan struct{})
			j.mu.Unlock()
		}
	}()
	return j
}

func (j *jsonLines) wait(t *testing.T, msg string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for seen := 0; ; {
		j.mu.Lock()
		for _, l := range j.lines[seen:] {
			if l["msg"] == msg && (match == nil || match(l)) {
				j.mu.Unlock()
				return l
			}
		}
		seen = len(j.lines)
		ch := j.changed
		j.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			j.mu.Lock()
			defer j.mu.Unlock()
			t.Fatalf("no log line %q; got %v", msg, j.lines)
		}
	}
}

// count is how many lines so far have msg.
func (j *jsonLines) count(msg string) int {
	j.mu.Lock()
	defer j.mu.Unlock()
	n := 0
	for _, l := range j.lines {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// requireNoRepeatedKeys fails the test for every log line that carried a
// key twice (a logger given With("component", …) by its caller and again by
// its package): log processors keep one of the two, or refuse the line.
func (j *jsonLines) requireNoRepeatedKeys(t *testing.T) {
	t.Helper()
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, r := range j.repeated {
		t.Errorf("log line repeats a key: %s", r)
	}
}

// repeatedKeys lists the keys that appear twice in one JSON object of line,
// at any depth.
func repeatedKeys(line []byte) []string {
	dec := json.NewDecoder(bytes.NewReader(line))
	var (
		dups []string
		walk func() error
	)
	walk = func() error {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				key, _ := k.(string)
				if seen[key] {
					dups = append(dups, key)
				}
				seen[key] = true
				if err := walk(); err != nil {
					return err
				}
			}
			_, err = dec.Token() // }
			return err
		case json.Delim('['):
			for dec.More() {
				if err := walk(); err != nil {
					return err
				}
			}
			_, err = dec.Token() // ]
			return err
		}
		return nil
	}
	_ = walk()
	return dups
}

// TestProxyCommand runs `latch proxy` against a devca Workload API: it
// serves the file, a SIGHUP with a broken file keeps the old config (and
// logs file:line), a SIGHUP with a new policy closes the peer it no longer
// allows, and cancelling the context drains and exits cleanly.
func TestProxyCommand(t *testing.T) {
	const (
		frontend = "spiffe://mesh.test/ns/default/sa/frontend"
		backend  = "spiffe://mesh.test/ns/default/sa/backend"
	)
	ca := newDevCA(t, "mesh.test")
	beSocket, err := ca.AddWorkload(backend)
	if err != nil {
		t.Fatal(err)
	}
	feSocket, err := ca.AddWorkload(frontend)
	if err != nil {
		t.Fatal(err)
	}
	feSrc := workloadSource(t, feSocket)

	app := echoApp(t)

	path := filepath.Join(t.TempDir(), "latch.yaml")
	writeConfig := func(body string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	config := func(allow string) string {
		return "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: " + app + "\n    allow:\n      - id: " + allow + "\n"
	}
	writeConfig(config(frontend))

	logs := newJSONLines()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	exited := make(chan error, 1)
	go func() {
		exited <- runProxy(ctx, []string{"--config", path, "--workload-api", beSocket, "--drain-timeout", "2s", "--admin-address", "127.0.0.1:0"}, io.Discard, logs.w)
	}()
	addr := logs.wait(t, "listening", nil)["addr"].(string)

	serverID := spiffeid.RequireFromString(backend)
	dial := func() (*tls.Conn, error) {
		return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
			identity.NewTLS(feSrc).ClientConfig(identity.Modern(), serverID))
	}
	echo := func(c *tls.Conn, msg string) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		_, err := io.ReadFull(c, buf)
		return err
	}
	live, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if err := echo(live, "hello"); err != nil {
		t.Fatalf("through latch proxy: %v", err)
	}

	writeConfig(config(frontend) + "    maxConnections: lots\n")
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	refused := logs.wait(t, "reload refused, the running config keeps serving", nil)
	if e, _ := refused["error"].(string); !strings.Contains(e, path+":7:") || !strings.Contains(e, "maxConnections") {
		t.Errorf("reload error %q does not name %s:7 and the setting", e, path)
	}
	if err := echo(live, "still here"); err != nil {
		t.Fatalf("after a broken reload: %v", err)
	}

	writeConfig(config("spiffe://mesh.test/ns/default/sa/someone-else"))
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	logs.wait(t, "reloaded", nil)
	logs.wait(t, "connection closed", func(l map[string]any) bool { return l["reason"] == "policy_revoked" && l["peer_id"] == frontend })

	cancel()
	// Durations are logged as strings, like every daemon's.
	logs.wait(t, "shutting down: draining connections", func(l map[string]any) bool { return l["drain_timeout"] == "2s" })
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("latch proxy exited with %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("latch proxy did not exit after cancellation")
	}
	logs.w.Close()
	<-logs.done
	logs.requireNoRepeatedKeys(t)
}

// TestProxyCommandRefusesBadSetup: bad flags and a bad file fail at once,
// before the Workload API is even consulted; a declaration given as the
// sidecar's file is named as such, with where it belongs.
func TestProxyCommandRefusesBadSetup(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("tls:\n  profile: legacy\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{}, "--config or --xds-address is required"},
		{[]string{"--xds-address", "127.0.0.1:1"}, "--xds-server-id"},
		{[]string{"--xds-address", "127.0.0.1:1", "--xds-server-id", "spiffe://x/cp", "--tls-profile", "legacy"}, "--tls-profile"},
		{[]string{"--config", bad, "--log-format", "xml"}, "--log-format"},
		{[]string{"--config", bad, "--log-level", "loud"}, "--log-level"},
		{[]string{"--config", bad}, bad + ":2:12: tls.profile"},
		{[]string{"--config", bad, "extra"}, "unexpected arguments"},
		{[]string{"--config", filepath.Join("..", "..", "examples", "declarations", "backend.yaml")},
			"backend.yaml is a ServicePolicy declaration (latch.dev/v1alpha1), not a sidecar configuration: declarations are read by `latch control-plane --declarations DIR`"},
	} {
		err := runProxy(t.Context(), append(tc.args, "--workload-api", "unix:///nonexistent.sock"), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("latch proxy %v: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// TestProxyRefusesAppAtItsOwnEndpoints: an inbound listener's app that is
// the sidecar's admin endpoint or TLS test endpoint is refused at start (a
// peer admitted there would reach /status, pprof or the test endpoint
// through the sidecar, from loopback).
func TestProxyRefusesAppAtItsOwnEndpoints(t *testing.T) {
	ca := newDevCA(t, "mesh.test")
	socket, err := ca.AddWorkload("spiffe://mesh.test/ns/default/sa/backend")
	if err != nil {
		t.Fatal(err)
	}
	adminAddr, err := freeport.Addr()
	if err != nil {
		t.Fatal(err)
	}
	testAddr, err := freeport.Addr()
	if err != nil {
		t.Fatal(err)
	}
	_, testPort, _ := net.SplitHostPort(testAddr)
	for _, tc := range []struct{ app, want string }{
		{adminAddr, "this sidecar's admin endpoint"},
		{"localhost:" + testPort, "this sidecar's TLS test endpoint"},
	} {
		path := filepath.Join(t.TempDir(), "latch.yaml")
		body := "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: " + tc.app + "\n    allow:\n      - trustDomain: mesh.test\n"
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		// Before the check, the sidecar served: it would run until the
		// timeout and return nil.
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		err := runProxy(ctx, []string{"--config", path, "--workload-api", socket, "--admin-address", adminAddr, "--test-endpoint", testAddr, "--pprof"}, io.Discard, io.Discard)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "inbound[0].app") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("app %s: latch proxy returned %v, want inbound[0].app refused as %s", tc.app, err, tc.want)
		}
	}
}

// changes is a change announcer like identity.WorkloadSource.Changed.
type changes struct {
	mu sync.Mutex
	ch chan struct{}
}

func (c *changes) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ch
}

func (c *changes) change() {
	c.mu.Lock()
	defer c.mu.Unlock()
	close(c.ch)
	c.ch = make(chan struct{})
}

// TestOnEveryChangeSeesAChangeDuringTheCall: a bundle removed while the
// trust recheck of the previous change runs is rechecked too (taking the
// channel of the next change after the recheck would miss it until some
// later change: the removed trust domain's connections would stay up).
func TestOnEveryChangeSeesAChangeDuringTheCall(t *testing.T) {
	c := &changes{ch: make(chan struct{})}
	first := c.changed()
	calls := make(chan int, 4)
	n := 0
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		onEveryChange(ctx, first, c.changed, func() {
			n++
			if n == 1 {
				c.change() // the next change, while this call runs
			}
			calls <- n
		})
	}()
	defer func() { cancel(); <-done }()
	c.change()
	for want := 1; want <= 2; want++ {
		select {
		case got := <-calls:
			if got != want {
				t.Fatalf("call %d, want %d", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%d calls for 2 changes: the change during the first call went unseen", want-1)
		}
	}
}
