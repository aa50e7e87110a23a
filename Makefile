# Code generation tools are fetched through the Go module proxy at pinned
# versions and installed into ./bin; nothing else is downloaded.
BUF_VERSION              := v1.75.0
PROTOC_GEN_GO_VERSION    := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0
GRPC_GATEWAY_VERSION     := v2.33.0

BIN := $(CURDIR)/bin

# The configured module proxy without the fallback to fetching from version
# control directly, so tools come from the proxy or not at all.
TOOLS_GOPROXY := $(shell go env GOPROXY | sed -e 's/[,|]direct$$//')

.PHONY: generate lint tools test bench build check-generated chaos

# The version is the nearest tag and commit (git describe), when git knows.
VERSION := $(shell git describe --always --dirty 2>/dev/null)

build:
	go build -ldflags "$(if $(VERSION),-X main.version=$(VERSION))" -o $(BIN)/posthaste ./cmd/posthaste

tools:
	GOBIN=$(BIN) GOPROXY=$(TOOLS_GOPROXY) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	GOBIN=$(BIN) GOPROXY=$(TOOLS_GOPROXY) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(BIN) GOPROXY=$(TOOLS_GOPROXY) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	GOBIN=$(BIN) GOPROXY=$(TOOLS_GOPROXY) go install github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-grpc-gateway@$(GRPC_GATEWAY_VERSION)
	GOBIN=$(BIN) GOPROXY=$(TOOLS_GOPROXY) go install github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2@$(GRPC_GATEWAY_VERSION)

# The OpenAPI 3 document is converted from the version 2 one that buf
# writes, by our own program (internal/openapiconv), and validated on the way.
generate: tools
	$(BIN)/buf generate
	go run ./cmd/openapiconv -in proto/posthaste/v1/mail.swagger.json -out proto/posthaste/v1/mail.openapi3.json

lint: tools
	$(BIN)/buf lint

# Fails when the committed generated code differs from a fresh generation.
check-generated: generate
	git diff --exit-code -- proto
	test -z "$$(git status --porcelain -- proto)"

test:
	go test -race -count=1 ./...

# Throughput and allocation benchmarks; see docs/benchmarks.md.
bench:
	go test -run '^$$' -bench . -benchmem -count=1 ./delivery/... ./db/... ./internal/app/...

# The fault suite (docs/operations.md#fault-suite): kills the service and
# its database under load and checks that nothing accepted is lost.
# CHAOS_FLAGS=-short runs the short form, as CI does.
chaos:
	go test -tags chaos -count=1 -v -timeout 30m $(CHAOS_FLAGS) ./internal/chaos/
