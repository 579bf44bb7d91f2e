package client

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
)

// envoyRules checks a resource against Envoy's own constraints: the
// protoc-gen-validate rules of the Envoy API, which go-control-plane
// generates as ValidateAll. ValidateAll does not look inside a typed config
// (an Any), so every typed config in the resource — filters, transport
// sockets — is unpacked and checked too. It runs before latch's subset
// checks: whatever latch accepts, Envoy would accept as well, and a
// resource Envoy would refuse is refused here, naming the field, whatever
// latch makes of it.
//
// A typed config of a type this binary does not know is left to the subset
// checks, which refuse it by name.
func (c *checker) envoyRules(m proto.Message) error {
	if err := validateAll(m); err != nil {
		field, reason := pgvField(err)
		return c.fail(field, "%s (Envoy's rule)", reason)
	}
	var bad error
	var walk func(r protoreflect.Message, path string)
	walk = func(r protoreflect.Message, path string) {
		if bad != nil {
			return
		}
		if a, ok := r.Interface().(*anypb.Any); ok {
			mt, err := protoregistry.GlobalTypes.FindMessageByURL(a.GetTypeUrl())
			if err != nil {
				return
			}
			inner := mt.New().Interface()
			if err := proto.Unmarshal(a.GetValue(), inner); err != nil {
				bad = c.fail(path, "decoding %s: %v", a.GetTypeUrl(), err)
				return
			}
			if err := validateAll(inner); err != nil {
				field, reason := pgvField(err)
				bad = c.fail(join(path, field), "%s (Envoy's rule)", reason)
				return
			}
			walk(inner.ProtoReflect(), path)
			return
		}
		r.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			name := join(path, string(fd.Name()))
			switch {
			case fd.IsMap():
				if fd.MapValue().Message() != nil {
					v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
						walk(mv.Message(), fmt.Sprintf("%s[%q]", name, k.String()))
						return bad == nil
					})
				}
			case fd.IsList():
				if fd.Message() != nil {
					for i := range v.List().Len() {
						walk(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", name, i))
					}
				}
			case fd.Message() != nil:
				walk(v.Message(), name)
			}
			return bad == nil
		})
	}
	walk(m.ProtoReflect(), "")
	return bad
}

// validateAll runs m's generated ValidateAll, if it has one.
func validateAll(m proto.Message) error {
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		return v.ValidateAll()
	}
	return nil
}

// pgvError is what protoc-gen-validate's generated errors have in common.
type pgvError interface {
	Field() string
	Reason() string
	Cause() error
}

// pgvField turns a protoc-gen-validate error into the path of the first
// field it names, in the proto's own spelling (filter_chains[0].name, as the
// rest of latch's NACKs write it), and its reason. PGV names fields by their
// Go names (FilterChains[0]) and nests an embedded message's errors as the
// cause.
func pgvField(err error) (field, reason string) {
	var parts []string
	more := 0
	for err != nil {
		if m, ok := err.(interface{ AllErrors() []error }); ok {
			all := m.AllErrors()
			if len(all) == 0 {
				break
			}
			more += len(all) - 1
			err = all[0]
			continue
		}
		var e pgvError
		if !errors.As(err, &e) {
			reason = err.Error()
			break
		}
		parts = append(parts, snakeField(e.Field()))
		if e.Cause() == nil || !isPGV(e.Cause()) {
			reason = e.Reason()
			if e.Cause() != nil {
				reason += ": " + e.Cause().Error()
			}
			break
		}
		err = e.Cause()
	}
	if more > 0 {
		reason += fmt.Sprintf(" (and %d more)", more)
	}
	return strings.Join(parts, "."), reason
}

func isPGV(err error) bool {
	if _, ok := err.(interface{ AllErrors() []error }); ok {
		return true
	}
	var e pgvError
	return errors.As(err, &e)
}

// snakeField turns a Go field name with an optional index or key
// (FilterChains[0], Ipv4Compat) into the proto field name (filter_chains[0],
// ipv4_compat).
func snakeField(f string) string {
	name, rest := f, ""
	if i := strings.IndexByte(f, '['); i >= 0 {
		name, rest = f[:i], f[i:]
	}
	var sb strings.Builder
	for i, r := range name {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				if p := name[i-1]; p >= 'a' && p <= 'z' || p >= '0' && p <= '9' {
					sb.WriteByte('_')
				}
			}
			r += 'a' - 'A'
		}
		sb.WriteRune(r)
	}
	return sb.String() + rest
}
