package db

import (
	"context"

	"github.com/jackc/pgx/v5"
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
