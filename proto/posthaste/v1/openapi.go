package posthastev1

import _ "embed"

//go:embed mail.swagger.json
var openAPI string

// OpenAPI returns the OpenAPI v2 document of MailService's REST mapping,
// generated from mail.proto and openapi_config.yaml by protoc-gen-openapiv2.
// Each call returns a new copy; changing it changes nothing else.
func OpenAPI() []byte {
	return []byte(openAPI)
}
