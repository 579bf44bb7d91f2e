package proxy

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"

	"latch.dev/latch/identity"
)

// ConfigError is an error in a configuration file, with the position of the
// offending node. Line and Col are 1-based; Col is 0 when the YAML parser
// reported only a line.
type ConfigError struct {
	File string
	Line int
	Col  int
	// Field is the path of the offending setting ("inbound[0].allow[1]"),
	// empty for a syntax error.
	Field string
	Err   error
}

func (e *ConfigError) Error() string {
	pos := e.File + ":" + strconv.Itoa(e.Line)
	if e.Col > 0 {
		pos += ":" + strconv.Itoa(e.Col)
	}
	if e.Field == "" {
		return pos + ": " + e.Err.Error()
	}
	return pos + ": " + e.Field + ": " + e.Err.Error()
}

func (e *ConfigError) Unwrap() error { return e.Err }

// LoadFile reads and parses the static YAML configuration at path. The
// returned Config is validated; its Source is "file:<path>" and its Version a
// short hash of the file's content. Every error names the file, line and
// column.
func LoadFile(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading proxy config: %w", err)
	}
	return Parse(path, data)
}

// Parse parses a static YAML configuration; name is the file name used in
// errors and in Source. Unknown keys are errors, durations are Go durations
// ("5m", "10s"), and the result is validated.
func Parse(name string, data []byte) (*Config, error) {
	p := &parser{file: name, pos: make(map[string]*yaml.Node)}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, p.syntaxError(err)
	}
	cfg := &Config{
		Version: contentVersion(data),
		Source:  "file:" + name,
		TLS:     identity.Modern(),
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return nil, &ConfigError{File: name, Line: 1, Err: errors.New("empty configuration")}
	}
	if err := p.config(doc.Content[0], cfg); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, p.fieldError(err)
	}
	return cfg, nil
}

// contentVersion is the first 12 hex digits of the SHA-256 of the file: short
// enough for a log line, long enough to tell two revisions apart.
func contentVersion(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:6])
}

type parser struct {
	file string
	// pos maps a field path to the node it was read from, so that Validate's
	// FieldErrors can be reported at the right line.
	pos map[string]*yaml.Node
}

func (p *parser) errAt(n *yaml.Node, field string, err error) error {
	return &ConfigError{File: p.file, Line: n.Line, Col: n.Column, Field: field, Err: err}
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

func (p *parser) syntaxError(err error) error {
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &ConfigError{File: p.file, Line: line, Err: errors.New(m[2])}
	}
	return &ConfigError{File: p.file, Line: 1, Err: err}
}

// fieldError places a Validate error at the node of its field, or of the
// nearest enclosing node that was read.
func (p *parser) fieldError(err error) error {
	fe, ok := errors.AsType[*FieldError](err)
	if !ok {
		return &ConfigError{File: p.file, Line: 1, Err: err}
	}
	for path := fe.Field; path != ""; path = parentPath(path) {
		if n, ok := p.pos[path]; ok {
			return p.errAt(n, fe.Field, fe.Err)
		}
	}
	return &ConfigError{File: p.file, Line: 1, Field: fe.Field, Err: fe.Err}
}

func parentPath(path string) string {
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '.' || path[i] == '[' {
			return path[:i]
		}
	}
	return ""
}

// fields walks a mapping node, calling set for each key and refusing unknown
// and repeated keys.
func (p *parser) fields(n *yaml.Node, path string, known []string, set func(key string, v *yaml.Node, field string) error) error {
	if n.Kind != yaml.MappingNode {
		return p.errAt(n, path, fmt.Errorf("expected a mapping, got %s", kindName(n)))
	}
	p.pos[path] = n
	seen := make(map[string]bool)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		field := k.Value
		if path != "" {
			field = path + "." + k.Value
		}
		if !slices.Contains(known, k.Value) {
			return p.errAt(k, field, fmt.Errorf("unknown key %q (known: %v)", k.Value, known))
		}
		if seen[k.Value] {
			return p.errAt(k, field, errors.New("key given twice"))
		}
		seen[k.Value] = true
		p.pos[field] = v
		if err := set(k.Value, v, field); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) items(n *yaml.Node, path string, each func(i int, v *yaml.Node, field string) error) error {
	if n.Kind != yaml.SequenceNode {
		return p.errAt(n, path, fmt.Errorf("expected a list, got %s", kindName(n)))
	}
	for i, v := range n.Content {
		field := fmt.Sprintf("%s[%d]", path, i)
		p.pos[field] = v
		if err := each(i, v, field); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) str(n *yaml.Node, field string) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", p.errAt(n, field, fmt.Errorf("expected a string, got %s", kindName(n)))
	}
	return n.Value, nil
}

func (p *parser) strings(n *yaml.Node, field string) ([]string, error) {
	var out []string
	err := p.items(n, field, func(_ int, v *yaml.Node, f string) error {
		s, err := p.str(v, f)
		out = append(out, s)
		return err
	})
	return out, err
}

func (p *parser) duration(n *yaml.Node, field string) (time.Duration, error) {
	s, err := p.str(n, field)
	if err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, p.errAt(n, field, fmt.Errorf("%q is not a duration such as 10s or 5m", s))
	}
	if d < 0 {
		return 0, p.errAt(n, field, fmt.Errorf("%s is negative", s))
	}
	return d, nil
}

func (p *parser) bool(n *yaml.Node, field string) (bool, error) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
		return false, p.errAt(n, field, fmt.Errorf("expected true or false, got %s", kindName(n)))
	}
	var v bool
	if err := n.Decode(&v); err != nil {
		return false, p.errAt(n, field, err)
	}
	return v, nil
}

func (p *parser) int(n *yaml.Node, field string) (int, error) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		return 0, p.errAt(n, field, fmt.Errorf("expected an integer, got %q", n.Value))
	}
	v, err := strconv.Atoi(n.Value)
	if err != nil {
		return 0, p.errAt(n, field, fmt.Errorf("%q: %w", n.Value, err))
	}
	if v < 0 {
		return 0, p.errAt(n, field, fmt.Errorf("%d is negative", v))
	}
	return v, nil
}

func (p *parser) config(n *yaml.Node, cfg *Config) error {
	return p.fields(n, "", []string{"tls", "inbound", "outbound"}, func(key string, v *yaml.Node, field string) error {
		switch key {
		case "tls":
			prof, err := p.tls(v, field)
			cfg.TLS = prof
			return err
		case "inbound":
			return p.items(v, field, func(_ int, item *yaml.Node, f string) error {
				in, err := p.inbound(item, f)
				cfg.Inbound = append(cfg.Inbound, in)
				return err
			})
		case "outbound":
			return p.items(v, field, func(_ int, item *yaml.Node, f string) error {
				out, err := p.outbound(item, f)
				cfg.Outbound = append(cfg.Outbound, out)
				return err
			})
		}
		return nil
	})
}

// tls reads the profile name first, then narrows it by the other settings:
// configuration can only ever make the profile stricter.
func (p *parser) tls(n *yaml.Node, path string) (identity.Profile, error) {
	var name string
	var params identity.Params
	nodes := make(map[string]*yaml.Node)
	err := p.fields(n, path, []string{"profile", "minVersion", "maxVersion", "cipherSuites", "curves"}, func(key string, v *yaml.Node, field string) error {
		nodes[key] = v
		switch key {
		case "profile":
			s, err := p.str(v, field)
			if err != nil {
				return err
			}
			if _, err := identity.ProfileByName(s); err != nil || s == "" {
				return p.errAt(v, field, fmt.Errorf("unknown TLS profile %q (want %q or %q; nothing weaker can be configured)", s, identity.ProfileModern, identity.ProfileIntermediate))
			}
			name = s
		case "minVersion", "maxVersion":
			s, err := p.str(v, field)
			if err != nil {
				return err
			}
			ver, err := identity.ParseVersion(s)
			if err != nil {
				return p.errAt(v, field, err)
			}
			if ver < tls.VersionTLS12 {
				return p.errAt(v, field, fmt.Errorf("%s is too weak: latch speaks TLS 1.2 (intermediate profile) and TLS 1.3 only", identity.VersionName(ver)))
			}
			if key == "minVersion" {
				params.MinVersion = ver
			} else {
				params.MaxVersion = ver
			}
		case "cipherSuites":
			return p.items(v, field, func(_ int, item *yaml.Node, f string) error {
				s, err := p.str(item, f)
				if err != nil {
					return err
				}
				id, err := identity.ParseCipherSuite(s)
				if err != nil {
					return p.errAt(item, f, err)
				}
				if !slices.Contains(identity.Intermediate().CipherSuites, id) {
					return p.errAt(item, f, fmt.Errorf("%s is not allowed: only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); no CBC, no static RSA", s))
				}
				params.CipherSuites = append(params.CipherSuites, id)
				return nil
			})
		case "curves":
			return p.items(v, field, func(_ int, item *yaml.Node, f string) error {
				s, err := p.str(item, f)
				if err != nil {
					return err
				}
				c, err := identity.ParseCurve(s)
				if err != nil {
					return p.errAt(item, f, err)
				}
				params.Curves = append(params.Curves, c)
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return identity.Profile{}, err
	}
	prof, _ := identity.ProfileByName(name)
	narrowed, err := prof.Narrow(params)
	if err != nil {
		// Narrow's errors start with the name of the setting at fault.
		at, field := n, path
		for key, v := range nodes {
			if strings.HasPrefix(err.Error(), key) {
				at, field = v, path+"."+key
			}
		}
		return identity.Profile{}, p.errAt(at, field, err)
	}
	return narrowed, nil
}

var limitKeys = []string{"handshakeTimeout", "idleTimeout", "connectTimeout", "maxConnections"}

// limits reads the timeouts and connection limit shared by both directions.
func (p *parser) limits(key string, v *yaml.Node, field string, hs, idle, conn *time.Duration, maxConns *int) (bool, error) {
	var err error
	switch key {
	case "handshakeTimeout":
		*hs, err = p.duration(v, field)
	case "idleTimeout":
		*idle, err = p.duration(v, field)
	case "connectTimeout":
		*conn, err = p.duration(v, field)
	case "maxConnections":
		*maxConns, err = p.int(v, field)
	default:
		return false, nil
	}
	return true, err
}

func (p *parser) inbound(n *yaml.Node, path string) (Inbound, error) {
	var in Inbound
	known := append([]string{"name", "listen", "app", "allow", "proxyProtocol", "federatesWith"}, limitKeys...)
	err := p.fields(n, path, known, func(key string, v *yaml.Node, field string) error {
		if ok, err := p.limits(key, v, field, &in.HandshakeTimeout, &in.IdleTimeout, &in.ConnectTimeout, &in.MaxConnections); ok {
			return err
		}
		var err error
		switch key {
		case "name":
			in.Name, err = p.str(v, field)
		case "listen":
			in.Listen, err = p.str(v, field)
		case "app":
			in.App, err = p.str(v, field)
		case "allow":
			in.Allow, err = p.allow(v, field)
		case "proxyProtocol":
			var s string
			if s, err = p.str(v, field); err != nil {
				return err
			}
			if s != "v2" {
				return p.errAt(v, field, fmt.Errorf("%q: the only PROXY protocol version latch sends is v2 (leave the key out for none)", s))
			}
			in.ProxyProtocol = true
		case "federatesWith":
			in.FederatesWith, err = p.trustDomains(v, field)
		}
		return err
	})
	return in, err
}

// allow reads a list of rules, each a mapping with exactly one of id,
// trustDomain, pathPrefix.
func (p *parser) allow(n *yaml.Node, path string) (identity.AllowList, error) {
	var rules []identity.Rule
	err := p.items(n, path, func(_ int, item *yaml.Node, f string) error {
		var rule identity.Rule
		count := 0
		err := p.fields(item, f, []string{"id", "trustDomain", "pathPrefix"}, func(key string, v *yaml.Node, field string) error {
			count++
			if count > 1 {
				return p.errAt(v, field, errors.New("an allow rule takes exactly one of id, trustDomain, pathPrefix"))
			}
			s, err := p.str(v, field)
			if err != nil {
				return err
			}
			rule, err = identity.ParseRule(key, s)
			if err != nil {
				return p.errAt(v, field, err)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if count == 0 {
			return p.errAt(item, f, errors.New("an allow rule takes exactly one of id, trustDomain, pathPrefix"))
		}
		rules = append(rules, rule)
		return nil
	})
	return identity.NewAllowList(rules...), err
}

func (p *parser) outbound(n *yaml.Node, path string) (Outbound, error) {
	var out Outbound
	known := append([]string{"name", "listen", "upstreams", "serverID", "federatesWith", "sessionResumption"}, limitKeys...)
	err := p.fields(n, path, known, func(key string, v *yaml.Node, field string) error {
		if ok, err := p.limits(key, v, field, &out.HandshakeTimeout, &out.IdleTimeout, &out.ConnectTimeout, &out.MaxConnections); ok {
			return err
		}
		var err error
		switch key {
		case "name":
			out.Name, err = p.str(v, field)
		case "listen":
			out.Listen, err = p.str(v, field)
		case "upstreams":
			out.Upstreams, err = p.strings(v, field)
		case "serverID":
			var s string
			if s, err = p.str(v, field); err != nil {
				return err
			}
			if out.ServerID, err = spiffeid.FromString(s); err != nil {
				return p.errAt(v, field, fmt.Errorf("%q is not a SPIFFE ID: %w", s, err))
			}
			if out.ServerID.Path() == "" {
				return p.errAt(v, field, fmt.Errorf("%q names a trust domain, not a workload", s))
			}
		case "federatesWith":
			out.FederatesWith, err = p.trustDomains(v, field)
		case "sessionResumption":
			var on bool
			on, err = p.bool(v, field)
			out.DisableSessionResumption = !on
		}
		return err
	})
	return out, err
}

// trustDomains reads a federation list: bare trust domain names.
func (p *parser) trustDomains(n *yaml.Node, path string) ([]spiffeid.TrustDomain, error) {
	var out []spiffeid.TrustDomain
	err := p.items(n, path, func(_ int, item *yaml.Node, f string) error {
		s, err := p.str(item, f)
		if err != nil {
			return err
		}
		td, err := identity.ParseTrustDomain(s)
		if err != nil {
			return p.errAt(item, f, err)
		}
		out = append(out, td)
		return nil
	})
	return out, err
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing"
		}
		return fmt.Sprintf("%q", n.Value)
	}
	return "nothing"
}
