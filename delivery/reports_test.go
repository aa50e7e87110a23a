package delivery

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/internal/testenv"
)

func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("bounce", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// deliverAll inserts a message to the addresses and records every recipient
// delivered, as if an MX had taken it.
func (e *dispatchEnv) deliverAll(t testing.TB, to ...string) uuid.UUID {
	t.Helper()
	ctx := context.Background()
	id := e.insert(t, time.Time{}, to...)
	c, err := e.store.ClaimWithContents(ctx, db.ClaimParams{Owner: "test-" + id.String(), Limit: 1000, LeaseFor: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var outs []db.Outcome
	for _, r := range c.Recipients {
		if r.MessageID == id {
			outs = append(outs, db.Outcome{RecipientID: r.ID, LeaseOwner: r.LeaseOwner, Status: db.StatusDelivered, Code: 250})
		}
	}
	if applied, err := e.store.RecordOutcomes(ctx, outs); err != nil || len(applied) != len(to) {
		t.Fatalf("deliver: applied %d of %d: %v", len(applied), len(to), err)
	}
	return id
}

// events returns a message's events of one type.
func (e *dispatchEnv) events(t testing.TB, id uuid.UUID, typ db.EventType) []db.Event {
	t.Helper()
	tl, err := e.store.MessageTimeline(context.Background(), db.DefaultProjectID(), id)
	if err != nil {
		t.Fatal(err)
	}
	var out []db.Event
	for _, ev := range tl.Events {
		if ev.Type == typ {
			out = append(out, ev)
		}
	}
	return out
}

func (e *dispatchEnv) suppressed(t testing.TB, addr string) (db.Suppression, bool) {
	t.Helper()
	s, err := e.store.GetSuppression(context.Background(), db.DefaultProjectID(), addr)
	if errors.Is(err, db.ErrNotFound) {
		return db.Suppression{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return s, true
}

// TestReportHandlerFixtures applies the DSNs of several MTAs, each with a
// token that names only the message, as for a transaction with several
// recipients: the DSN's addresses pick the recipients.
func TestReportHandlerFixtures(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	h := NewReportHandler(e.store, nil)
	type want struct {
		class      BounceClass
		permanent  bool
		suppressed bool
	}
	tests := []struct {
		file    string
		bounced map[string]want
	}{
		{"postfix_dsn.eml", map[string]want{"nobody@example.test": {BounceRecipient, true, true}}},
		{"exim_dsn.eml", map[string]want{
			"full@example.test": {BounceMailboxFull, true, false},
			"gone@example.test": {BounceMailboxDisabled, true, true},
		}},
		{"exchange_dsn.eml", map[string]want{"jdoe@contoso.example.test": {BounceRecipient, true, true}}},
		{"gmail_dsn.eml", map[string]want{"alice.example@gmail.test": {BounceMailboxFull, true, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			t.Parallel()
			var to []string
			for a := range tt.bounced {
				to = append(to, a)
			}
			slices.Sort(to)
			bystander := "bystander@" + strings.TrimSuffix(tt.file, ".eml") + ".test"
			to = append(to, bystander)
			id := e.deliverAll(t, to...)
			rep := bounce.ParseReport(fixture(t, tt.file))
			if err := h.HandleReport(context.Background(), bounce.Token{Message: id}, rep); err != nil {
				t.Fatal(err)
			}
			m := e.get(t, id)
			if r := recipient(t, m, bystander); r.Status != db.StatusDelivered {
				t.Errorf("bystander %s, want delivered", r.Status)
			}
			events := e.events(t, id, db.EventBounced)
			if len(events) != len(tt.bounced) {
				t.Fatalf("%d bounced events, want %d", len(events), len(tt.bounced))
			}
			for addr, w := range tt.bounced {
				r := recipient(t, m, addr)
				if r.Status != db.StatusBounced {
					t.Errorf("%s: status %s, want bounced", addr, r.Status)
				}
				var ev *db.Event
				for i := range events {
					if events[i].RecipientID == r.ID {
						ev = &events[i]
					}
				}
				if ev == nil {
					t.Fatalf("%s: no bounced event", addr)
				}
				p := ev.Payload
				if p.Class != string(w.class) || p.Permanent != w.permanent || p.DSNAction != "failed" || p.DSNStatus == "" || p.DiagnosticCode == "" {
					t.Errorf("%s: payload %+v, want class %s permanent %v with the DSN fields", addr, p, w.class, w.permanent)
				}
				if _, ok := e.suppressed(t, addr); ok != w.suppressed {
					t.Errorf("%s: suppressed %v, want %v", addr, ok, w.suppressed)
				}
			}
			// The same report again, as after a lost reply: nothing new.
			before := len(e.events(t, id, db.EventBounced)) + len(e.events(t, id, db.EventSuppressed))
			if err := h.HandleReport(context.Background(), bounce.Token{Message: id}, rep); err != nil {
				t.Fatal(err)
			}
			if after := len(e.events(t, id, db.EventBounced)) + len(e.events(t, id, db.EventSuppressed)); after != before {
				t.Errorf("a repeated report wrote %d events more", after-before)
			}
		})
	}
}

func TestReportHandlerDelayedOnlyAddsAnEvent(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	h := NewReportHandler(e.store, nil)
	id := e.deliverAll(t, "nobody@example.test")
	raw := fixture(t, "postfix_dsn.eml")
	raw = bytes.Replace(raw, []byte("Action: failed\nStatus: 5.1.1"), []byte("Action: delayed\nStatus: 4.4.7"), 1)
	raw = bytes.Replace(raw, []byte("Diagnostic-Code: smtp; 550 5.1.1"), []byte("Diagnostic-Code: smtp; 451 4.4.7"), 1)
	rep := bounce.ParseReport(raw)
	if len(rep.Recipients) != 1 || rep.Recipients[0].Action != "delayed" {
		t.Fatalf("fixture edit failed: %+v", rep.Recipients)
	}
	// The token names the recipient (position 1): the DSN's address is not
	// consulted.
	if err := h.HandleReport(context.Background(), bounce.Token{Message: id, Recipient: bounce.RecipientAt(1)}, rep); err != nil {
		t.Fatal(err)
	}
	m := e.get(t, id)
	if m.Status != db.StatusDelivered || m.Recipients[0].Status != db.StatusDelivered {
		t.Errorf("status %s / %s, want delivered", m.Status, m.Recipients[0].Status)
	}
	delayed := e.events(t, id, db.EventDelayed)
	if len(delayed) != 1 || delayed[0].RecipientID != m.Recipients[0].ID || delayed[0].Payload.DSNStatus != "4.4.7" {
		t.Errorf("delayed events %+v", delayed)
	}
	if len(e.events(t, id, db.EventBounced)) != 0 {
		t.Error("a delay bounced")
	}
}

func TestReportHandlerUnmatched(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	h := NewReportHandler(e.store, nil)
	ctx := context.Background()
	id := e.deliverAll(t, "one@example.test", "two@example.test")
	// A bounce for an address the message was not sent to, with a token
	// naming only the message: logged, nothing changes.
	if err := h.HandleReport(ctx, bounce.Token{Message: id}, bounce.ParseReport(fixture(t, "postfix_dsn.eml"))); err != nil {
		t.Fatal(err)
	}
	// A complaint whose addresses are redacted: an event of the message.
	arf := bounce.ParseReport(fixture(t, "yahoo_arf.eml"))
	if err := h.HandleReport(ctx, bounce.Token{Message: id}, arf); err != nil {
		t.Fatal(err)
	}
	// A message that does not exist: accepted and dropped.
	if err := h.HandleReport(ctx, bounce.Token{Message: uuid.New()}, arf); err != nil {
		t.Fatal(err)
	}
	m := e.get(t, id)
	if m.Status != db.StatusDelivered {
		t.Errorf("status %s, want delivered", m.Status)
	}
	complained := e.events(t, id, db.EventComplained)
	if len(complained) != 1 || complained[0].RecipientID != uuid.Nil {
		t.Errorf("complained events %+v, want one of the message", complained)
	}
	if n := len(e.events(t, id, db.EventBounced)) + len(e.events(t, id, db.EventSuppressed)); n != 0 {
		t.Errorf("%d bounced or suppressed events", n)
	}
}

func TestReportHandlerComplaintAndAutoReply(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	h := NewReportHandler(e.store, nil)
	ctx := context.Background()
	id := e.deliverAll(t, "carol@yahoo.test", "dave@example.test")
	if err := h.HandleReport(ctx, bounce.Token{Message: id}, bounce.ParseReport(fixture(t, "yahoo_arf.eml"))); err != nil {
		t.Fatal(err)
	}
	m := e.get(t, id)
	carol := recipient(t, m, "carol@yahoo.test")
	complained := e.events(t, id, db.EventComplained)
	if len(complained) != 1 || complained[0].RecipientID != carol.ID || complained[0].Payload.Reason != "abuse" {
		t.Errorf("complained events %+v", complained)
	}
	if carol.Status != db.StatusDelivered {
		t.Errorf("complaining recipient is %s, want still delivered", carol.Status)
	}
	if s, ok := e.suppressed(t, "carol@yahoo.test"); !ok || s.Reason != db.SuppressionComplaint {
		t.Errorf("suppression %+v %v", s, ok)
	}
	if got := e.events(t, id, db.EventSuppressed); len(got) != 1 || got[0].Payload.Reason != string(db.SuppressionComplaint) {
		t.Errorf("suppressed events %+v", got)
	}

	if err := h.HandleReport(ctx, bounce.Token{Message: id, Recipient: bounce.RecipientAt(2)},
		bounce.ParseReport(fixture(t, "outlook_ooo.eml"))); err != nil {
		t.Fatal(err)
	}
	auto := e.events(t, id, db.EventAutoReplied)
	if len(auto) != 1 || auto[0].RecipientID != recipient(t, m, "dave@example.test").ID {
		t.Errorf("auto_replied events %+v", auto)
	}
	if got := e.get(t, id); got.Status != db.StatusDelivered {
		t.Errorf("status %s after an automatic reply", got.Status)
	}
}

// TestDispatchReturnPathIsVERP: the MX sees a VERP envelope sender naming
// the message, and the recipient when the transaction carries one; the
// From header is unchanged.
func TestDispatchReturnPathIsVERP(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("one.test", srv)
	e.mx("two.test", srv)
	verp, err := bounce.NewVERP("bounces.sender.test", "", [][]byte{[]byte("0123456789abcdef0123")})
	if err != nil {
		t.Fatal(err)
	}
	cfg := e.config()
	cfg.VERP = verp
	id := e.insert(t, time.Time{}, "a@one.test", "b@two.test", "c@two.test")
	e.start(t, cfg)
	e.waitMessage(t, id, "delivery", final)
	msgs := srv.Messages()
	if len(msgs) != 2 {
		t.Fatalf("%d transactions, want 2", len(msgs))
	}
	for _, m := range msgs {
		tok, err := verp.Parse(m.From)
		if err != nil {
			t.Fatalf("MAIL FROM %q: %v", m.From, err)
		}
		if tok.Message != id {
			t.Errorf("token names message %s, want %s", tok.Message, id)
		}
		switch len(m.To) {
		case 1:
			if !tok.Recipient.Valid || tok.Recipient.Position != 1 {
				t.Errorf("one-recipient transaction to %v: token recipient %+v, want position 1", m.To, tok.Recipient)
			}
		case 2:
			if tok.Recipient.Valid {
				t.Errorf("two-recipient transaction: token names recipient %+v", tok.Recipient)
			}
		}
		if !bytes.Contains(m.Data, []byte("From: sender@sender.test")) {
			t.Errorf("From header changed:\n%s", m.Data)
		}
	}
}

// TestDispatchClassifiesRefusals: a 5yz rate limit defers without
// suppressing, an unknown user bounces with its class and suppresses, a
// policy refusal bounces without suppressing.
func TestDispatchClassifiesRefusals(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		switch {
		case strings.HasPrefix(to, "limited@"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "too many messages from your IP, slow down"}
		case strings.HasPrefix(to, "unknown@"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		case strings.HasPrefix(to, "blocked@"):
			return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Service unavailable; client host blocked using zen.spamhaus.org"}
		}
		return nil
	}))
	e.mx("c.test", srv)
	cfg := e.config()
	cfg.Retry.InitialInterval = time.Hour // the deferral stays put
	cfg.Retry.MaxInterval = time.Hour
	id := e.insert(t, time.Time{}, "limited@c.test", "unknown@c.test", "blocked@c.test")
	e.start(t, cfg)
	m := e.waitMessage(t, id, "outcomes", func(m db.Message) bool {
		for _, r := range m.Recipients {
			if r.Status == db.StatusQueued || r.Status == db.StatusSending {
				return false
			}
		}
		return true
	})
	if r := recipient(t, m, "limited@c.test"); r.Status != db.StatusBounced {
		t.Errorf("rate-limited: %s, want bounced (a 5yz), not suppressed", r.Status)
	}
	if r := recipient(t, m, "unknown@c.test"); r.Status != db.StatusBounced {
		t.Errorf("unknown: %s, want bounced", r.Status)
	}
	if r := recipient(t, m, "blocked@c.test"); r.Status != db.StatusBounced {
		t.Errorf("blocked: %s, want bounced", r.Status)
	}
	classes := map[string]db.EventPayload{}
	for _, typ := range []db.EventType{db.EventBounced, db.EventDeferred} {
		for _, ev := range e.events(t, id, typ) {
			for _, r := range m.Recipients {
				if r.ID == ev.RecipientID {
					classes[r.Address] = ev.Payload
				}
			}
		}
	}
	if p := classes["limited@c.test"]; p.Class != string(BounceRateLimit) || p.Permanent {
		t.Errorf("limited: %+v", p)
	}
	if p := classes["unknown@c.test"]; p.Class != string(BounceRecipient) || !p.Permanent {
		t.Errorf("unknown: %+v", p)
	}
	if p := classes["blocked@c.test"]; p.Class != string(BouncePolicy) || !p.Permanent {
		t.Errorf("blocked: %+v", p)
	}
	for addr, want := range map[string]bool{"limited@c.test": false, "unknown@c.test": true, "blocked@c.test": false} {
		if _, ok := e.suppressed(t, addr); ok != want {
			t.Errorf("%s suppressed %v, want %v", addr, ok, want)
		}
	}
}
