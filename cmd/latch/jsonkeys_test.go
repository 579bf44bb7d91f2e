package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"testing"
)

// snakeCase is the one key style of every JSON document latch serves or
// prints: /status of every daemon, the TLS test endpoint, latch check --json.
var snakeCase = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// nonSnakeCaseKeys lists every object key of doc, at any depth, that is not
// snake_case, with where it is.
func nonSnakeCaseKeys(doc []byte) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	var bad []string
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				if !snakeCase.MatchString(k) {
					bad = append(bad, path+"."+k)
				}
				walk(path+"."+k, e)
			}
		case []any:
			for i, e := range v {
				walk(fmt.Sprintf("%s[%d]", path, i), e)
			}
		}
	}
	walk("", v)
	slices.Sort(bad)
	return bad, nil
}

// requireSnakeCaseKeys fails the test for every key of doc that is not
// snake_case.
func requireSnakeCaseKeys(t *testing.T, what string, doc []byte) {
	t.Helper()
	bad, err := nonSnakeCaseKeys(doc)
	if err != nil {
		t.Fatalf("%s: not JSON: %v\n%s", what, err, doc)
	}
	for _, k := range bad {
		t.Errorf("%s: key %s is not snake_case", what, k)
	}
}

func TestNonSnakeCaseKeys(t *testing.T) {
	for doc, want := range map[string][]string{
		`{"Name":"x"}`:                   {".Name"},
		`{"a":[{"appliedVersion":1}]}`:   {".a[0].appliedVersion"},
		`{"a":{"b":{"last-error":""}}}`:  {".a.b.last-error"},
		`{"a_":1,"_b":2,"c__d":3,"E":4}`: {".E", "._b", ".a_", ".c__d"},
		`{"spiffe_id":"x","listeners":[{"name":"a","addr":"b"}],"tls12_cipher_suites":[],"control_plane":null}`: nil,
	} {
		got, err := nonSnakeCaseKeys([]byte(doc))
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s: %q, %v; want %q", doc, got, err, want)
		}
	}
}

func TestRepeatedKeys(t *testing.T) {
	for line, want := range map[string][]string{
		`{"msg":"x","component":"xds","component":"xds-client"}`: {"component"},
		`{"a":{"b":1,"b":2},"c":[{"d":1,"d":1}]}`:                {"b", "d"},
		`{"a":{"b":1},"b":2}`:                                    nil,
	} {
		if got := repeatedKeys([]byte(line)); !slices.Equal(got, want) {
			t.Errorf("%s: %q, want %q", line, got, want)
		}
	}
}
