package identity_test

import (
	"errors"
	"strings"
	"testing"

	"latch.dev/latch/identity"
)

func TestRuleMatches(t *testing.T) {
	rule := func(kind, value string) identity.Rule {
		r, err := identity.ParseRule(kind, value)
		if err != nil {
			t.Fatalf("ParseRule(%s, %s): %v", kind, value, err)
		}
		return r
	}
	tests := []struct {
		rule  identity.Rule
		peer  string
		match bool
	}{
		{rule("id", "spiffe://mesh.test/ns/a"), "spiffe://mesh.test/ns/a", true},
		{rule("id", "spiffe://mesh.test/ns/a"), "spiffe://mesh.test/ns/a/b", false},
		{rule("id", "spiffe://mesh.test/ns/a"), "spiffe://other.test/ns/a", false},
		{rule("trustDomain", "mesh.test"), "spiffe://mesh.test/anything/at/all", true},
		{rule("trustDomain", "mesh.test"), "spiffe://other.test/x", false},
		{rule("trustDomain", "mesh.test"), "spiffe://mesh.testing/x", false},
		{rule("pathPrefix", "spiffe://mesh.test/ns/prod"), "spiffe://mesh.test/ns/prod", true},
		{rule("pathPrefix", "spiffe://mesh.test/ns/prod"), "spiffe://mesh.test/ns/prod/sa/web", true},
		{rule("pathPrefix", "spiffe://mesh.test/ns/prod"), "spiffe://mesh.test/ns/production", false},
		{rule("pathPrefix", "spiffe://mesh.test/ns/prod"), "spiffe://other.test/ns/prod/sa/web", false},
		{identity.Rule{}, "spiffe://mesh.test/ns/a", false},
	}
	for _, tt := range tests {
		if got := tt.rule.Matches(mustID(tt.peer)); got != tt.match {
			t.Errorf("%s matches %s = %v, want %v", tt.rule, tt.peer, got, tt.match)
		}
	}
}

func TestParseRuleRefusals(t *testing.T) {
	for _, tt := range []struct{ kind, value, msg string }{
		{"id", "https://mesh.test/a", "id \"https://mesh.test/a\""},
		{"id", "spiffe://mesh.test/a/../b", "id"},
		{"trustDomain", "mesh.test/ns", `trustDomain "mesh.test/ns"`},
		// A trustDomain rule takes a bare name and nothing else: written as an
		// ID it used to keep only the ID's trust domain and admit all of it.
		{"trustDomain", "spiffe://example.org/ns/prod/sa/db-admin", `trustDomain "spiffe://example.org/ns/prod/sa/db-admin": must be a bare trust domain name, not a SPIFFE ID: use id for exactly spiffe://example.org/ns/prod/sa/db-admin, pathPrefix for it`},
		{"trustDomain", "spiffe://mesh.test", `trustDomain "spiffe://mesh.test": must be a bare trust domain name: write mesh.test`},
		{"trustDomain", "spiffe://mesh.test/", "use pathPrefix"},
		{"trustDomain", "SPIFFE://mesh.test/x", "bare trust domain name"},
		{"trustDomain", "spiffe:/mesh.test", "bare trust domain name"},
		{"trustDomain", "//mesh.test", "bare trust domain name"},
		{"trustDomain", "mesh.test:8443", "bare trust domain name"},
		{"trustDomain", "Mesh.test", `trustDomain "Mesh.test"`},
		{"trustDomain", "", `trustDomain ""`},
		{"pathPrefix", "spiffe://mesh.test", "use trustDomain"},
		{"regex", ".*", "unknown allow rule kind \"regex\""},
	} {
		if _, err := identity.ParseRule(tt.kind, tt.value); err == nil || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("ParseRule(%q, %q) = %v, want an error mentioning %q", tt.kind, tt.value, err, tt.msg)
		}
	}
}

func TestAllowListAuthorize(t *testing.T) {
	list := identity.NewAllowList(identity.AllowID(mustID(clientID)), identity.AllowPathPrefix(mustID("spiffe://mesh.test/ns/batch")))
	if err := list.Authorize(mustID(clientID)); err != nil {
		t.Errorf("listed ID refused: %v", err)
	}
	if err := list.Authorize(mustID("spiffe://mesh.test/ns/batch/job/7")); err != nil {
		t.Errorf("ID under a listed prefix refused: %v", err)
	}
	err := list.Authorize(mustID("spiffe://mesh.test/ns/intruder"))
	if !errors.Is(err, identity.ErrNotAllowed) || err.Error() != "peer spiffe://mesh.test/ns/intruder: not in allow-list" {
		t.Errorf("refusal = %v", err)
	}
	if err := identity.NewAllowList().Authorize(mustID(clientID)); !errors.Is(err, identity.ErrNotAllowed) {
		t.Errorf("empty allow-list allowed a peer: %v", err)
	}
	if !list.Equal(identity.NewAllowList(list.Rules()...)) || list.Equal(identity.NewAllowList()) {
		t.Error("Equal disagrees with the rules")
	}
}
