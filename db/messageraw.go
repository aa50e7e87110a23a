package db

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// MessageRaw is a message as it is sent: its envelope and its bytes.
type MessageRaw struct {
	ID           uuid.UUID
	EnvelopeFrom string
	// Recipients are the envelope recipients' addresses in the order given.
	Recipients []string
	// Raw is the RFC 5322 message, CRLF line endings, as stored at intake.
	Raw []byte
}

const getMessageRawSQL = `
SELECT m.id, m.envelope_from,
    ARRAY(SELECT r.address FROM recipients r WHERE r.message_id = m.id ORDER BY r.position),
    m.raw, m.raw_purged_at
FROM messages m WHERE m.id = $1 AND m.project_id = $2`

// GetMessageRaw returns a message of a project as it is sent, ErrNotFound
// (also when the message is another project's), or ErrRawPurged when
// retention has emptied its body.
func (d *DB) GetMessageRaw(ctx context.Context, projectID, id uuid.UUID) (MessageRaw, error) {
	rows, _ := d.pool.Query(ctx, getMessageRawSQL, id, projectID)
	m, err := pgx.CollectExactlyOneRow(rows, func(row pgx.CollectableRow) (MessageRaw, error) {
		var (
			m      MessageRaw
			purged *time.Time
		)
		err := row.Scan(&m.ID, &m.EnvelopeFrom, &m.Recipients, &m.Raw, &purged)
		if err == nil && purged != nil {
			err = ErrRawPurged
		}
		return m, err
	})
	if err != nil {
		return MessageRaw{}, fmt.Errorf("get raw message %s: %w", id, mapError(err))
	}
	return m, nil
}
