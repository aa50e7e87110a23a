package posthastev1

import _ "embed"

//go:embed mail.swagger.json
var openAPI string

//go:embed mail.openapi3.json
var openAPIv3 string

// OpenAPI returns the OpenAPI v2 document of MailService's REST mapping,
// generated from mail.proto and openapi_config.yaml by protoc-gen-openapiv2.
// Each call returns a new copy; changing it changes nothing else.
func OpenAPI() []byte {
	return []byte(openAPI)
}

// OpenAPIv3 returns the same document converted to OpenAPI 3.0 by
// cmd/openapiconv when the code is generated. Each call returns a new copy.
func OpenAPIv3() []byte {
	return []byte(openAPIv3)
}
