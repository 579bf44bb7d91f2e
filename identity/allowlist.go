package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrNotAllowed is wrapped by every authorization refusal, so callers can tell a
// policy denial from a verification failure.
var ErrNotAllowed = errors.New("not in allow-list")

// RuleKind says how a Rule matches a peer's SPIFFE ID.
type RuleKind int

const (
	// MatchID matches exactly one SPIFFE ID.
	MatchID RuleKind = iota + 1
	// MatchTrustDomain matches every ID in one trust domain.
	MatchTrustDomain
	// MatchPathPrefix matches an ID and every ID below it, segment by segment:
	// spiffe://td/ns/prod matches spiffe://td/ns/prod and spiffe://td/ns/prod/sa/x
	// but not spiffe://td/ns/production.
	MatchPathPrefix
)

func (k RuleKind) String() string {
	switch k {
	case MatchID:
		return "id"
	case MatchTrustDomain:
		return "trustDomain"
	case MatchPathPrefix:
		return "pathPrefix"
	}
	return fmt.Sprintf("RuleKind(%d)", int(k))
}

// Rule is one entry of an allow-list. The zero Rule matches nothing.
type Rule struct {
	kind RuleKind
	id   spiffeid.ID // MatchID and MatchPathPrefix
	td   spiffeid.TrustDomain
}

// AllowID returns a rule that matches exactly id.
func AllowID(id spiffeid.ID) Rule { return Rule{kind: MatchID, id: id, td: id.TrustDomain()} }

// AllowTrustDomain returns a rule that matches every ID in td.
func AllowTrustDomain(td spiffeid.TrustDomain) Rule { return Rule{kind: MatchTrustDomain, td: td} }

// AllowPathPrefix returns a rule that matches prefix and every ID whose path
// continues it with further segments.
func AllowPathPrefix(prefix spiffeid.ID) Rule {
	return Rule{kind: MatchPathPrefix, id: prefix, td: prefix.TrustDomain()}
}

// ParseRule builds a rule from its kind name ("id", "trustDomain", "pathPrefix")
// and value, as written in configuration files and declarations.
func ParseRule(kind, value string) (Rule, error) {
	switch kind {
	case "id":
		id, err := spiffeid.FromString(value)
		if err != nil {
			return Rule{}, fmt.Errorf("id %q: %w", value, err)
		}
		return AllowID(id), nil
	case "trustDomain":
		td, err := parseBareTrustDomain(value)
		if err != nil {
			return Rule{}, fmt.Errorf("trustDomain %w", err)
		}
		return AllowTrustDomain(td), nil
	case "pathPrefix":
		id, err := spiffeid.FromString(value)
		if err != nil {
			return Rule{}, fmt.Errorf("pathPrefix %q: %w", value, err)
		}
		if id.Path() == "" {
			return Rule{}, fmt.Errorf("pathPrefix %q: has no path; use trustDomain to allow a whole trust domain", value)
		}
		return AllowPathPrefix(id), nil
	}
	return Rule{}, fmt.Errorf("unknown allow rule kind %q (want id, trustDomain or pathPrefix)", kind)
}

// ParseTrustDomain reads a trust domain as configuration names one (in a
// trustDomain allow rule, in a federation list): a bare name such as
// example.org. spiffeid.TrustDomainFromString also takes a whole SPIFFE ID
// and keeps its trust domain, so "spiffe://td/ns/prod/sa/db" would quietly
// stand for all of td: the opposite of what whoever wrote the path meant.
func ParseTrustDomain(value string) (spiffeid.TrustDomain, error) {
	return parseBareTrustDomain(value)
}

func parseBareTrustDomain(value string) (spiffeid.TrustDomain, error) {
	if strings.ContainsAny(value, ":/") {
		return spiffeid.TrustDomain{}, trustDomainNotBare(value)
	}
	td, err := spiffeid.TrustDomainFromString(value)
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("%q: %w", value, err)
	}
	return td, nil
}

// trustDomainNotBare explains the refusal of a trust domain written as a
// SPIFFE ID or a path, and names the allow rule that was probably meant.
func trustDomainNotBare(value string) error {
	id, err := spiffeid.FromString(value)
	switch {
	case err != nil:
		return fmt.Errorf("%q: must be a bare trust domain name such as example.org; to allow one workload use id, to allow the IDs below a path use pathPrefix", value)
	case id.Path() == "":
		return fmt.Errorf("%q: must be a bare trust domain name: write %s", value, id.TrustDomain().Name())
	}
	return fmt.Errorf("%q: must be a bare trust domain name, not a SPIFFE ID: use id for exactly %s, pathPrefix for it and the IDs below it, or trustDomain: %s for every ID of the trust domain", value, id, id.TrustDomain().Name())
}

// Kind reports how the rule matches.
func (r Rule) Kind() RuleKind { return r.kind }

// TrustDomain is the trust domain the rule applies to.
func (r Rule) TrustDomain() spiffeid.TrustDomain { return r.td }

// Value is the rule's operand as written in configuration: an ID, a trust domain
// name, or an ID prefix.
func (r Rule) Value() string {
	if r.kind == MatchTrustDomain {
		return r.td.Name()
	}
	return r.id.String()
}

// Matches reports whether id is allowed by this rule.
func (r Rule) Matches(id spiffeid.ID) bool {
	if id.IsZero() {
		return false
	}
	switch r.kind {
	case MatchID:
		return id == r.id
	case MatchTrustDomain:
		return id.TrustDomain() == r.td
	case MatchPathPrefix:
		if id.TrustDomain() != r.td {
			return false
		}
		p, want := id.Path(), r.id.Path()
		return p == want || strings.HasPrefix(p, want+"/")
	}
	return false
}

func (r Rule) String() string { return r.kind.String() + ":" + r.Value() }

// AllowList is an immutable set of rules; a peer is allowed when any rule
// matches. The empty AllowList denies everyone: an inbound listener nobody
// declared callers for is closed, not open.
type AllowList struct {
	rules []Rule
}

// NewAllowList returns an allow-list of the given rules.
func NewAllowList(rules ...Rule) AllowList {
	return AllowList{rules: append([]Rule(nil), rules...)}
}

// Rules returns a copy of the rules.
func (a AllowList) Rules() []Rule { return append([]Rule(nil), a.rules...) }

// Len is the number of rules.
func (a AllowList) Len() int { return len(a.rules) }

// Allows reports whether id matches any rule.
func (a AllowList) Allows(id spiffeid.ID) bool {
	for _, r := range a.rules {
		if r.Matches(id) {
			return true
		}
	}
	return false
}

// Authorize returns nil when id is allowed, and otherwise an error wrapping
// ErrNotAllowed that names the peer.
func (a AllowList) Authorize(id spiffeid.ID) error {
	if a.Allows(id) {
		return nil
	}
	if len(a.rules) == 0 {
		return fmt.Errorf("peer %s: %w (allow-list is empty: deny all)", id, ErrNotAllowed)
	}
	return fmt.Errorf("peer %s: %w", id, ErrNotAllowed)
}

// Equal reports whether both lists hold the same rules in the same order.
func (a AllowList) Equal(b AllowList) bool {
	if len(a.rules) != len(b.rules) {
		return false
	}
	for i := range a.rules {
		if a.rules[i] != b.rules[i] {
			return false
		}
	}
	return true
}

func (a AllowList) String() string {
	s := make([]string, len(a.rules))
	for i, r := range a.rules {
		s[i] = r.String()
	}
	return "[" + strings.Join(s, " ") + "]"
}
