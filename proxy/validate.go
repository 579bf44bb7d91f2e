package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// FieldError is a Validate failure tied to one field of a Config, named by a
// path in the configuration file's spelling ("inbound[1].listen"). Parse turns
// it into a file:line:col error; a Config built elsewhere (xDS) reports the
// path as is.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// maxNameLen bounds listener names: they become metric label values and log
// fields, so they must stay short and printable.
const maxNameLen = 64

// Validate checks the whole snapshot and returns the first problem found. A
// Config that passes can be applied: every address parses, names and listen
// addresses are unique, outbound listeners are on loopback, no inbound
// listener's app is one of the Config's own listeners, every outbound has a
// server ID and at least one upstream, limits are not negative, and the TLS
// profile is no weaker than intermediate.
func (c *Config) Validate() error {
	if c == nil {
		return errors.New("no config")
	}
	if err := validateProfile(c.TLS); err != nil {
		return err
	}
	names := make(map[string]string)   // name → field that declared it
	listens := make(map[string]string) // listen address → field that declared it
	unique := func(field, name, listen string) error {
		if prev, ok := names[name]; ok {
			return &FieldError{field + ".name", fmt.Errorf("listener name %q already used by %s", name, prev)}
		}
		names[name] = field
		// Port 0 asks the kernel for a fresh port each time, so two such
		// listeners never collide.
		if _, port, _ := net.SplitHostPort(listen); port != "0" {
			if prev, ok := listens[listen]; ok {
				return &FieldError{field + ".listen", fmt.Errorf("address %s already used by %s", listen, prev)}
			}
			listens[listen] = field
		}
		return nil
	}
	for i, in := range c.Inbound {
		f := fmt.Sprintf("inbound[%d]", i)
		if err := validateName(f, in.Name); err != nil {
			return err
		}
		if err := validateHostPort(in.Listen, true); err != nil {
			return &FieldError{f + ".listen", err}
		}
		if err := validateHostPort(in.App, false); err != nil {
			return &FieldError{f + ".app", err}
		}
		if err := validateLimits(f, in.HandshakeTimeout, in.IdleTimeout, in.ConnectTimeout, in.MaxConnections); err != nil {
			return err
		}
		if err := unique(f, in.Name, in.Listen); err != nil {
			return err
		}
		if err := validateTrustDomains(f+".federatesWith", in.FederatesWith); err != nil {
			return err
		}
	}
	for i, out := range c.Outbound {
		f := fmt.Sprintf("outbound[%d]", i)
		if err := validateName(f, out.Name); err != nil {
			return err
		}
		if err := validateHostPort(out.Listen, true); err != nil {
			return &FieldError{f + ".listen", err}
		}
		if err := requireLoopback(out.Listen); err != nil {
			return &FieldError{f + ".listen", err}
		}
		if len(out.Upstreams) == 0 {
			return &FieldError{f + ".upstreams", errors.New("at least one upstream is required")}
		}
		for j, u := range out.Upstreams {
			if err := validateHostPort(u, false); err != nil {
				return &FieldError{fmt.Sprintf("%s.upstreams[%d]", f, j), err}
			}
		}
		if out.ServerID.IsZero() {
			return &FieldError{f + ".serverID", errors.New("required: the SPIFFE ID the upstream must prove")}
		}
		if err := validateLimits(f, out.HandshakeTimeout, out.IdleTimeout, out.ConnectTimeout, out.MaxConnections); err != nil {
			return err
		}
		if err := unique(f, out.Name, out.Listen); err != nil {
			return err
		}
		if err := validateTrustDomains(f+".federatesWith", out.FederatesWith); err != nil {
			return err
		}
	}
	for i, in := range c.Inbound {
		if field, listen := c.ownListener(in.App); field != "" {
			return &FieldError{fmt.Sprintf("inbound[%d].app", i), fmt.Errorf("%q is this sidecar's own listener %s (listen %q): a peer admitted here would reach it through the sidecar, as this workload", in.App, field, listen)}
		}
		// An app that reads the PROXY protocol header from one listener
		// would read one a peer of the other wrote as latch's.
		for j, o := range c.Inbound[:i] {
			if o.ProxyProtocol != in.ProxyProtocol && Reaches(in.App, o.App) {
				return &FieldError{fmt.Sprintf("inbound[%d].proxyProtocol", i), fmt.Errorf("inbound[%d] %q and inbound[%d] %q share the app %s, and only one of them sends it a PROXY protocol header: a peer of the other could write a header of its own, naming any SPIFFE ID, where the app reads latch's", j, o.Name, i, in.Name, in.App)}
			}
		}
	}
	return nil
}

func validateTrustDomains(field string, tds []spiffeid.TrustDomain) error {
	for i, td := range tds {
		if td.IsZero() {
			return &FieldError{fmt.Sprintf("%s[%d]", field, i), errors.New("empty trust domain")}
		}
		if slices.Contains(tds[:i], td) {
			return &FieldError{fmt.Sprintf("%s[%d]", field, i), fmt.Errorf("%s listed twice", td.Name())}
		}
	}
	return nil
}

// validateFederation is the part of validation that needs the local trust
// domain, which a Config does not hold: Apply runs it with the SVID's. A
// listener federating with the local trust domain names nothing (its peers
// are always accepted), and is probably a mistake for another name; an
// outbound listener whose server ID is in a foreign trust domain it does
// not federate with would refuse every server.
func validateFederation(c *Config, local spiffeid.TrustDomain) error {
	for i, in := range c.Inbound {
		if j := slices.Index(in.FederatesWith, local); j >= 0 {
			return &FieldError{fmt.Sprintf("inbound[%d].federatesWith[%d]", i, j), fmt.Errorf("%s is the local trust domain, whose peers are always accepted: list only foreign trust domains", local.Name())}
		}
	}
	for i, out := range c.Outbound {
		if j := slices.Index(out.FederatesWith, local); j >= 0 {
			return &FieldError{fmt.Sprintf("outbound[%d].federatesWith[%d]", i, j), fmt.Errorf("%s is the local trust domain, whose servers are always accepted: list only foreign trust domains", local.Name())}
		}
		if td := out.ServerID.TrustDomain(); td != local && !slices.Contains(out.FederatesWith, td) {
			return &FieldError{fmt.Sprintf("outbound[%d].serverID", i), fmt.Errorf("%s is in trust domain %s, neither the local trust domain %s nor one this listener federates with: add %s to federatesWith",
				out.ServerID, td.Name(), local.Name(), td.Name())}
		}
	}
	return nil
}

// ownListener returns the field and listen address of the listener of c that
// a connection to app would reach, "" if none. An inbound listener whose app
// is an outbound listener would hand every admitted peer the upstream behind
// it, with this workload's identity; one whose app is an inbound listener
// loops. Addresses are compared as the kernel would route them: the port,
// then the host, where a wildcard listener (0.0.0.0, ::, or no host) takes
// any address of this host, localhost is 127.0.0.1 and ::1, and 0.0.0.0 or ::
// dialed is this host. A DNS name other than localhost is not resolved.
func (c *Config) ownListener(app string) (field, listen string) {
	for i, in := range c.Inbound {
		if Reaches(app, in.Listen) {
			return fmt.Sprintf("inbound[%d] %q", i, in.Name), in.Listen
		}
	}
	for i, out := range c.Outbound {
		if Reaches(app, out.Listen) {
			return fmt.Sprintf("outbound[%d] %q", i, out.Name), out.Listen
		}
	}
	return "", ""
}

// Reaches says whether dialing app can reach a socket bound to listen on
// this host, as Validate compares addresses (see ownListener); two app
// addresses that may be the same socket reach each other. A listen address
// with port 0 has no port yet and reaches nothing.
func Reaches(app, listen string) bool {
	appHost, appPort, err := net.SplitHostPort(app)
	if err != nil {
		return false
	}
	host, port, err := net.SplitHostPort(listen)
	return err == nil && port != "0" && samePort(port, appPort) && sameHost(appHost, host)
}

// validateApps is the part of validation that needs the sidecar's
// listeners outside the Config (Options.OwnListeners): Apply runs it. The
// admin endpoint serves /status (the policy, the peers) and, when enabled,
// pprof; the TLS test endpoint answers as this workload. Neither is for an
// admitted peer to reach through the sidecar.
func validateApps(c *Config, own map[string]string) error {
	names := slices.Sorted(maps.Keys(own))
	for i, in := range c.Inbound {
		for _, name := range names {
			if Reaches(in.App, own[name]) {
				return &FieldError{fmt.Sprintf("inbound[%d].app", i), fmt.Errorf("%q is this sidecar's %s (listen %q): a peer admitted here would reach it through the sidecar", in.App, name, own[name])}
			}
		}
	}
	return nil
}

func samePort(a, b string) bool {
	x, errX := strconv.ParseUint(a, 10, 16)
	y, errY := strconv.ParseUint(b, 10, 16)
	return errX == nil && errY == nil && x == y
}

// sameHost says whether dialing appHost can reach a socket bound to
// listenHost on this host.
func sameHost(appHost, listenHost string) bool {
	apps, appAny := hostAddrs(appHost)
	listens, listenAny := hostAddrs(listenHost)
	if appAny {
		// Dialing the unspecified address connects to this host.
		return listenAny || len(listens) > 0
	}
	for _, a := range apps {
		if listenAny && (a.IsLoopback() || isLocalAddr(a)) {
			return true
		}
		for _, l := range listens {
			if a == l {
				return true
			}
		}
	}
	return false
}

// hostAddrs returns the addresses a host stands for, or any for a wildcard
// (the empty host, 0.0.0.0, ::). A DNS name other than localhost gives none.
func hostAddrs(host string) (addrs []netip.Addr, any bool) {
	if host == "" {
		return nil, true
	}
	if strings.EqualFold(host, "localhost") {
		return []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}, false
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return nil, false
	}
	ip = ip.Unmap().WithZone("")
	if ip.IsUnspecified() {
		return nil, true
	}
	return []netip.Addr{ip}, false
}

// isLocalAddr says whether a is an address of one of this host's interfaces
// (a pod IP, say), which a wildcard listener also accepts on. It is a
// variable for tests.
var isLocalAddr = func(a netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, ia := range addrs {
		if p, err := netip.ParsePrefix(ia.String()); err == nil && p.Addr().Unmap() == a {
			return true
		}
	}
	return false
}

func validateName(field, name string) error {
	if err := CheckName(name); err != nil {
		return &FieldError{field + ".name", err}
	}
	return nil
}

// CheckName is the rule for listener names, shared with the xDS validation so
// that a name the control plane sends is refused there (NACKed) rather than
// accepted and then failing the config check. Names become metric labels and
// log fields, hence the short plain alphabet.
func CheckName(name string) error {
	switch {
	case name == "":
		return errors.New("required")
	case len(name) > maxNameLen:
		return fmt.Errorf("%q is longer than %d characters", name, maxNameLen)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.:|", r)) {
			return fmt.Errorf("%q: only letters, digits and - _ . : | are allowed", name)
		}
	}
	return nil
}

// validateHostPort accepts host:port with a numeric port. A listen address may
// leave the host empty (all interfaces) and use port 0 (any free port); an
// address to dial may not.
func validateHostPort(addr string, listen bool) error {
	if addr == "" {
		return errors.New("required (host:port)")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %w", addr, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return fmt.Errorf("%q: port %q is not a number from 0 to 65535", addr, port)
	}
	if !listen {
		if host == "" {
			return fmt.Errorf("%q: host is empty", addr)
		}
		if n == 0 {
			return fmt.Errorf("%q: port 0 cannot be dialed", addr)
		}
	}
	if err := CheckHost(host); err != nil {
		return fmt.Errorf("%q: %w", addr, err)
	}
	return nil
}

// CheckHost is the sidecar's rule for the host part of an address. The
// stages before it (declarations, xDS validation, pod annotations) apply the
// same function, so that nothing they accept is refused by the sidecar later.
//
// A host is an IP address (IPv6 with a zone too) or a DNS name: ASCII letters,
// digits, '-', '_' and '.', at most 253 characters. Anything else (spaces,
// slashes, control or non-UTF-8 bytes) could not be dialed, and would not
// survive the trip through a YAML file either. The empty host is the
// caller's to allow (a listen address) or refuse.
func CheckHost(host string) error {
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if len(host) > 253 {
		return fmt.Errorf("host name of %d characters is longer than 253", len(host))
	}
	for i := 0; i < len(host); i++ {
		b := host[i]
		if !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '-' || b == '_' || b == '.') {
			return fmt.Errorf("host %q is not a host name or IP address", host)
		}
	}
	return nil
}

// requireLoopback refuses any outbound listen address that is not loopback:
// an outbound listener lends the sidecar's identity to whoever connects, so
// reachable from the network it would be an open relay into the mesh.
func requireLoopback(addr string) error {
	host, _, _ := net.SplitHostPort(addr)
	if !IsLoopbackHost(host) {
		return fmt.Errorf("%q: outbound listeners must listen on a loopback address (127.0.0.1, ::1 or localhost): anything else would let the network use this workload's identity", addr)
	}
	return nil
}

// IsLoopbackHost says whether host, the host part of an address, is a
// loopback address (127.0.0.0/8 or ::1, without a zone; IPv4 also written
// as an IPv4-mapped IPv6 address) or the name localhost. The xDS validation holds inbound app
// addresses to it.
func IsLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Zone() == "" && ip.Unmap().IsLoopback()
}

func validateLimits(field string, handshake, idle, connect time.Duration, maxConns int) error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"handshakeTimeout", handshake}, {"idleTimeout", idle}, {"connectTimeout", connect}} {
		if d.v < 0 {
			return &FieldError{field + "." + d.name, fmt.Errorf("%v is negative", d.v)}
		}
	}
	if maxConns < 0 {
		return &FieldError{field + ".maxConnections", fmt.Errorf("%d is negative", maxConns)}
	}
	return nil
}

// validateProfile refuses a profile wider than intermediate. The zero Profile
// stands for modern. Profiles from identity.ProfileByName and Narrow always
// pass; this guards Configs assembled by hand or from xDS.
func validateProfile(p identity.Profile) error {
	if p.Name == "" && p.MinVersion == 0 && p.MaxVersion == 0 && p.CipherSuites == nil && p.Curves == nil {
		return nil
	}
	if p.Name != identity.ProfileModern && p.Name != identity.ProfileIntermediate {
		return &FieldError{"tls.profile", fmt.Errorf("unknown TLS profile %q (want %q or %q)", p.Name, identity.ProfileModern, identity.ProfileIntermediate)}
	}
	if p.MinVersion < tls.VersionTLS12 {
		return &FieldError{"tls.minVersion", fmt.Errorf("%s is below TLS 1.2", identity.VersionName(p.MinVersion))}
	}
	if p.MaxVersion != 0 && p.MaxVersion < p.MinVersion {
		return &FieldError{"tls.maxVersion", fmt.Errorf("%s is below minVersion %s", identity.VersionName(p.MaxVersion), identity.VersionName(p.MinVersion))}
	}
	allowed := identity.Intermediate()
	for _, s := range p.CipherSuites {
		if !slices.Contains(allowed.CipherSuites, s) {
			return &FieldError{"tls.cipherSuites", fmt.Errorf("%s is not an ECDHE AEAD suite", tls.CipherSuiteName(s))}
		}
	}
	if p.MinVersion <= tls.VersionTLS12 && len(p.CipherSuites) == 0 {
		return &FieldError{"tls.cipherSuites", errors.New("TLS 1.2 enabled but no cipher suite given")}
	}
	for _, c := range p.Curves {
		if !slices.Contains(allowed.Curves, c) {
			return &FieldError{"tls.curves", fmt.Errorf("%s is not allowed", c)}
		}
	}
	return nil
}

// orDuration returns d, or def when d is zero.
func orDuration(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func orInt(n, def int) int {
	if n == 0 {
		return def
	}
	return n
}
