package posthastev1

import _ "embed"

// OpenAPI is the OpenAPI v2 document of MailService's REST mapping, generated
// from mail.proto by protoc-gen-openapiv2.
//
//go:embed mail.swagger.json
var OpenAPI []byte
