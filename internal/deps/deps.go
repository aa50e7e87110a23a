// Package deps pins modules while the packages that use them are written.
package deps

import (
	_ "github.com/emersion/go-message/mail"
	_ "github.com/emersion/go-smtp"
	_ "github.com/google/uuid"
	_ "github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	_ "github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "github.com/miekg/dns"
	_ "github.com/pressly/goose/v3"
	_ "go.uber.org/goleak"
	_ "golang.org/x/net/idna"
	_ "google.golang.org/genproto/googleapis/rpc/errdetails"
	_ "google.golang.org/grpc/health"
	_ "google.golang.org/grpc/reflection"
)
