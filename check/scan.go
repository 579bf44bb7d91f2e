package check

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"time"

	"latch.dev/latch/identity"
)

// Probe is one parameter Scan tried.
type Probe struct {
	Name     string `json:"name"`
	Accepted bool   `json:"accepted"`
	// Negotiated is what the server chose when it accepted: the version of a
	// suite or group probe, the suite of a version probe.
	Negotiated string `json:"negotiated,omitempty"`
	// Class and Error say why it was not accepted.
	Class Class  `json:"class,omitempty"`
	Error string `json:"error,omitempty"`
	// OutsideProfile marks a parameter latch's profiles never offer; a
	// server accepting it serves clients latch would not be.
	OutsideProfile bool `json:"outside_latch_profile,omitempty"`
}

// ScanResult lists what the server accepted, one parameter at a time.
type ScanResult struct {
	Addr         string  `json:"addr"`
	Versions     []Probe `json:"versions"`
	CipherSuites []Probe `json:"tls12_cipher_suites"`
	Groups       []Probe `json:"groups"`
}

// scanGroups are the key exchange groups Go's TLS stack implements.
var scanGroups = []tls.CurveID{
	tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024,
	tls.X25519, tls.CurveP256, tls.CurveP384, tls.CurveP521,
}

// Scan tries each TLS version, each TLS 1.2 cipher suite and each key
// exchange group on its own, with the local SVID as client certificate, and
// lists which the server accepts. Each probe is a complete handshake with a
// configuration restricted to the one parameter (and everything else as
// wide as Go's TLS stack goes), so the answer is the server's.
//
// Scan does not verify the server: it asks what the server speaks, not
// whether it is trusted (that is Run's job), and sends nothing after the
// handshake. Timeout bounds each probe.
func Scan(ctx context.Context, opts Options) (*ScanResult, error) {
	opts.defaults()
	if _, err := opts.TLS.LocalCertificate(); err != nil {
		return nil, &Error{Class: ClassNoLocalIdentity, Addr: opts.Addr, Stage: "identity", Err: err}
	}
	base := opts.TLS.ClientConfig(identity.Intermediate(), opts.ServerID).Clone()
	base.VerifyConnection = nil
	base.ClientSessionCache = nil
	base.ServerName = opts.ServerName
	// InsecureSkipVerify is already set by identity (its verification lives
	// in VerifyConnection, removed above).
	base.InsecureSkipVerify = true

	allSuites := suitesFor(tls.VersionTLS12)
	res := &ScanResult{Addr: opts.Addr}
	latchSuites := identity.Intermediate().CipherSuites
	latchGroups := identity.Intermediate().Curves

	// First a probe that must reach the server at all; if it cannot, every
	// probe would fail the same way and the scan says nothing.
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11, tls.VersionTLS12, tls.VersionTLS13} {
		cfg := base.Clone()
		cfg.MinVersion, cfg.MaxVersion = v, v
		cfg.CipherSuites = suitesFor(v)
		cfg.CurvePreferences = nil
		p := probe(ctx, opts, cfg, identity.VersionName(v), func(cs tls.ConnectionState) string {
			return tls.CipherSuiteName(cs.CipherSuite) + " " + identity.GroupName(cs.CurveID)
		})
		p.OutsideProfile = v < tls.VersionTLS12
		if p.Class == ClassUnreachable || p.Class == ClassTimeout {
			return nil, &Error{Class: p.Class, Addr: opts.Addr, Stage: "scan", Err: fmt.Errorf("%s", p.Error)}
		}
		res.Versions = append(res.Versions, p)
	}
	for _, s := range allSuites {
		cfg := base.Clone()
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
		cfg.CipherSuites = []uint16{s}
		cfg.CurvePreferences = nil
		p := probe(ctx, opts, cfg, tls.CipherSuiteName(s), func(cs tls.ConnectionState) string {
			return identity.VersionName(cs.Version) + " " + identity.GroupName(cs.CurveID)
		})
		p.OutsideProfile = !slices.Contains(latchSuites, s)
		res.CipherSuites = append(res.CipherSuites, p)
	}
	for _, g := range scanGroups {
		cfg := base.Clone()
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS13
		cfg.CipherSuites = allSuites
		cfg.CurvePreferences = []tls.CurveID{g}
		p := probe(ctx, opts, cfg, identity.GroupName(g), func(cs tls.ConnectionState) string {
			return identity.VersionName(cs.Version)
		})
		p.OutsideProfile = !slices.Contains(latchGroups, g)
		res.Groups = append(res.Groups, p)
	}
	return res, nil
}

func probe(ctx context.Context, opts Options, cfg *tls.Config, name string, negotiated func(tls.ConnectionState) string) Probe {
	p := Probe{Name: name}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", opts.Addr)
	if err != nil {
		p.Class, p.Error = dialClass(err), err.Error()
		return p
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	} else {
		_ = raw.SetDeadline(time.Now().Add(opts.Timeout))
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		p.Class, p.Error = handshakeClass(err), err.Error()
		return p
	}
	p.Accepted = true
	p.Negotiated = negotiated(conn.ConnectionState())
	_ = conn.Close()
	return p
}

// suitesFor lists every suite Go's TLS stack can offer for version v,
// insecure ones included: a scan has to ask for them to see whether the
// server would accept them. TLS 1.3 suites are not configurable (nil).
func suitesFor(v uint16) []uint16 {
	if v == tls.VersionTLS13 {
		return nil
	}
	var out []uint16
	for _, list := range [][]*tls.CipherSuite{tls.CipherSuites(), tls.InsecureCipherSuites()} {
		for _, cs := range list {
			if slices.Contains(cs.SupportedVersions, v) {
				out = append(out, cs.ID)
			}
		}
	}
	return out
}

// Err returns nil when the server accepted at least one probe, and otherwise
// an *Error saying so: a server that accepts nothing latch could offer is a
// failed check, whatever the table shows. Its class is why the TLS 1.3 probe
// failed, TLS 1.3 being what latch speaks by default (a plaintext port gives
// not_tls, a server stuck below TLS 1.2 protocol_version).
func (r *ScanResult) Err() error {
	var all []Probe
	for _, ps := range [][]Probe{r.Versions, r.CipherSuites, r.Groups} {
		all = append(all, ps...)
	}
	for _, p := range all {
		if p.Accepted {
			return nil
		}
	}
	class, reason := ClassOther, "no probe was made"
	for _, p := range r.Versions {
		class, reason = p.Class, p.Error
	}
	return &Error{Class: class, Addr: r.Addr, Stage: "scan",
		Err: fmt.Errorf("the server accepted none of the %d probes (TLS 1.3: %s)", len(all), reason)}
}
