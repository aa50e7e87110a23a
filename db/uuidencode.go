package db

import (
	"context"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// uuid.UUID implements driver.Valuer, which pgx honours before anything
// else: every id sent went through its text form (formatted, then parsed
// back into 16 bytes), and every []uuid.UUID element by element through
// reflection. The intake and outcome statements send several uuid arrays
// each, which made this a tenth of the process's CPU. The plans below
// send them as pgtype.UUID, and arrays as a pgtype.FlatArray of them,
// which pgx encodes directly, in binary.

// fastUUIDs installs the plans on every new connection.
func fastUUIDs(cfg *pgxpool.Config) {
	afterConnect := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
		m := conn.TypeMap()
		m.TryWrapEncodePlanFuncs = append([]pgtype.TryWrapEncodePlanFunc{tryWrapUUIDEncodePlan}, m.TryWrapEncodePlanFuncs...)
		if afterConnect != nil {
			return afterConnect(ctx, conn)
		}
		return nil
	}
}

func tryWrapUUIDEncodePlan(value any) (pgtype.WrappedEncodePlanNextSetter, any, bool) {
	switch value.(type) {
	case uuid.UUID:
		return &uuidEncodePlan{}, pgtype.UUID{}, true
	case []uuid.UUID:
		// FlatArray, which the array codec encodes directly; a plain
		// []pgtype.UUID would still be walked by reflection.
		return &uuidSliceEncodePlan{}, pgtype.FlatArray[pgtype.UUID]{}, true
	}
	return nil, nil, false
}

type uuidEncodePlan struct{ next pgtype.EncodePlan }

func (p *uuidEncodePlan) SetNext(next pgtype.EncodePlan) { p.next = next }

func (p *uuidEncodePlan) Encode(value any, buf []byte) ([]byte, error) {
	return p.next.Encode(pgtype.UUID{Bytes: value.(uuid.UUID), Valid: true}, buf)
}

type uuidSliceEncodePlan struct{ next pgtype.EncodePlan }

func (p *uuidSliceEncodePlan) SetNext(next pgtype.EncodePlan) { p.next = next }

func (p *uuidSliceEncodePlan) Encode(value any, buf []byte) ([]byte, error) {
	// A nil slice never gets here: pgx sends NULL for it first.
	ids := value.([]uuid.UUID)
	out := make(pgtype.FlatArray[pgtype.UUID], len(ids))
	for i, id := range ids {
		out[i] = pgtype.UUID{Bytes: id, Valid: true}
	}
	return p.next.Encode(out, buf)
}
