#!/bin/sh
# Builds the release binary. The Dockerfile's build stage runs this script,
# and deploy_test.go runs it too, so the image's build command is checked
# by the ordinary test suite on machines without Docker.
#
#   VERSION=1.2.3 deploy/build.sh /out/posthaste
#
# CGO is off so the binary is static and runs on a distroless or scratch
# base; -trimpath keeps this machine's paths out of the binary and its
# panics.
set -eu
out=${1:?usage: build.sh OUTPUT}
cd "$(dirname "$0")/.."
CGO_ENABLED=0 exec go build -trimpath \
	-ldflags "-s -w -X main.version=${VERSION:-dev}" \
	-o "$out" ./cmd/posthaste
