package db

import (
	"context"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// HotStatements are the statements every message passes through, with
// arguments of the right types, for tests of their plans.
func HotStatements(recipientIDs, messageIDs []any) map[string]struct {
	SQL  string
	Args []any
} {
	type stmt = struct {
		SQL  string
		Args []any
	}
	return map[string]stmt{
		"lock recipients":               {lockRecipientsSQL, recipientIDs},
		"lock messages of recipients":   {lockMessagesOfRecipients, recipientIDs},
		"derive status of recipients":   {deriveStatusOfRecipients, recipientIDs},
		"lock messages by id":           {lockMessagesByID, messageIDs},
		"derive status by id":           {deriveStatusByID, messageIDs},
		"mark claimed messages sending": {markSendingByID, messageIDs},
		"load message contents":         {loadMessageContentsSQL, messageIDs},
	}
}

// QueryRow runs a query on the DB's own connections, with their type map.
func (d *DB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	return d.pool.QueryRow(ctx, sql, args...)
}

// EncodesUUIDsDirectly reports whether the DB's connections encode
// uuid.UUID and []uuid.UUID with the package's own plans rather than
// through uuid.UUID's text form.
func (d *DB) EncodesUUIDsDirectly(ctx context.Context) (bool, error) {
	conn, err := d.root.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Release()
	m := conn.Conn().TypeMap()
	_, one := m.PlanEncode(pgtype.UUIDOID, pgtype.BinaryFormatCode, uuid.UUID{}).(*uuidEncodePlan)
	_, many := m.PlanEncode(pgtype.UUIDArrayOID, pgtype.BinaryFormatCode, []uuid.UUID{}).(*uuidSliceEncodePlan)
	return one && many, nil
}
