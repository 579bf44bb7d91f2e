package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

const exampleConfig = `tls:
  profile: modern
  minVersion: "1.3"
  curves: [X25519MLKEM768, X25519]
inbound:
  - name: web
    listen: 0.0.0.0:8443
    app: 127.0.0.1:8080
    allow:
      - id: spiffe://mesh.test/ns/default/sa/frontend
      - pathPrefix: spiffe://mesh.test/ns/prod
      - trustDomain: partner.test
    idleTimeout: 5m
    handshakeTimeout: 10s
    maxConnections: 1000
    proxyProtocol: v2
    federatesWith: [partner.test]
outbound:
  - name: backend
    listen: 127.0.0.1:15001
    upstreams: [backend.svc:8443, 10.0.0.7:8443]
    serverID: spiffe://mesh.test/ns/default/sa/backend
    connectTimeout: 2s
    sessionResumption: false
  - name: partner
    listen: 127.0.0.1:15002
    upstreams: [pay.partner.test:8443]
    serverID: spiffe://partner.test/pay
    federatesWith: [partner.test]
`

func TestParseExample(t *testing.T) {
	cfg, err := Parse("latch.yaml", []byte(exampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Source != "file:latch.yaml" || len(cfg.Version) != 12 {
		t.Errorf("Source %q, Version %q", cfg.Source, cfg.Version)
	}
	if cfg.TLS.Name != "modern" || cfg.TLS.MinVersion != tls.VersionTLS13 || !slices.Equal(cfg.TLS.Curves, []tls.CurveID{tls.X25519MLKEM768, tls.X25519}) {
		t.Errorf("TLS profile %+v", cfg.TLS)
	}
	in := cfg.Inbound[0]
	if in.Name != "web" || in.Listen != "0.0.0.0:8443" || in.App != "127.0.0.1:8080" || in.IdleTimeout != 5*time.Minute ||
		in.HandshakeTimeout != 10*time.Second || in.MaxConnections != 1000 || in.Allow.Len() != 3 || !in.ProxyProtocol {
		t.Errorf("inbound %+v", in)
	}
	for id, want := range map[string]bool{
		"spiffe://mesh.test/ns/default/sa/frontend": true,
		"spiffe://mesh.test/ns/prod/sa/x":           true,
		"spiffe://mesh.test/ns/production/sa/x":     false,
		"spiffe://partner.test/anything":            true,
		"spiffe://mesh.test/ns/default/sa/other":    false,
	} {
		if got := in.Allow.Allows(mustID(t, id)); got != want {
			t.Errorf("Allows(%s) = %v, want %v", id, got, want)
		}
	}
	if len(in.FederatesWith) != 1 || in.FederatesWith[0].Name() != "partner.test" {
		t.Errorf("inbound federatesWith %v", in.FederatesWith)
	}
	if p := cfg.Outbound[1]; len(p.FederatesWith) != 1 || p.FederatesWith[0].Name() != "partner.test" || p.ServerID.String() != "spiffe://partner.test/pay" {
		t.Errorf("outbound to partner.test %+v", p)
	}
	out := cfg.Outbound[0]
	if out.Name != "backend" || out.Listen != "127.0.0.1:15001" || len(out.Upstreams) != 2 ||
		out.ServerID.String() != backendID || out.ConnectTimeout != 2*time.Second || !out.DisableSessionResumption {
		t.Errorf("outbound %+v", out)
	}
	if cfg.Outbound[1].DisableSessionResumption {
		t.Errorf("outbound %+v: session resumption is on unless turned off", cfg.Outbound[1])
	}

	again, _ := Parse("latch.yaml", []byte(exampleConfig+"\n# comment\n"))
	if again.Version == cfg.Version {
		t.Error("different content, same version")
	}
}

func TestParseDefaultsToModern(t *testing.T) {
	cfg, err := Parse("t.yaml", []byte("inbound: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TLS.Name != identity.ProfileModern || cfg.TLS.MinVersion != tls.VersionTLS13 {
		t.Fatalf("default profile %+v", cfg.TLS)
	}
}

// TestParseErrors: every bad file is refused with its file, line (and
// column where the parser knows it) and the setting at fault.
func TestParseErrors(t *testing.T) {
	in := func(extra string) string {
		return "inbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:8080\n" + extra
	}
	out := func(extra string) string {
		return "outbound:\n  - name: backend\n    upstreams: [backend:8443]\n" + extra
	}
	for _, tc := range []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{"malformed YAML", "inbound:\n  - name: web\n    app: a: b\n", []string{"t.yaml:3: mapping values are not allowed"}},
		{"bad indentation", "inbound:\n  - name: web\n   listen: x\n", []string{"t.yaml:", "expected '-' indicator"}},
		{"tab indentation", "inbound:\n\t- name: web\n", []string{"t.yaml:2:"}},
		{"empty file", "", []string{"t.yaml:1:", "empty"}},
		{"not a mapping", "- a\n- b\n", []string{"t.yaml:1:1:", "expected a mapping"}},
		{"unknown top-level key", "inbound: []\ninbund: []\n", []string{"t.yaml:2:1:", `unknown key "inbund"`}},
		{"unknown listener key", in("    alow: []\n"), []string{"t.yaml:5:5:", "inbound[0].alow", "unknown key"}},
		{"key given twice", in("    app: 127.0.0.1:9090\n"), []string{"t.yaml:5:5:", "twice"}},
		{"bad SPIFFE ID", in("    allow:\n      - id: spiffe://mesh.test/ns/Bad Path\n"), []string{"t.yaml:6:13:", "inbound[0].allow[0].id"}},
		{"not a SPIFFE URI", in("    allow:\n      - id: https://mesh.test/x\n"), []string{"t.yaml:6:13:", "scheme"}},
		{"two kinds in one rule", in("    allow:\n      - id: spiffe://mesh.test/a\n        trustDomain: mesh.test\n"), []string{"t.yaml:7:22:", "exactly one"}},
		{"trustDomain written as a SPIFFE ID", in("    allow:\n      - trustDomain: spiffe://mesh.test/ns/prod/sa/db-admin\n"), []string{"t.yaml:6:22:", "inbound[0].allow[0]", "bare trust domain name", "use id for exactly spiffe://mesh.test/ns/prod/sa/db-admin"}},
		{"empty rule", in("    allow:\n      - {}\n"), []string{"t.yaml:6:9:", "exactly one"}},
		{"unknown rule kind", in("    allow:\n      - prefix: spiffe://mesh.test/a\n"), []string{"t.yaml:6:9:", `unknown key "prefix"`}},
		{"bad duration", in("    idleTimeout: 5 minutes\n"), []string{"t.yaml:5:18:", "inbound[0].idleTimeout", "not a duration"}},
		{"negative duration", in("    handshakeTimeout: -1s\n"), []string{"t.yaml:5:23:", "negative"}},
		{"PROXY protocol v1", in("    proxyProtocol: v1\n"), []string{"t.yaml:5:20:", "inbound[0].proxyProtocol", "only PROXY protocol version latch sends is v2"}},
		{"PROXY protocol as a boolean", in("    proxyProtocol: true\n"), []string{"t.yaml:5:20:", "inbound[0].proxyProtocol", `"true"`}},
		{"federatesWith a SPIFFE ID", in("    federatesWith: [spiffe://partner.test/ns/x]\n"), []string{"t.yaml:5:21:", "inbound[0].federatesWith[0]", "bare trust domain name, not a SPIFFE ID"}},
		{"federatesWith not a list", in("    federatesWith: partner.test\n"), []string{"t.yaml:5:20:", "inbound[0].federatesWith", "expected a list"}},
		{"federatesWith twice the same", in("    federatesWith: [partner.test, partner.test]\n"), []string{"t.yaml:5:35:", "inbound[0].federatesWith[1]", "listed twice"}},
		{"federatesWith an upper-case name", out("    listen: 127.0.0.1:15001\n    serverID: spiffe://mesh.test/b\n    federatesWith: [Partner.test]\n"), []string{"t.yaml:6:21:", "outbound[0].federatesWith[0]"}},
		{"session resumption as a word", out("    sessionResumption: no\n"), []string{"t.yaml:4:24:", "outbound[0].sessionResumption", `expected true or false, got "no"`}},
		{"session resumption as a string", out("    sessionResumption: \"false\"\n"), []string{"t.yaml:4:24:", "outbound[0].sessionResumption", "expected true or false"}},
		{"session resumption on an inbound listener", in("    sessionResumption: false\n"), []string{"t.yaml:5:5:", "inbound[0].sessionResumption", "unknown key"}},
		{"negative limit", in("    maxConnections: -1\n"), []string{"t.yaml:5:21:", "negative"}},
		{"limit not a number", in("    maxConnections: many\n"), []string{"t.yaml:5:21:", "integer"}},
		{"missing app", "inbound:\n  - name: web\n    listen: 127.0.0.1:8443\n", []string{"t.yaml:2:5:", "inbound[0].app", "required"}},
		{"bad listen address", "inbound:\n  - name: web\n    listen: 8443\n    app: 127.0.0.1:80\n", []string{"t.yaml:3:13:", "inbound[0].listen"}},
		{"duplicate names", in("  - name: web\n    listen: 127.0.0.1:9443\n    app: 127.0.0.1:8080\n"), []string{"t.yaml:5:11:", "inbound[1].name", "already used"}},
		{"duplicate listen", in("  - name: web2\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:8080\n"), []string{"t.yaml:6:13:", "inbound[1].listen", "already used"}},
		{"outbound not on loopback", out("    listen: 0.0.0.0:15001\n    serverID: spiffe://mesh.test/b\n"), []string{"t.yaml:4:13:", "outbound[0].listen", "loopback"}},
		{"outbound without serverID", out("    listen: 127.0.0.1:15001\n"), []string{"t.yaml:2:5:", "outbound[0].serverID", "required"}},
		{"serverID not a SPIFFE ID", out("    listen: 127.0.0.1:15001\n    serverID: backend\n"), []string{"t.yaml:5:15:", "outbound[0].serverID"}},
		{"serverID of a trust domain", out("    listen: 127.0.0.1:15001\n    serverID: spiffe://mesh.test\n"), []string{"t.yaml:5:15:", "trust domain"}},
		{"upstream without port", "outbound:\n  - name: b\n    listen: 127.0.0.1:15001\n    serverID: spiffe://mesh.test/b\n    upstreams: [backend]\n", []string{"t.yaml:5:17:", "outbound[0].upstreams[0]"}},
		{"weak profile", "tls:\n  profile: legacy\n", []string{"t.yaml:2:12:", "tls.profile", `"legacy"`}},
		{"TLS 1.1", "tls:\n  profile: intermediate\n  minVersion: \"1.1\"\n", []string{"t.yaml:3:15:", "tls.minVersion", "TLS 1.1"}},
		{"TLS 1.2 widens modern", "tls:\n  curves: [X25519]\n  minVersion: \"1.2\"\n", []string{"t.yaml:3:15:", "tls.minVersion", "outside profile modern"}},
		{"a TLS 1.2 suite under modern", "tls:\n  curves: [X25519]\n  cipherSuites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n", []string{"t.yaml:3:17:", "tls.cipherSuites", "not allowed by profile modern"}},
		{"CBC suite", "tls:\n  profile: intermediate\n  cipherSuites: [TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA]\n", []string{"t.yaml:3:18:", "tls.cipherSuites[0]", "CBC"}},
		{"static RSA suite", "tls:\n  profile: intermediate\n  cipherSuites: [AES128-GCM-SHA256]\n", []string{"t.yaml:3:18:", "tls.cipherSuites[0]"}},
		{"unknown curve", "tls:\n  curves: [X448]\n", []string{"t.yaml:2:12:", "tls.curves[0]", "X448"}},
		{"P-384 widens modern", "tls:\n  curves: [P-384]\n", []string{"t.yaml:2:11:", "tls.curves", "not allowed by profile modern"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("t.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatal("parsed without error")
			}
			if _, ok := errors.AsType[*ConfigError](err); !ok {
				t.Errorf("error %T is not a *ConfigError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestValidate covers what only a Config built by hand (or from xDS) can get
// wrong.
func TestValidate(t *testing.T) {
	good := func() *Config {
		return &Config{
			TLS:      identity.Modern(),
			Inbound:  []Inbound{{Name: "web", Listen: ":8443", App: "127.0.0.1:8080"}},
			Outbound: []Outbound{{Name: "b", Listen: "[::1]:15001", Upstreams: []string{"b:1"}, ServerID: mustID(t, backendID)}},
		}
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	if err := (&Config{}).Validate(); err != nil {
		t.Fatalf("empty config: %v", err)
	}
	for _, tc := range []struct {
		name   string
		change func(*Config)
		field  string
	}{
		{"TLS 1.0", func(c *Config) { c.TLS.MinVersion = tls.VersionTLS10 }, "tls.minVersion"},
		{"CBC suite", func(c *Config) {
			c.TLS = identity.Intermediate()
			c.TLS.CipherSuites = []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA}
		}, "tls.cipherSuites"},
		{"unnamed profile", func(c *Config) { c.TLS.Name = "custom" }, "tls.profile"},
		{"name with a space", func(c *Config) { c.Inbound[0].Name = "a b" }, "inbound[0].name"},
		{"same name both ways", func(c *Config) { c.Outbound[0].Name = "web" }, "outbound[0].name"},
		{"outbound on all interfaces", func(c *Config) { c.Outbound[0].Listen = ":15001" }, "outbound[0].listen"},
		{"outbound on a LAN address", func(c *Config) { c.Outbound[0].Listen = "192.0.2.1:15001" }, "outbound[0].listen"},
		{"no upstream", func(c *Config) { c.Outbound[0].Upstreams = nil }, "outbound[0].upstreams"},
		{"upstream port 0", func(c *Config) { c.Outbound[0].Upstreams = []string{"b:0"} }, "outbound[0].upstreams[0]"},
		{"negative idle", func(c *Config) { c.Outbound[0].IdleTimeout = -time.Second }, "outbound[0].idleTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := good()
			tc.change(c)
			err := c.Validate()
			fe, ok := errors.AsType[*FieldError](err)
			if !ok || fe.Field != tc.field {
				t.Fatalf("Validate() = %v, want a FieldError on %s", err, tc.field)
			}
		})
	}
}

// TestValidateRefusesOwnListenerAsApp: an inbound listener whose app is one
// of the sidecar's own listeners would hand every admitted peer what is
// behind it as this workload (an outbound listener's upstream), or loop. A
// typo or a hostile control plane can write it, in any spelling of the
// address.
func TestValidateRefusesOwnListenerAsApp(t *testing.T) {
	pod := netip.MustParseAddr("192.0.2.10") // stands for an address of this host
	defer func(f func(netip.Addr) bool) { isLocalAddr = f }(isLocalAddr)
	isLocalAddr = func(a netip.Addr) bool { return a == pod }
	cfg := func(app string) *Config {
		return &Config{
			TLS: identity.Modern(),
			Inbound: []Inbound{
				{Name: "web", Listen: ":8443", App: app},
				{Name: "v4", Listen: "0.0.0.0:7443", App: "127.0.0.1:7080"},
				{Name: "v6", Listen: "[::]:9443", App: "127.0.0.1:9080"},
			},
			Outbound: []Outbound{
				{Name: "db", Listen: "127.0.0.1:15001", Upstreams: []string{"db:8443"}, ServerID: mustID(t, backendID)},
				{Name: "cache", Listen: "[::1]:15002", Upstreams: []string{"cache:8443"}, ServerID: mustID(t, backendID)},
				{Name: "queue", Listen: "localhost:15003", Upstreams: []string{"queue:8443"}, ServerID: mustID(t, backendID)},
			},
		}
	}
	for _, tc := range []struct {
		app, own string // own: the listener named in the error; "" accepted
	}{
		{"127.0.0.1:15001", `outbound[0] "db"`},
		{"localhost:15001", `outbound[0] "db"`},
		{"LOCALHOST:15001", `outbound[0] "db"`},
		{"[::ffff:127.0.0.1]:15001", `outbound[0] "db"`},
		{"127.0.0.1:015001", `outbound[0] "db"`},
		{"0.0.0.0:15001", `outbound[0] "db"`}, // dialing the unspecified address reaches this host
		{"[::]:15001", `outbound[0] "db"`},
		{"[::1]:15002", `outbound[1] "cache"`},
		{"localhost:15002", `outbound[1] "cache"`},
		{"127.0.0.1:15003", `outbound[2] "queue"`},
		{"[::1]:15003", `outbound[2] "queue"`},
		{"127.0.0.1:8443", `inbound[0] "web"`},  // itself
		{"127.0.0.9:8443", `inbound[0] "web"`},  // a wildcard listener takes all of 127.0.0.0/8
		{"192.0.2.10:8443", `inbound[0] "web"`}, // and the pod's own address
		{"127.0.0.1:7443", `inbound[1] "v4"`},
		{"[::1]:9443", `inbound[2] "v6"`},
		{"192.0.2.10:9443", `inbound[2] "v6"`},

		{"127.0.0.1:8080", ""},
		{"127.0.0.2:15001", ""},   // another loopback address than the listener's
		{"[::1]:15001", ""},       // the listener is IPv4 only
		{"192.0.2.99:8443", ""},   // not this host
		{"db.internal:15001", ""}, // a DNS name is not resolved
	} {
		t.Run(tc.app, func(t *testing.T) {
			err := cfg(tc.app).Validate()
			if tc.own == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			fe, ok := errors.AsType[*FieldError](err)
			if !ok || fe.Field != "inbound[0].app" || !strings.Contains(err.Error(), "own listener "+tc.own) {
				t.Fatalf("Validate() = %v, want inbound[0].app refused as listener %s", err, tc.own)
			}
		})
	}
}

// TestValidateRefusesSharedAppWithAndWithoutProxyProtocol: two inbound
// listeners whose apps are the same socket must agree on the PROXY protocol
// header. An app that reads it (it is behind the listener that sends it)
// would read a header a peer of the other listener wrote, naming any SPIFFE
// ID, as latch's.
func TestValidateRefusesSharedAppWithAndWithoutProxyProtocol(t *testing.T) {
	cfg := func(app string, pp bool) *Config {
		return &Config{TLS: identity.Modern(), Inbound: []Inbound{
			{Name: "whoami", Listen: ":8443", App: "127.0.0.1:8080", ProxyProtocol: true},
			{Name: "other", Listen: ":9443", App: app, ProxyProtocol: pp},
		}}
	}
	for _, tc := range []struct {
		app     string
		pp      bool
		refused bool
	}{
		{"127.0.0.1:8080", false, true},
		{"localhost:8080", false, true},
		{"[::ffff:127.0.0.1]:8080", false, true},
		{"0.0.0.0:8080", false, true},
		{"127.0.0.1:8080", true, false}, // both send it
		{"127.0.0.1:8081", false, false},
		{"127.0.0.2:8080", false, false},
	} {
		t.Run(fmt.Sprintf("%s proxyProtocol=%v", tc.app, tc.pp), func(t *testing.T) {
			err := cfg(tc.app, tc.pp).Validate()
			if !tc.refused {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			fe, ok := errors.AsType[*FieldError](err)
			if !ok || fe.Field != "inbound[1].proxyProtocol" || !strings.Contains(err.Error(), `inbound[0] "whoami"`) {
				t.Fatalf("Validate() = %v, want inbound[1].proxyProtocol refused naming inbound[0]", err)
			}
		})
	}
}

// TestApplyRefusesOtherOwnListenersAsApp: the sidecar's listeners outside
// the Config — the admin endpoint (/status, pprof when enabled) and the TLS
// test endpoint — are its own listeners too: an inbound app that reaches
// one, in any spelling, is refused, and the running config keeps serving.
func TestApplyRefusesOtherOwnListenersAsApp(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	good := &Config{Version: "1", TLS: identity.Modern(), Inbound: []Inbound{{Name: "web", Listen: "127.0.0.1:0", App: "127.0.0.1:8080"}}}
	s := startServer(t, identity.NewTLS(ca.Source(t, backendID)), good, Options{OwnListeners: map[string]string{
		"admin endpoint":    "127.0.0.1:15000",
		"TLS test endpoint": ":15443",
	}})
	for _, tc := range []struct{ app, own string }{
		{"127.0.0.1:15000", "admin endpoint"},
		{"localhost:15000", "admin endpoint"},
		{"[::ffff:127.0.0.1]:15000", "admin endpoint"},
		{"0.0.0.0:15000", "admin endpoint"},
		{"127.0.0.1:15443", "TLS test endpoint"},
		{"[::1]:15443", "TLS test endpoint"},
		{"127.0.0.2:15000", ""}, // the admin endpoint listens on 127.0.0.1 only
		{"127.0.0.1:15001", ""},
	} {
		t.Run(tc.app, func(t *testing.T) {
			err := s.Apply(&Config{Version: "2", TLS: identity.Modern(), Inbound: []Inbound{{Name: "web", Listen: "127.0.0.1:0", App: tc.app}}})
			if tc.own == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if err := s.Apply(good); err != nil {
					t.Fatal(err)
				}
				return
			}
			fe, ok := errors.AsType[*FieldError](err)
			if !ok || fe.Field != "inbound[0].app" || !strings.Contains(err.Error(), "this sidecar's "+tc.own) {
				t.Fatalf("Apply() = %v, want inbound[0].app refused as the %s", err, tc.own)
			}
			if v := s.Current().Version; v != "1" {
				t.Errorf("running config %q after a refused one, want 1", v)
			}
		})
	}
}

// TestInboundFederation: every foreign trust domain some inbound listener
// federates with, once each, in order; outbound federation is not a reason
// to answer a workload's call.
func TestInboundFederation(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString
	cfg := &Config{
		Inbound: []Inbound{
			{Name: "a", FederatesWith: []spiffeid.TrustDomain{td("b.test"), td("a.test")}},
			{Name: "b"},
			{Name: "c", FederatesWith: []spiffeid.TrustDomain{td("a.test"), td("c.test")}},
		},
		Outbound: []Outbound{{Name: "d", FederatesWith: []spiffeid.TrustDomain{td("d.test")}}},
	}
	if got := fmt.Sprint(cfg.InboundFederation()); got != "[b.test a.test c.test]" {
		t.Errorf("InboundFederation() = %s", got)
	}
	if got := (*Config)(nil).InboundFederation(); got != nil {
		t.Errorf("nil config: %v", got)
	}
}
