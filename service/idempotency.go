package service

import (
	"context"
	"crypto/sha256"
	"fmt"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// idempotencyMetadataKey carries an idempotency key outside the request
// body; the REST gateway forwards the Idempotency-Key header under it.
const idempotencyMetadataKey = "idempotency-key"

// idempotentRequest is a send request whose key field can be cleared for
// hashing.
type idempotentRequest interface {
	proto.Message
	GetIdempotencyKey() string
}

// idempotencyKeyFromMetadata returns the key sent as metadata, if any.
func idempotencyKeyFromMetadata(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(idempotencyMetadataKey); len(v) > 0 {
		return v[0]
	}
	return ""
}

// idempotency returns the row that makes a retry of req with key replay
// resp instead of sending again. Keys are scoped to the project the message
// is stored in, so two projects cannot collide or read each other's
// answers, while a client that rotates its API key keeps its retries safe.
func (s *Server) idempotency(key string, req idempotentRequest, resp *posthastev1.SendMessageResponse) (*db.Idempotency, error) {
	hash, err := requestHash(req)
	if err != nil {
		return nil, err
	}
	stored, err := proto.Marshal(resp)
	if err != nil {
		return nil, fmt.Errorf("marshal response for idempotency: %w", err)
	}
	return &db.Idempotency{
		Key:         key,
		RequestHash: hash,
		Response:    stored,
		TTL:         s.cfg.IdempotencyTTL,
		// The suppression list is looked up by the insert: a receipt with
		// suppressed recipients is stored as the caller is answered, so a
		// retry learns the same.
		Amend: func(suppressed []db.SuppressedRecipient) ([]byte, error) {
			amended := proto.Clone(resp).(*posthastev1.SendMessageResponse)
			applySuppressed(amended, suppressed)
			b, err := proto.Marshal(amended)
			if err != nil {
				return nil, fmt.Errorf("marshal amended response for idempotency: %w", err)
			}
			return b, nil
		},
	}, nil
}

// requestHash identifies a request's content: SHA-256 over the message's
// type name and its deterministic encoding with the key itself cleared
// (the key may come from the body or from metadata; either way it is the
// same request). Deterministic marshalling orders map entries, so equal
// requests hash equally; the type name keeps a raw and a built request
// apart. The encoding is only promised stable within one protobuf library
// version; should an upgrade change it between a call and its retry, the
// retry is refused as a conflict, which fails safe: nothing is sent twice.
func requestHash(req idempotentRequest) ([]byte, error) {
	c := proto.Clone(req)
	m := c.ProtoReflect()
	m.Clear(m.Descriptor().Fields().ByName("idempotency_key"))
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("marshal request for idempotency hash: %w", err)
	}
	h := sha256.New()
	h.Write([]byte(m.Descriptor().FullName()))
	h.Write([]byte{0})
	h.Write(b)
	return h.Sum(nil), nil
}

// replayedResponse decodes the receipt stored by the first call, marked as
// a replay so the caller can tell that nothing new was stored.
func replayedResponse(stored []byte) (*posthastev1.SendMessageResponse, error) {
	var resp posthastev1.SendMessageResponse
	if err := proto.Unmarshal(stored, &resp); err != nil {
		return nil, fmt.Errorf("decode stored idempotent response: %w", err)
	}
	resp.Replayed = true
	return &resp, nil
}
