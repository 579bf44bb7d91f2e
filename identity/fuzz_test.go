package identity_test

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// FuzzParseRule: ParseRule never panics; an accepted rule round-trips through
// its own String form, matches its own operand (id, pathPrefix), never
// matches an ID of another trust domain, and a pathPrefix rule matches only
// on whole path segments. A refusal has a message.
func FuzzParseRule(f *testing.F) {
	for _, s := range [][3]string{
		{"id", "spiffe://mesh.test/ns/a/sa/b", "spiffe://mesh.test/ns/a/sa/b"},
		{"pathPrefix", "spiffe://mesh.test/ns/prod", "spiffe://mesh.test/ns/production"},
		{"pathPrefix", "spiffe://mesh.test/ns/prod", "spiffe://mesh.test/ns/prod/sa/x"},
		{"trustDomain", "mesh.test", "spiffe://other.test/x"},
		{"trustDomain", "spiffe://mesh.test", "spiffe://mesh.test/x"},
		{"trustDomain", "mesh.test/x", "spiffe://mesh.test/x"},
		{"trustDomain", "spiffe://mesh.test/ns/prod/sa/db-admin", "spiffe://mesh.test/ns/dev/sa/x"},
		{"pathPrefix", "spiffe://mesh.test", "spiffe://mesh.test/x"},
		{"pathPrefix", "spiffe://mesh.test/ns/", "spiffe://mesh.test/ns/x"},
		{"id", "spiffe://MESH.test/x", "spiffe://mesh.test/x"},
		{"id", "spiffe://mesh.test/../x", "spiffe://mesh.test/x"},
		{"id", "spiffe://mesh.test/x?y#z", "spiffe://mesh.test/x"},
		{"id", "spiffe://user@mesh.test:80/x", "spiffe://mesh.test/x"},
		{"id", "https://mesh.test/x", "spiffe://mesh.test/x"},
		{"ID", "spiffe://mesh.test/x", "spiffe://mesh.test/x"},
		{"", "", ""},
		{"id", "spiffe://mesh.test/x%2F", "spiffe://mesh.test/x"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, kind, value, peer string) {
		r, err := identity.ParseRule(kind, value)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if kind == "trustDomain" && r.Value() != value {
			// Nothing is dropped from what the operator wrote: a trust
			// domain rule is the bare name, exactly.
			t.Fatalf("trustDomain %q accepted as %s", value, r)
		}
		again, err := identity.ParseRule(r.Kind().String(), r.Value())
		if err != nil || again != r {
			t.Fatalf("rule %s does not round-trip: %v, %v", r, again, err)
		}
		if r.TrustDomain().IsZero() {
			t.Fatalf("rule %s has no trust domain", r)
		}
		if r.Kind() != identity.MatchTrustDomain {
			own := spiffeid.RequireFromString(r.Value())
			if !r.Matches(own) {
				t.Fatalf("rule %s does not match its own operand", r)
			}
		}
		id, err := spiffeid.FromString(peer)
		if err != nil {
			return
		}
		if !r.Matches(id) {
			return
		}
		if id.TrustDomain() != r.TrustDomain() {
			t.Fatalf("rule %s matches %s of another trust domain", r, id)
		}
		switch r.Kind() {
		case identity.MatchID:
			if id.String() != r.Value() {
				t.Fatalf("id rule %s matches %s", r, id)
			}
		case identity.MatchPathPrefix:
			want := spiffeid.RequireFromString(r.Value()).Path()
			if id.Path() != want && !strings.HasPrefix(id.Path(), want+"/") {
				t.Fatalf("pathPrefix rule %s matches %s off a segment boundary", r, id)
			}
		}
		if !identity.NewAllowList(r).Allows(id) || identity.NewAllowList().Allows(id) {
			t.Fatalf("allow-list of %s disagrees with the rule on %s (or the empty list allows it)", r, id)
		}
	})
}

// FuzzNarrow: Narrow never panics and never widens. A profile it returns
// keeps within the base profile (versions, suites, curves), leaves something
// usable for TLS 1.2 when TLS 1.2 is on, and passes the proxy's own check on
// profiles.
func FuzzNarrow(f *testing.F) {
	f.Add(false, uint16(0), uint16(0), []byte{}, []byte{})
	f.Add(true, uint16(tls.VersionTLS12), uint16(tls.VersionTLS13), []byte{0xc0, 0x2b}, []byte{0x11, 0xec})
	f.Add(true, uint16(tls.VersionTLS10), uint16(0), []byte{}, []byte{})
	f.Add(false, uint16(tls.VersionTLS12), uint16(0), []byte{}, []byte{})
	f.Add(true, uint16(0), uint16(0), []byte{0x00, 0x2f}, []byte{})           // TLS_RSA_WITH_AES_128_CBC_SHA
	f.Add(true, uint16(0), uint16(0), []byte{0xc0, 0x13}, []byte{0x00, 0x19}) // ECDHE-RSA-AES128-SHA, P-521
	f.Add(true, uint16(tls.VersionTLS13), uint16(tls.VersionTLS12), []byte{}, []byte{})
	f.Add(true, uint16(0xffff), uint16(0x0300), []byte{0xcc, 0xa9}, []byte{0x00, 0x1d})
	f.Fuzz(func(t *testing.T, intermediate bool, minV, maxV uint16, suites, curves []byte) {
		base := identity.Modern()
		if intermediate {
			base = identity.Intermediate()
		}
		params := identity.Params{MinVersion: minV, MaxVersion: maxV}
		for i := 0; i+1 < len(suites); i += 2 {
			params.CipherSuites = append(params.CipherSuites, uint16(suites[i])<<8|uint16(suites[i+1]))
		}
		for i := 0; i+1 < len(curves); i += 2 {
			params.Curves = append(params.Curves, tls.CurveID(uint16(curves[i])<<8|uint16(curves[i+1])))
		}
		p, err := base.Narrow(params)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if p.MinVersion < base.MinVersion || p.MaxVersion > base.MaxVersion || p.MinVersion > p.MaxVersion {
			t.Fatalf("versions %x..%x outside %s (%x..%x)", p.MinVersion, p.MaxVersion, base.Name, base.MinVersion, base.MaxVersion)
		}
		for _, s := range p.CipherSuites {
			if !slices.Contains(base.CipherSuites, s) {
				t.Fatalf("suite %s outside %s", tls.CipherSuiteName(s), base.Name)
			}
		}
		for _, c := range p.Curves {
			if !slices.Contains(base.Curves, c) {
				t.Fatalf("curve %s outside %s", c, base.Name)
			}
		}
		if len(p.Curves) == 0 {
			t.Fatal("no key exchange left")
		}
		if p.MinVersion <= tls.VersionTLS12 && len(p.CipherSuites) == 0 {
			t.Fatal("TLS 1.2 on with no suite")
		}
		if err := (&proxy.Config{TLS: p}).Validate(); err != nil {
			t.Fatalf("narrowed profile refused by proxy.Config.Validate: %v", err)
		}
	})
}
