package proxy_test

import (
	"crypto/tls"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// fuzzConfigSeeds are valid and hostile static configurations: the corpus
// the mutator starts from.
var fuzzConfigSeeds = []string{
	// Valid: the documented example, both profiles, every knob.
	`tls:
  profile: modern
inbound:
  - name: web
    listen: 0.0.0.0:8443
    app: 127.0.0.1:8080
    allow:
      - id: spiffe://mesh.test/ns/default/sa/frontend
      - pathPrefix: spiffe://mesh.test/ns/batch
      - trustDomain: mesh.test
    idleTimeout: 5m
    handshakeTimeout: 10s
    maxConnections: 1000
outbound:
  - name: backend
    listen: 127.0.0.1:15001
    upstreams: [backend.default.svc:8443]
    serverID: spiffe://mesh.test/ns/default/sa/backend
`,
	`tls:
  profile: intermediate
  minVersion: "1.2"
  cipherSuites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ECDHE-RSA-CHACHA20-POLY1305]
  curves: [X25519MLKEM768, X25519]
inbound:
  - {name: a, listen: "[::1]:0", app: "localhost:1", allow: []}
`,
	"outbound:\n  - name: o\n    listen: localhost:0\n    upstreams: [\"10.0.0.1:1\", \"h:2\"]\n    serverID: spiffe://td/x\n    connectTimeout: 1s\n",
	// Hostile: weaker TLS, unknown keys, bad IDs, open relays, YAML tricks.
	"tls: {profile: legacy}\n",
	"tls: {profile: intermediate, minVersion: \"1.1\"}\n",
	"tls: {profile: intermediate, cipherSuites: [TLS_RSA_WITH_AES_128_CBC_SHA]}\n",
	"tls: {profile: modern, minVersion: \"1.2\"}\n",
	"tls: {profile: modern, curves: [P-521]}\n",
	"inbound:\n  - name: a\n    listen: :1\n    app: 127.0.0.1:2\n    allow:\n      - {id: spiffe://td/a, trustDomain: td}\n",
	"inbound:\n  - name: a\n    listen: :1\n    app: 127.0.0.1:2\n    allow:\n      - pathPrefix: spiffe://td\n",
	"outbound:\n  - name: o\n    listen: 0.0.0.0:15001\n    upstreams: [a:1]\n    serverID: spiffe://td/x\n",
	"outbound:\n  - name: o\n    listen: 127.0.0.1:1\n    upstreams: [a:1]\n    serverID: spiffe://td\n",
	"outbound:\n  - name: o\n    listen: 127.0.0.1:1\n    upstreams: []\n    serverID: spiffe://td/x\n",
	"inbound:\n  - name: a\n    listen: :1\n    app: 127.0.0.1:2\n    maxConnections: -1\n",
	"inbound:\n  - name: a\n    listen: :1\n    app: 127.0.0.1:2\n    idleTimeout: -5s\n",
	"inbound:\n  - name: a\n    listen: :1\n    app: 127.0.0.1:0\n",
	"inbound:\n  - &x {name: a, listen: \":1\", app: \"h:2\"}\n  - *x\n",
	"inbound: [{name: \"a b\", listen: \":1\", app: \"h:2\"}]\n",
	"unknown: 1\n",
	"inbound:\n  - name: a\n    name: b\n",
	"- just\n- a list\n",
	"{",
	"",
	"\x00\xff",
	"tls: !!binary aGVsbG8=\n",
	"inbound: &a [*a]\n",
}

// FuzzParseConfig: whatever the bytes, Parse never panics; a Config it
// accepts passes Validate and holds no profile below TLS 1.2, no outbound
// listener off loopback and no outbound without a server ID; an error it
// returns is a *ConfigError naming the file and a line.
func FuzzParseConfig(f *testing.F) {
	for _, s := range fuzzConfigSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := proxy.Parse("fuzz.yaml", data)
		if err != nil {
			msg := err.Error()
			if msg == "" {
				t.Fatal("empty error message")
			}
			ce, ok := errors.AsType[*proxy.ConfigError](err)
			if !ok {
				t.Fatalf("error %T is not a *proxy.ConfigError: %v", err, err)
			}
			if ce.Line < 1 || !strings.HasPrefix(msg, "fuzz.yaml:") {
				t.Fatalf("error without file:line: %q", msg)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Parse accepted a config its own Validate refuses: %v", err)
		}
		checkProfile(t, cfg.TLS)
		for _, out := range cfg.Outbound {
			host, _, err := net.SplitHostPort(out.Listen)
			if err != nil {
				t.Fatalf("outbound %q: listen %q: %v", out.Name, out.Listen, err)
			}
			if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
				t.Fatalf("outbound %q listens on %q: an open relay", out.Name, out.Listen)
			}
			if out.ServerID.IsZero() || out.ServerID.Path() == "" {
				t.Fatalf("outbound %q accepted without a workload server ID", out.Name)
			}
		}
	})
}

// checkProfile fails t if p is wider than the intermediate profile.
func checkProfile(t *testing.T, p identity.Profile) {
	t.Helper()
	wide := identity.Intermediate()
	if p.MinVersion < tls.VersionTLS12 || (p.MaxVersion != 0 && p.MaxVersion < p.MinVersion) {
		t.Fatalf("accepted versions %x..%x", p.MinVersion, p.MaxVersion)
	}
	for _, s := range p.CipherSuites {
		if !slices.Contains(wide.CipherSuites, s) {
			t.Fatalf("accepted suite %s", tls.CipherSuiteName(s))
		}
	}
	for _, c := range p.Curves {
		if !slices.Contains(wide.Curves, c) {
			t.Fatalf("accepted curve %s", c)
		}
	}
}
