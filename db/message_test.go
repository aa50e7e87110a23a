package db_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

func TestInsertAndGetMessage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	key, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "main", Prefix: "ph_abc", Hash: []byte("hash-1"), Scopes: []string{db.ScopeSend}})
	if err != nil {
		t.Fatal(err)
	}

	m := newMessage(t, 3)
	m.APIKeyID = key.ID
	m.Tags = []string{"welcome", "signup"}
	m.Metadata = map[string]string{"user": "42", "plan": "pro"}
	m.Recipients[1].Kind = db.KindCc
	m.Recipients[2].Kind = db.KindBcc
	before := time.Now()
	insert(t, b.db, m)

	got := get(t, b.db, m.ID)
	if got.ID != m.ID || got.APIKeyID != key.ID || got.ProjectID != db.DefaultProjectID() {
		t.Errorf("ids = %s, %s, %s; want %s, %s in the default project", got.ID, got.APIKeyID, got.ProjectID, m.ID, key.ID)
	}
	if got.Status != db.StatusQueued {
		t.Errorf("Status = %q, want queued", got.Status)
	}
	if got.MessageIDHeader != m.MessageIDHeader || got.EnvelopeFrom != m.EnvelopeFrom ||
		got.FromHeader != m.FromHeader || got.Subject != m.Subject {
		t.Errorf("headers = %q %q %q %q", got.MessageIDHeader, got.EnvelopeFrom, got.FromHeader, got.Subject)
	}
	if got.Size != int64(len(m.Raw)) {
		t.Errorf("Size = %d, want %d", got.Size, len(m.Raw))
	}
	if !slices.Equal(got.Tags, m.Tags) {
		t.Errorf("Tags = %v, want %v", got.Tags, m.Tags)
	}
	if len(got.Metadata) != 2 || got.Metadata["user"] != "42" || got.Metadata["plan"] != "pro" {
		t.Errorf("Metadata = %v", got.Metadata)
	}
	if got.SendAt != nil {
		t.Errorf("SendAt = %v, want nil", got.SendAt)
	}
	if got.CreatedAt.Before(before.Add(-time.Minute)) || !got.UpdatedAt.Equal(got.CreatedAt) {
		t.Errorf("CreatedAt = %v, UpdatedAt = %v", got.CreatedAt, got.UpdatedAt)
	}
	if len(got.Attempts) != 0 {
		t.Errorf("Attempts = %v, want none", got.Attempts)
	}
	if len(got.Recipients) != 3 {
		t.Fatalf("got %d recipients, want 3", len(got.Recipients))
	}
	for i, r := range got.Recipients {
		want := m.Recipients[i]
		if r.ID != want.ID || r.MessageID != m.ID || r.Address != want.Address ||
			r.Domain != want.Domain || r.Kind != want.Kind {
			t.Errorf("recipient %d = %+v, want %+v", i, r, want)
		}
		if r.Status != db.StatusQueued || r.Attempts != 0 || r.NextAttemptAt == nil ||
			r.LastCode != 0 || r.LastEnhancedCode != "" || r.LastText != "" || r.DeliveredAt != nil {
			t.Errorf("recipient %d state = %+v", i, r)
		}
	}
	if got := eventTypes(t, b.raw, m.ID); !slices.Equal(got, []string{"accepted"}) {
		t.Errorf("events = %v, want [accepted]", got)
	}

	contents, err := b.db.LoadMessageContents(ctx, []uuid.UUID{m.ID, newID(t)})
	if err != nil {
		t.Fatal(err)
	}
	if len(contents) != 1 || !bytes.Equal(contents[m.ID].Raw, m.Raw) ||
		contents[m.ID].EnvelopeFrom != m.EnvelopeFrom || contents[m.ID].ID != m.ID {
		t.Errorf("LoadMessageContents = %+v", contents)
	}
}

func TestInsertMessageWithoutOptionalFields(t *testing.T) {
	t.Parallel()
	b := setup(t)
	m := newMessage(t, 1)
	m.Raw = nil
	insert(t, b.db, m)
	got := get(t, b.db, m.ID)
	if got.APIKeyID != uuid.Nil || got.Tags == nil || len(got.Tags) != 0 || got.Metadata == nil || len(got.Metadata) != 0 {
		t.Errorf("got APIKeyID %s, Tags %#v, Metadata %#v", got.APIKeyID, got.Tags, got.Metadata)
	}
}

// A message that cannot be stored must not keep its idempotency key either:
// the key row is written first in the same transaction, and a retry with the
// same key has to store the message, not replay an answer never given.
func TestInsertMessageFailureFreesIdempotencyKey(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	bad := withKey(newMessage(t, 1), "retry-me", "hash")
	// A recipient id given twice: the recipients insert fails after the
	// key and the message row were written.
	dup := bad.Recipients[0]
	dup.Address = "other@" + dup.Domain
	bad.Recipients = append(bad.Recipients, dup)
	if _, err := b.db.InsertMessage(ctx, bad); err == nil {
		t.Fatal("InsertMessage with a duplicate recipient id succeeded")
	}
	for _, table := range []string{"messages", "recipients", "events", "idempotency_keys"} {
		if n := count(t, b.raw, `SELECT count(*) FROM `+table); n != 0 {
			t.Errorf("%d rows left in %s by a failed insert", n, table)
		}
	}
	good := withKey(newMessage(t, 1), "retry-me", "hash")
	res, err := b.db.InsertMessage(ctx, good)
	if err != nil || res.Replayed {
		t.Fatalf("retry with the same key: %+v, %v; want it stored", res, err)
	}
	get(t, b.db, good.ID)
}

func TestInsertMessageScheduled(t *testing.T) {
	t.Parallel()
	b := setup(t)
	m := newMessage(t, 2)
	m.SendAt = usec(time.Now().Add(24 * time.Hour))
	insert(t, b.db, m)

	got := get(t, b.db, m.ID)
	if got.Status != db.StatusScheduled {
		t.Errorf("Status = %q, want scheduled", got.Status)
	}
	if got.SendAt == nil || !got.SendAt.Equal(m.SendAt) {
		t.Errorf("SendAt = %v, want %v", got.SendAt, m.SendAt)
	}
	if len(got.Recipients) != 2 {
		t.Fatalf("%d recipients, want 2", len(got.Recipients))
	}
	for _, r := range got.Recipients {
		if r.Status != db.StatusScheduled || r.NextAttemptAt == nil || !r.NextAttemptAt.Equal(m.SendAt) {
			t.Errorf("recipient %s: status %q, next attempt %v", r.Address, r.Status, r.NextAttemptAt)
		}
	}
	if got := eventTypes(t, b.raw, m.ID); !slices.Equal(got, []string{"accepted", "scheduled"}) {
		t.Errorf("events = %v, want [accepted scheduled]", got)
	}

	// Whether send_at lies ahead is decided by the caller's clock when it
	// gives one, so the stored state matches what the caller answered.
	ahead := newMessage(t, 1)
	ahead.SendAt = usec(time.Now().Add(time.Hour))
	ahead.Now = ahead.SendAt.Add(time.Second)
	insert(t, b.db, ahead)
	if got := get(t, b.db, ahead.ID); got.Status != db.StatusQueued || len(got.Recipients) != 1 ||
		got.Recipients[0].Status != db.StatusQueued {
		t.Errorf("send_at before the caller's now: status %q, recipients %+v", got.Status, got.Recipients)
	}
	behind := newMessage(t, 1)
	behind.SendAt = usec(time.Now().Add(-time.Hour))
	behind.Now = behind.SendAt.Add(-time.Second)
	insert(t, b.db, behind)
	if got := get(t, b.db, behind.ID); got.Status != db.StatusScheduled || len(got.Recipients) != 1 ||
		got.Recipients[0].NextAttemptAt == nil || !got.Recipients[0].NextAttemptAt.Equal(behind.SendAt) {
		t.Errorf("send_at after the caller's now: status %q, recipients %+v", got.Status, got.Recipients)
	}

	// A send_at that has passed is simply queued.
	past := newMessage(t, 1)
	past.SendAt = usec(time.Now().Add(-time.Hour))
	insert(t, b.db, past)
	if got := get(t, b.db, past.ID); got.Status != db.StatusQueued || got.SendAt == nil {
		t.Errorf("past send_at: status %q, send_at %v", got.Status, got.SendAt)
	}
}

func TestInsertMessageValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tests := []struct {
		name   string
		modify func(*db.NewMessage)
		want   string
	}{
		{"no id", func(m *db.NewMessage) { m.ID = uuid.Nil }, "ID"},
		{"no envelope from", func(m *db.NewMessage) { m.EnvelopeFrom = "" }, "EnvelopeFrom"},
		{"no recipients", func(m *db.NewMessage) { m.Recipients = nil }, "Recipients"},
		{"recipient without id", func(m *db.NewMessage) { m.Recipients[0].ID = uuid.Nil }, "Recipients[0].ID"},
		{"recipient without address", func(m *db.NewMessage) { m.Recipients[0].Address = "" }, "Recipients[0].Address"},
		{"recipient without domain", func(m *db.NewMessage) { m.Recipients[0].Domain = "" }, "Recipients[0].Domain"},
		{"bad kind", func(m *db.NewMessage) { m.Recipients[0].Kind = "reply-to" }, "Recipients[0].Kind"},
		{"empty idempotency key", func(m *db.NewMessage) { m.Idempotency = &db.Idempotency{} }, "Idempotency.Key"},
		{"negative ttl", func(m *db.NewMessage) {
			m.Idempotency = &db.Idempotency{Key: "k", TTL: -time.Second}
		}, "Idempotency.TTL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMessage(t, 1)
			tt.modify(&m)
			_, err := b.db.InsertMessage(context.Background(), m)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one naming %s", err, tt.want)
			}
		})
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 0 {
		t.Errorf("%d messages stored by invalid inserts", n)
	}
}

func TestGetMessageNotFound(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := b.db.GetMessage(context.Background(), db.DefaultProjectID(), newID(t))
	if !errors.Is(err, db.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
}

func withKey(m db.NewMessage, key string, hash string) db.NewMessage {
	m.Idempotency = &db.Idempotency{
		Key:         key,
		RequestHash: []byte(hash),
		Response:    []byte("response for " + m.ID.String()),
	}
	return m
}

func TestIdempotencyReplayAndConflict(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()

	first := withKey(newMessage(t, 1), "k1", "hash-a")
	res, err := b.db.InsertMessage(ctx, first)
	if err != nil || res.Replayed {
		t.Fatalf("first insert: %+v, %v", res, err)
	}

	again := withKey(newMessage(t, 1), "k1", "hash-a")
	res, err = b.db.InsertMessage(ctx, again)
	if err != nil {
		t.Fatalf("replay: %v", err)
	}
	if !res.Replayed || string(res.Response) != "response for "+first.ID.String() {
		t.Errorf("replay = %+v, want the first response", res)
	}
	if _, err := b.db.GetMessage(ctx, db.DefaultProjectID(), again.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("replayed message was stored: %v", err)
	}

	other := withKey(newMessage(t, 1), "k1", "hash-b")
	_, err = b.db.InsertMessage(ctx, other)
	if !errors.Is(err, db.ErrIdempotencyConflict) {
		t.Errorf("different request: err = %v, want ErrIdempotencyConflict", err)
	}
	if _, err := b.db.GetMessage(ctx, db.DefaultProjectID(), other.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("conflicting message was stored: %v", err)
	}

	// The same key in another project is a different key.
	proj, err := b.db.CreateProject(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	scoped := withKey(newMessage(t, 1), "k1", "hash-b")
	scoped.ProjectID = proj.ID
	if res, err := b.db.InsertMessage(ctx, scoped); err != nil || res.Replayed {
		t.Errorf("same key, other project: %+v, %v", res, err)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 2 {
		t.Errorf("%d messages stored, want 2", n)
	}
}

func TestIdempotencyExpiredKey(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()

	first := withKey(newMessage(t, 1), "k", "hash-a")
	insert(t, b.db, first)
	live := withKey(newMessage(t, 1), "live", "hash")
	insert(t, b.db, live)
	if _, err := b.raw.Exec(ctx,
		`UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'k'`); err != nil {
		t.Fatal(err)
	}

	// An expired key is free again, even for a different request.
	second := withKey(newMessage(t, 1), "k", "hash-b")
	res, err := b.db.InsertMessage(ctx, second)
	if err != nil || res.Replayed {
		t.Fatalf("insert with expired key: %+v, %v", res, err)
	}
	var holder uuid.UUID
	if err := b.raw.QueryRow(ctx, `SELECT message_id FROM idempotency_keys WHERE key = 'k'`).Scan(&holder); err != nil {
		t.Fatal(err)
	}
	if holder != second.ID {
		t.Errorf("key held by %s, want %s", holder, second.ID)
	}

	if _, err := b.raw.Exec(ctx,
		`UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'k'`); err != nil {
		t.Fatal(err)
	}
	n, err := b.db.DeleteExpiredIdempotencyKeys(ctx)
	if err != nil || n != 1 {
		t.Fatalf("DeleteExpiredIdempotencyKeys = %d, %v; want 1", n, err)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM idempotency_keys`); n != 1 {
		t.Errorf("%d keys left, want the live one", n)
	}
}

func TestIdempotencyConcurrentSameKey(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const callers = 12
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		stored   []uuid.UUID
		replayed [][]byte
	)
	for range callers {
		m := withKey(newMessage(t, 2), "same", "same-hash")
		wg.Go(func() {
			res, err := b.db.InsertMessage(context.Background(), m)
			if err != nil {
				t.Errorf("InsertMessage: %v", err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if res.Replayed {
				replayed = append(replayed, res.Response)
			} else {
				stored = append(stored, m.ID)
			}
		})
	}
	wg.Wait()
	if len(stored) != 1 || len(replayed) != callers-1 {
		t.Fatalf("%d stored, %d replayed; want 1 and %d", len(stored), len(replayed), callers-1)
	}
	for _, r := range replayed {
		if string(r) != "response for "+stored[0].String() {
			t.Errorf("replay response %q does not belong to %s", r, stored[0])
		}
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 1 {
		t.Errorf("%d messages in the table, want 1", n)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM recipients`); n != 2 {
		t.Errorf("%d recipients in the table, want 2", n)
	}
}

func TestCancelQueuedMessage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	insert(t, b.db, m)
	sched := newMessage(t, 1)
	sched.SendAt = usec(time.Now().Add(time.Hour))
	insert(t, b.db, sched)

	for _, id := range []uuid.UUID{m.ID, sched.ID} {
		got, n, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), id)
		if err != nil {
			t.Fatal(err)
		}
		if n != len(got.Recipients) {
			t.Errorf("canceled %d recipients, want %d", n, len(got.Recipients))
		}
		if got.Status != db.StatusCanceled {
			t.Errorf("status = %q, want canceled", got.Status)
		}
		if len(got.Recipients) == 0 {
			t.Fatal("canceled message has no recipients")
		}
		for _, r := range got.Recipients {
			if r.Status != db.StatusCanceled || r.NextAttemptAt != nil {
				t.Errorf("recipient %s: %q, next %v", r.Address, r.Status, r.NextAttemptAt)
			}
		}
	}
	if got := eventTypes(t, b.raw, m.ID); !slices.Equal(got, []string{"accepted", "canceled", "canceled"}) {
		t.Errorf("events = %v", got)
	}

	// Canceling again says there is nothing to cancel and changes nothing,
	// not even updated_at.
	before := get(t, b.db, m.ID)
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m.ID); !errors.Is(err, db.ErrNothingToCancel) {
		t.Fatalf("second cancel: err = %v, want ErrNothingToCancel", err)
	}
	after := get(t, b.db, m.ID)
	if !after.UpdatedAt.Equal(before.UpdatedAt) || len(eventTypes(t, b.raw, m.ID)) != 3 {
		t.Errorf("second cancel changed the message: %v -> %v", before.UpdatedAt, after.UpdatedAt)
	}
	if got := claimAll(t, b.db, time.Now().Add(2*time.Hour)); len(got) != 0 {
		t.Errorf("claimed %d canceled recipients", len(got))
	}
}

func TestCancelMessageNotFound(t *testing.T) {
	t.Parallel()
	b := setup(t)
	if _, _, err := b.db.CancelMessage(context.Background(), db.DefaultProjectID(), newID(t)); !errors.Is(err, db.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
}

func TestCancelInFlight(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 4)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 4 {
		t.Fatalf("claimed %d, want 4", len(claimed))
	}

	got, n, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m.ID)
	if err != nil {
		t.Fatal(err)
	}
	// In-flight recipients are only marked; their outcome ends them.
	if n != 0 {
		t.Errorf("canceled %d in-flight recipients, want 0", n)
	}
	if got.Status != db.StatusSending {
		t.Errorf("status after cancel = %q, want sending", got.Status)
	}
	if len(got.Recipients) != 4 {
		t.Fatalf("%d recipients after cancel, want 4", len(got.Recipients))
	}
	for _, r := range got.Recipients {
		if r.Status != db.StatusSending {
			t.Errorf("in-flight recipient %s became %q", r.Address, r.Status)
		}
	}

	// The in-flight outcome decides: delivered and bounced stand, deferred
	// and failed become canceled.
	byID := map[uuid.UUID]string{}
	statuses := []string{db.StatusDelivered, db.StatusBounced, db.StatusDeferred, db.StatusFailed}
	var outcomes []db.Outcome
	for i, c := range claimed {
		byID[c.ID] = statuses[i]
		outcomes = append(outcomes, db.Outcome{
			RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: statuses[i],
			NextAttemptAt: time.Now().Add(time.Hour), Code: 250,
		})
	}
	applied, err := b.db.RecordOutcomes(ctx, outcomes)
	if err != nil || len(applied) != 4 {
		t.Fatalf("RecordOutcomes = %v, %v", applied, err)
	}
	got = get(t, b.db, m.ID)
	if len(got.Recipients) != 4 {
		t.Fatalf("%d recipients, want 4", len(got.Recipients))
	}
	for _, r := range got.Recipients {
		want := byID[r.ID]
		if want == db.StatusDeferred || want == db.StatusFailed {
			want = db.StatusCanceled
		}
		if r.Status != want {
			t.Errorf("outcome %s: recipient is %q, want %q", byID[r.ID], r.Status, want)
		}
		if r.NextAttemptAt != nil {
			t.Errorf("recipient %s: next attempt %v after a final outcome", r.Address, r.NextAttemptAt)
		}
	}
	if got.Status != db.MessagePartiallyDelivered {
		t.Errorf("message status = %q, want partially_delivered", got.Status)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM events WHERE message_id = $1 AND type = 'canceled'`, m.ID); n != 2 {
		t.Errorf("%d canceled events, want 2", n)
	}
}

func TestListMessagesFilters(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

	mk := func(minutes int, tags []string, recipient string) db.NewMessage {
		m := newMessage(t, 1)
		m.Tags = tags
		if recipient != "" {
			m.Recipients[0].Address = recipient
		}
		insert(t, b.db, m)
		if _, err := b.raw.Exec(ctx, `UPDATE messages SET created_at = $2 WHERE id = $1`,
			m.ID, base.Add(time.Duration(minutes)*time.Minute)); err != nil {
			t.Fatal(err)
		}
		return m
	}
	m0 := mk(0, []string{"a", "b"}, "")
	m1 := mk(10, []string{"b"}, "special@x.example.test")
	m2 := mk(20, nil, "special@x.example.test")
	m3 := mk(30, []string{"a"}, "")
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m2.ID); err != nil {
		t.Fatal(err)
	}
	at := func(minutes int) *time.Time {
		ts := base.Add(time.Duration(minutes) * time.Minute)
		return &ts
	}

	tests := []struct {
		name string
		p    db.ListMessagesParams
		want []uuid.UUID
	}{
		{"all, newest first", db.ListMessagesParams{}, []uuid.UUID{m3.ID, m2.ID, m1.ID, m0.ID}},
		{"status", db.ListMessagesParams{Statuses: []string{db.StatusCanceled}}, []uuid.UUID{m2.ID}},
		{"status queued", db.ListMessagesParams{Statuses: []string{db.StatusQueued}}, []uuid.UUID{m3.ID, m1.ID, m0.ID}},
		{"recipient", db.ListMessagesParams{Recipient: "special@x.example.test"}, []uuid.UUID{m2.ID, m1.ID}},
		{"unknown recipient", db.ListMessagesParams{Recipient: "nobody@x.example.test"}, nil},
		{"tag a", db.ListMessagesParams{Tags: []string{"a"}}, []uuid.UUID{m3.ID, m0.ID}},
		{"tag b", db.ListMessagesParams{Tags: []string{"b"}}, []uuid.UUID{m1.ID, m0.ID}},
		{"created after is inclusive", db.ListMessagesParams{CreatedAfter: at(10)}, []uuid.UUID{m3.ID, m2.ID, m1.ID}},
		{"created before is exclusive", db.ListMessagesParams{CreatedBefore: at(20)}, []uuid.UUID{m1.ID, m0.ID}},
		{"time range", db.ListMessagesParams{CreatedAfter: at(5), CreatedBefore: at(25)}, []uuid.UUID{m2.ID, m1.ID}},
		{"combined", db.ListMessagesParams{Tags: []string{"b"}, Recipient: "special@x.example.test", Statuses: []string{db.StatusQueued}},
			[]uuid.UUID{m1.ID}},
		{"limit", db.ListMessagesParams{Limit: 2}, []uuid.UUID{m3.ID, m2.ID}},
		{"recipient in another case", db.ListMessagesParams{Recipient: "SPECIAL@X.Example.test"}, []uuid.UUID{m2.ID, m1.ID}},
		{"several statuses", db.ListMessagesParams{Statuses: []string{db.StatusCanceled, db.StatusBounced, db.StatusQueued}},
			[]uuid.UUID{m3.ID, m2.ID, m1.ID, m0.ID}},
		{"several tags: any of them", db.ListMessagesParams{Tags: []string{"b", "nope"}}, []uuid.UUID{m1.ID, m0.ID}},
		{"tags a or b", db.ListMessagesParams{Tags: []string{"a", "b"}}, []uuid.UUID{m3.ID, m1.ID, m0.ID}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.p.ProjectID = db.DefaultProjectID()
			got, err := b.db.ListMessages(ctx, tt.p)
			if err != nil {
				t.Fatal(err)
			}
			var ids []uuid.UUID
			for _, m := range got {
				ids = append(ids, m.ID)
				if len(m.Recipients) != 1 || m.Recipients[0].MessageID != m.ID {
					t.Errorf("message %s listed with recipients %+v", m.ID, m.Recipients)
				}
				if m.Attempts != nil {
					t.Errorf("message %s listed with attempts", m.ID)
				}
			}
			if !slices.Equal(ids, tt.want) {
				t.Errorf("got %v, want %v", ids, tt.want)
			}
		})
	}
}

func TestListMessagesPaging(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	const total = 25
	type key struct {
		at time.Time
		id uuid.UUID
	}
	var want []key
	for i := range total {
		m := newMessage(t, 1+i%3)
		insert(t, b.db, m)
		// Three messages share each timestamp, so paging must break ties by id.
		at := base.Add(time.Duration(i/3) * time.Second)
		if _, err := b.raw.Exec(ctx, `UPDATE messages SET created_at = $2 WHERE id = $1`, m.ID, at); err != nil {
			t.Fatal(err)
		}
		want = append(want, key{at, m.ID})
	}
	slices.SortFunc(want, func(a, b key) int {
		if c := b.at.Compare(a.at); c != 0 {
			return c
		}
		return bytes.Compare(b.id[:], a.id[:])
	})

	var got []key
	var after *db.Cursor
	pages := 0
	for {
		page, err := b.db.ListMessages(ctx, db.ListMessagesParams{ProjectID: db.DefaultProjectID(), Limit: 10, After: after})
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		pages++
		for _, m := range page {
			got = append(got, key{m.CreatedAt, m.ID})
		}
		last := page[len(page)-1]
		after = &db.Cursor{CreatedAt: last.CreatedAt, ID: last.ID}
		if pages > total {
			t.Fatal("paging does not end")
		}
	}
	if pages != 3 {
		t.Errorf("%d pages, want 3", pages)
	}
	if len(got) != total {
		t.Fatalf("paged through %d messages, want %d", len(got), total)
	}
	for i := range want {
		if got[i].id != want[i].id || !got[i].at.Equal(want[i].at) {
			t.Fatalf("position %d: got %v, want %v", i, got[i], want[i])
		}
	}
}
