package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// checkUTF8 reports whether body, one syntactically valid JSON value meant
// for a message md, is valid UTF-8, and if not, names the strings whose
// bytes are not. Fields are named as the service names them: proto names,
// to[2].name, metadata["k"]. A map key that is not valid UTF-8 names the
// map; an object key that is not valid UTF-8 names the object holding it,
// or nothing at the top level. md may be nil: keys are then used as
// written.
func checkUTF8(body []byte, md protoreflect.MessageDescriptor) (bad []fieldViolation, valid bool) {
	if utf8.Valid(body) {
		return nil, true
	}
	w := utf8Walker{dec: json.NewDecoder(bytes.NewReader(body)), body: body}
	w.dec.UseNumber() // numbers are skipped; don't parse them as floats
	// An error cannot happen for a body that decoded once already; if it
	// does, the body is still not valid UTF-8.
	_ = w.value("", shape{msg: md})
	return w.bad, false
}

// fieldAt names, as the service names fields, the field whose value or
// name starts at byte offset in body, one syntactically valid JSON value meant
// for a message md. It returns "" for the top-level value or an offset
// where no value starts.
func fieldAt(body []byte, md protoreflect.MessageDescriptor, offset int64) string {
	w := utf8Walker{dec: json.NewDecoder(bytes.NewReader(body)), body: body, seek: true, target: offset}
	w.dec.UseNumber()
	_ = w.value("", shape{msg: md})
	return w.found
}

// utf8Walker reads a JSON value token by token, keeping the path of the
// current value. encoding/json replaces invalid bytes in strings with
// U+FFFD, so each token's validity is judged on its raw bytes:
// body[prev:InputOffset()], the token and the whitespace, commas and
// colons before it (all ASCII). When seek is set it also remembers the
// path of the value that starts at target (see fieldAt).
type utf8Walker struct {
	dec  *json.Decoder
	body []byte
	prev int64
	bad  []fieldViolation

	seek   bool
	target int64
	found  string
}

// start is where the next token begins: past the whitespace, commas and
// colons that follow the previous one.
func (w *utf8Walker) start() int64 {
	i := w.prev
	for i < int64(len(w.body)) && bytes.IndexByte([]byte(" \t\r\n,:"), w.body[i]) >= 0 {
		i++
	}
	return i
}

// shape is what is known about a JSON value: the message whose fields an
// object's keys name, or the repeated or map field an array or object
// holds, and whether it is a map's value. The zero shape knows nothing.
type shape struct {
	msg      protoreflect.MessageDescriptor
	field    protoreflect.FieldDescriptor
	mapValue bool
}

func fieldShape(fd protoreflect.FieldDescriptor) shape {
	switch {
	case fd == nil:
		return shape{}
	case fd.IsList() || fd.IsMap():
		return shape{field: fd}
	default:
		return shape{msg: fd.Message()} // nil for a scalar
	}
}

func (w *utf8Walker) next() (json.Token, bool, error) {
	tok, err := w.dec.Token()
	if err != nil {
		return nil, false, err
	}
	end := w.dec.InputOffset()
	valid := utf8.Valid(w.body[w.prev:end])
	w.prev = end
	return tok, valid, nil
}

// add records a violation of field, once; "" names no field.
func (w *utf8Walker) add(field, description string) {
	if field == "" {
		return
	}
	for _, v := range w.bad {
		if v.Field == field {
			return
		}
	}
	w.bad = append(w.bad, fieldViolation{Field: field, Description: description})
}

func (w *utf8Walker) value(path string, s shape) error {
	if w.seek && w.found == "" && w.start() == w.target {
		w.found = path
	}
	tok, valid, err := w.next()
	if err != nil {
		return err
	}
	switch tok {
	case json.Delim('{'):
		return w.object(path, s)
	case json.Delim('['):
		return w.array(path, s)
	}
	if _, ok := tok.(string); ok && !valid {
		description := "must be valid UTF-8"
		if s.mapValue {
			description = "value must be valid UTF-8" // as the service says it
		}
		w.add(path, description)
	}
	return nil
}

func (w *utf8Walker) object(path string, s shape) error {
	for w.dec.More() {
		keyStart := w.start()
		tok, valid, err := w.next()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		if w.seek && w.found == "" && keyStart == w.target {
			// protojson points at the name of a field it does not know.
			w.found = joinPath(path, key)
		}
		childPath, child := path, shape{}
		switch {
		case s.field != nil && s.field.IsMap():
			if !valid {
				w.add(path, "keys must be valid UTF-8")
			} else {
				childPath = fmt.Sprintf("%s[%q]", path, key)
			}
			child = shape{msg: s.field.MapValue().Message(), mapValue: true}
		case !valid:
			w.add(path, "field names must be valid UTF-8")
		default:
			name := key
			var fd protoreflect.FieldDescriptor
			if s.msg != nil {
				// protojson accepts both the proto and the JSON name.
				fd = s.msg.Fields().ByTextName(key)
				if fd == nil {
					fd = s.msg.Fields().ByJSONName(key)
				}
			}
			if fd != nil {
				name = string(fd.Name())
			}
			childPath, child = joinPath(path, name), fieldShape(fd)
		}
		if err := w.value(childPath, child); err != nil {
			return err
		}
	}
	_, _, err := w.next() // the closing brace
	return err
}

func (w *utf8Walker) array(path string, s shape) error {
	var elem shape
	if s.field != nil && s.field.IsList() {
		elem = shape{msg: s.field.Message()}
	}
	for i := 0; w.dec.More(); i++ {
		if err := w.value(fmt.Sprintf("%s[%d]", path, i), elem); err != nil {
			return err
		}
	}
	_, _, err := w.next() // the closing bracket
	return err
}

func joinPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}
