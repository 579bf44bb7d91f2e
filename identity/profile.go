package identity

import (
	"crypto/tls"
	"fmt"
	"slices"
	"strings"
)

// Profile is the set of TLS parameters every latch connection is held to. The
// two named profiles are the widest latch will ever run; configuration and xDS
// may narrow a profile (Narrow) but never widen it.
//
// TLS 1.3 cipher suites are not listed: Go offers only AEAD suites there and
// does not let them be configured. CipherSuites applies to TLS 1.2.
type Profile struct {
	Name         string
	MinVersion   uint16
	MaxVersion   uint16
	CipherSuites []uint16
	Curves       []tls.CurveID
}

// Profile names.
const (
	ProfileModern       = "modern"
	ProfileIntermediate = "intermediate"
)

// Modern is the default profile: TLS 1.3 only, with the post-quantum hybrid
// key exchange preferred.
func Modern() Profile {
	return Profile{
		Name:       ProfileModern,
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		Curves:     []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256},
	}
}

// Intermediate adds TLS 1.2 with forward-secret (ECDHE) AEAD suites only: no
// CBC, no static RSA key exchange, no DHE (Go does not implement it).
func Intermediate() Profile {
	p := Modern()
	p.Name = ProfileIntermediate
	p.MinVersion = tls.VersionTLS12
	p.CipherSuites = []uint16{
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	}
	return p
}

// ProfileByName returns the named profile; "" means modern. Any other name is
// an error: there is no way to ask for something weaker.
func ProfileByName(name string) (Profile, error) {
	switch name {
	case "", ProfileModern:
		return Modern(), nil
	case ProfileIntermediate:
		return Intermediate(), nil
	}
	return Profile{}, fmt.Errorf("unknown TLS profile %q (want %q or %q)", name, ProfileModern, ProfileIntermediate)
}

// Params are the narrowing knobs of configuration files and of Envoy's
// TlsParameters. Zero values mean "keep the profile's".
type Params struct {
	MinVersion   uint16
	MaxVersion   uint16
	CipherSuites []uint16
	Curves       []tls.CurveID
}

// Narrow returns p restricted by params. A parameter that would widen the
// profile (an older version, a suite or curve the profile does not hold) is an
// error naming the setting; so is a combination that leaves nothing usable.
func (p Profile) Narrow(params Params) (Profile, error) {
	out := p.clone()
	if v := params.MinVersion; v != 0 {
		if v < p.MinVersion || v > p.MaxVersion {
			return Profile{}, fmt.Errorf("minVersion %s: outside profile %s (%s..%s)", VersionName(v), p.Name, VersionName(p.MinVersion), VersionName(p.MaxVersion))
		}
		out.MinVersion = v
	}
	if v := params.MaxVersion; v != 0 {
		if v < p.MinVersion || v > p.MaxVersion {
			return Profile{}, fmt.Errorf("maxVersion %s: outside profile %s (%s..%s)", VersionName(v), p.Name, VersionName(p.MinVersion), VersionName(p.MaxVersion))
		}
		out.MaxVersion = v
	}
	if out.MinVersion > out.MaxVersion {
		return Profile{}, fmt.Errorf("minVersion %s is above maxVersion %s", VersionName(out.MinVersion), VersionName(out.MaxVersion))
	}
	if len(params.CipherSuites) > 0 {
		for _, s := range params.CipherSuites {
			if !slices.Contains(p.CipherSuites, s) {
				return Profile{}, fmt.Errorf("cipherSuites: %s is not allowed by profile %s", tls.CipherSuiteName(s), p.Name)
			}
		}
		out.CipherSuites = slices.Clone(params.CipherSuites)
	}
	if len(params.Curves) > 0 {
		for _, c := range params.Curves {
			if !slices.Contains(p.Curves, c) {
				return Profile{}, fmt.Errorf("curves: %s is not allowed by profile %s", c, p.Name)
			}
		}
		out.Curves = slices.Clone(params.Curves)
	}
	if out.MinVersion <= tls.VersionTLS12 && len(out.CipherSuites) == 0 {
		return Profile{}, fmt.Errorf("cipherSuites: TLS 1.2 enabled but no suite left")
	}
	return out, nil
}

// Apply sets the profile's parameters on c. It leaves certificates and
// verification alone.
func (p Profile) Apply(c *tls.Config) {
	c.MinVersion = p.MinVersion
	c.MaxVersion = p.MaxVersion
	c.CipherSuites = slices.Clone(p.CipherSuites)
	c.CurvePreferences = slices.Clone(p.Curves)
	c.Renegotiation = tls.RenegotiateNever
}

func (p Profile) clone() Profile {
	p.CipherSuites = slices.Clone(p.CipherSuites)
	p.Curves = slices.Clone(p.Curves)
	return p
}

// VersionName is the conventional name of a TLS version ("TLS 1.3").
func VersionName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLS 1.0"
	case tls.VersionTLS11:
		return "TLS 1.1"
	case tls.VersionTLS12:
		return "TLS 1.2"
	case tls.VersionTLS13:
		return "TLS 1.3"
	case 0x0300:
		return "SSL 3.0"
	}
	return fmt.Sprintf("0x%04x", v)
}

// ParseVersion accepts "1.2", "TLS1.2", "TLS 1.2", "TLSv1.2", "TLSv1_2" (Envoy's
// spelling) and their 1.0, 1.1, 1.3 counterparts. Versions below TLS 1.2 parse
// (so the error can say they are too weak, rather than unknown).
func ParseVersion(s string) (uint16, error) {
	n := strings.ToUpper(strings.TrimSpace(s))
	n = strings.TrimPrefix(n, "TLS")
	n = strings.TrimPrefix(n, "V")
	n = strings.TrimSpace(strings.ReplaceAll(n, "_", "."))
	switch n {
	case "1.0", "1":
		return tls.VersionTLS10, nil
	case "1.1":
		return tls.VersionTLS11, nil
	case "1.2":
		return tls.VersionTLS12, nil
	case "1.3":
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("unknown TLS version %q", s)
}

// openSSLSuiteNames maps the OpenSSL names Envoy uses in TlsParameters to Go's
// suite IDs, for the suites Go implements.
var openSSLSuiteNames = map[string]uint16{
	"ECDHE-ECDSA-AES128-GCM-SHA256": tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	"ECDHE-ECDSA-AES256-GCM-SHA384": tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	"ECDHE-ECDSA-CHACHA20-POLY1305": tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	"ECDHE-RSA-AES128-GCM-SHA256":   tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	"ECDHE-RSA-AES256-GCM-SHA384":   tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	"ECDHE-RSA-CHACHA20-POLY1305":   tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	"ECDHE-ECDSA-AES128-SHA":        tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
	"ECDHE-RSA-AES128-SHA":          tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA,
	"ECDHE-ECDSA-AES256-SHA":        tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
	"ECDHE-RSA-AES256-SHA":          tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA,
	"AES128-GCM-SHA256":             tls.TLS_RSA_WITH_AES_128_GCM_SHA256,
	"AES256-GCM-SHA384":             tls.TLS_RSA_WITH_AES_256_GCM_SHA384,
	"AES128-SHA":                    tls.TLS_RSA_WITH_AES_128_CBC_SHA,
	"AES256-SHA":                    tls.TLS_RSA_WITH_AES_256_CBC_SHA,
}

// ParseCipherSuite accepts an IANA name (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
// or an OpenSSL name (ECDHE-ECDSA-AES128-GCM-SHA256). Weak suites parse, so that
// Narrow can refuse them by name.
func ParseCipherSuite(s string) (uint16, error) {
	for _, list := range [][]*tls.CipherSuite{tls.CipherSuites(), tls.InsecureCipherSuites()} {
		for _, cs := range list {
			if cs.Name == s {
				return cs.ID, nil
			}
		}
	}
	if id, ok := openSSLSuiteNames[s]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("unknown or unsupported cipher suite %q", s)
}

// ParseCurve accepts X25519MLKEM768, X25519, P-256 (also P256, secp256r1,
// prime256v1), P-384 and P-521.
func ParseCurve(s string) (tls.CurveID, error) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "X25519MLKEM768":
		return tls.X25519MLKEM768, nil
	case "X25519":
		return tls.X25519, nil
	case "P-256", "P256", "SECP256R1", "PRIME256V1":
		return tls.CurveP256, nil
	case "P-384", "P384", "SECP384R1":
		return tls.CurveP384, nil
	case "P-521", "P521", "SECP521R1":
		return tls.CurveP521, nil
	}
	return 0, fmt.Errorf("unknown curve %q", s)
}
