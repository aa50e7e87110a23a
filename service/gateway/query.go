package gateway

import (
	"maps"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/grpc-ecosystem/grpc-gateway/v2/utilities"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// checkQuery is a mux middleware that answers 400 naming every query
// parameter that cannot be parsed into the route's request message, e.g.
// page_size=abc. grpc-gateway would refuse those too, but its error only
// says why in words; parsing each parameter on its own here tells which.
func (g *gateway) checkQuery(next runtime.HandlerFunc) runtime.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request, pathParams map[string]string) {
		expandListFilters(r)
		if msg := queryRequest(r); msg != nil {
			// A query that is not even well-formed is left to grpc-gateway,
			// which refuses it as a whole.
			if values, err := url.ParseQuery(r.URL.RawQuery); err == nil {
				if vs := queryViolations(msg, values); len(vs) > 0 {
					g.writeError(w, r, invalidArgument(vs))
					return
				}
			}
		}
		next(w, r, pathParams)
	}
}

// listFilters are ListMessages' filters that take several values, by
// their singular name, kept for compatibility, and their repeated one.
var listFilters = []struct{ singular, repeated string }{
	{"status", "statuses"},
	{"tag", "tags"},
}

// expandListFilters lets a ListMessages query give several statuses or
// tags the ways web clients write them: the parameter repeated
// (status=bounced&status=failed) or one value with commas
// (status=bounced,failed), under the singular or the repeated name. They
// all end up in the repeated field; grpc-gateway alone would refuse a
// repeated singular parameter. A tag that contains a comma therefore
// cannot be filtered on over REST.
func expandListFilters(r *http.Request) {
	pat, ok := runtime.HTTPPattern(r.Context())
	if !ok || r.Method != http.MethodGet || pat.String() != "/v1/messages" {
		return
	}
	values, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return // left to grpc-gateway, which refuses it as a whole
	}
	changed := false
	for _, f := range listFilters {
		if !values.Has(f.singular) && !values.Has(f.repeated) {
			continue
		}
		var all []string
		for _, v := range append(values[f.singular], values[f.repeated]...) {
			for part := range strings.SplitSeq(v, ",") {
				if part = strings.TrimSpace(part); part != "" {
					all = append(all, part)
				}
			}
		}
		values.Del(f.singular)
		values.Del(f.repeated)
		if len(all) > 0 {
			values[f.repeated] = all
		}
		changed = true
	}
	if changed {
		r.URL.RawQuery = values.Encode()
	}
}

// queryRequest returns an empty request message for the routes whose
// request is filled from the query string, nil for the others. Path
// parameters are not looked at: no such route has any.
func queryRequest(r *http.Request) proto.Message {
	pat, ok := runtime.HTTPPattern(r.Context())
	if !ok {
		return nil
	}
	if r.Method != http.MethodGet {
		return nil
	}
	switch pat.String() {
	case "/v1/messages":
		return &posthastev1.ListMessagesRequest{}
	case "/v1/events":
		return &posthastev1.ListEventsRequest{}
	}
	return nil
}

// queryViolations parses each parameter in values into a fresh msg the
// way grpc-gateway does, and describes those that fail. Parameters that
// name no field are ignored, as grpc-gateway ignores them.
func queryViolations(msg proto.Message, values url.Values) []fieldViolation {
	var (
		parser runtime.DefaultQueryParser
		noPath = utilities.NewDoubleArray(nil)
		md     = msg.ProtoReflect().Descriptor()
		seen   = make(map[string]bool)
		out    []fieldViolation
	)
	for _, key := range slices.Sorted(maps.Keys(values)) {
		field, fd, known := queryField(md, key)
		if !known {
			continue
		}
		if seen[field] {
			// Set under both its proto and its JSON name.
			out = append(out, fieldViolation{Field: field, Description: "must be given once"})
			continue
		}
		seen[field] = true
		one := url.Values{key: values[key]}
		if err := parser.Parse(msg.ProtoReflect().New().Interface(), one, noPath); err != nil {
			out = append(out, fieldViolation{Field: field, Description: queryProblem(fd, key, values[key])})
		}
	}
	return out
}

// mapKeyRE matches the map syntax of a query key, field[key], as
// grpc-gateway reads it.
var mapKeyRE = regexp.MustCompile(`^(.*)\[(.*)\]$`)

// queryField names the field a query key sets, in proto names as the
// service names fields (created_after for createdAfter, metadata["k"] for
// metadata[k]), with its descriptor. known is false when the key names no
// field of md.
func queryField(md protoreflect.MessageDescriptor, key string) (name string, fd protoreflect.FieldDescriptor, known bool) {
	path, mapKey, isMap := key, "", false
	if m := mapKeyRE.FindStringSubmatch(key); m != nil {
		path, mapKey, isMap = m[1], m[2], true
	}
	var names []string
	for seg := range strings.SplitSeq(path, ".") {
		if md == nil {
			// A field inside a scalar or repeated one: grpc-gateway refuses
			// the path, so it is named as written.
			names = append(names, seg)
			fd = nil
			continue
		}
		fd = md.Fields().ByTextName(seg)
		if fd == nil {
			fd = md.Fields().ByJSONName(seg)
		}
		if fd == nil {
			return "", nil, false
		}
		names = append(names, string(fd.Name()))
		md = nil
		if fd.Message() != nil && !fd.IsList() && !fd.IsMap() {
			md = fd.Message()
		}
	}
	name = strings.Join(names, ".")
	if isMap {
		name += "[" + strconv.Quote(mapKey) + "]"
	}
	return name, fd, true
}

// queryProblem describes why key=values, which sets fd (nil: a path that
// names no settable field), cannot be parsed.
func queryProblem(fd protoreflect.FieldDescriptor, key string, values []string) string {
	switch {
	case fd == nil:
		return "is not a field that can be set"
	case mapKeyRE.MatchString(key) && !fd.IsMap():
		return "is not a map"
	case len(values) > 1 && !fd.IsList():
		return "must be given once"
	case fd.Message() != nil && fd.Message().FullName() == "google.protobuf.Timestamp":
		return "must be an RFC 3339 timestamp, e.g. 2025-01-31T09:00:00Z"
	}
	switch fd.Kind() {
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return "must be a 32-bit integer"
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind,
		protoreflect.Uint32Kind, protoreflect.Fixed32Kind, protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return "must be an integer"
	case protoreflect.BoolKind:
		return "must be true or false"
	}
	return "is not a valid value for this field's type"
}
