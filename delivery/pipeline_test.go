package delivery

import (
	"slices"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/testenv"
)

// TestPipelinedTransactionRoundTrips delivers to three recipients on a
// reused connection, with and without PIPELINING, and counts the round
// trips the client waited for.
func TestPipelinedTransactionRoundTrips(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts []testenv.SMTPOption
		// Round trips of the first transaction (EHLO, then the
		// transaction on the new connection) and of the second (on the
		// connection reused, RSET first).
		first, reused int64
	}{
		// EHLO; MAIL + 3 RCPT + DATA; the message and its dot.
		{"pipelining", nil, 3, 2},
		// EHLO; MAIL; RCPT x3; DATA; the message; then RSET first.
		{"lockstep", []testenv.SMTPOption{testenv.WithoutPipelining()}, 7, 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			srv := testenv.StartSMTP(t, tt.opts...)
			e.addMX("pipe.test", "mx.pipe.test", "192.0.2.1", 10, srv)
			to := []string{"a@pipe.test", "b@pipe.test", "c@pipe.test"}

			res := e.attempt(t, "pipe.test", to...)
			for i, r := range res.Rcpts {
				if r.Err != nil || r.Reply.Code != 250 {
					t.Fatalf("first transaction, recipient %d: %+v", i, r)
				}
			}
			first := e.dialer.roundTrips()
			res = e.attempt(t, "pipe.test", to...)
			for i, r := range res.Rcpts {
				if r.Err != nil || r.Reply.Code != 250 {
					t.Fatalf("second transaction, recipient %d: %+v", i, r)
				}
			}
			reused := e.dialer.roundTrips() - first
			if first != tt.first || reused != tt.reused {
				t.Fatalf("round trips: %d for the first transaction, %d on the reused connection; want %d and %d",
					first, reused, tt.first, tt.reused)
			}
			if n := srv.Connections(); n != 1 {
				t.Fatalf("%d connections, want 1", n)
			}
			if n := srv.Commands("RSET"); n != 1 {
				t.Fatalf("%d RSET, want 1", n)
			}
			msgs := srv.Messages()
			if len(msgs) != 2 || !slices.Equal(msgs[1].To, to) || string(msgs[1].Data) != string(testMessage("hello")) {
				t.Fatalf("messages %+v", msgs)
			}
		})
	}
}

func TestPipelinedRefusedRecipientFailsAlone(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		switch to {
		case "gone@mixed.test":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		case "busy@mixed.test":
			return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "mailbox full"}
		}
		return nil
	}))
	e.addMX("mixed.test", "mx.mixed.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "mixed.test", "gone@mixed.test", "ok@mixed.test", "busy@mixed.test", "ok2@mixed.test")
	if err := res.Rcpts[0].Err; err == nil || err.Code != 550 || err.EnhancedCode != "5.1.1" || err.Temporary() {
		t.Fatalf("refused recipient: %+v", res.Rcpts[0])
	}
	if err := res.Rcpts[2].Err; err == nil || err.Code != 452 || err.EnhancedCode != "4.2.2" || !err.Temporary() {
		t.Fatalf("deferred recipient: %+v", res.Rcpts[2])
	}
	for _, i := range []int{1, 3} {
		if r := res.Rcpts[i]; r.Err != nil || r.Reply.Code != 250 {
			t.Fatalf("accepted recipient %d: %+v", i, r)
		}
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"ok@mixed.test", "ok2@mixed.test"}) {
		t.Fatalf("messages %+v", msgs)
	}
}

// TestPipelinedRefusedMailFailsAll refuses MAIL with RCPT and DATA already
// on their way (RFC 2920 section 3.1): every recipient gets the reply to
// MAIL, not the server's complaints about the missing MAIL, nothing is
// delivered, and the connection serves the next transaction.
func TestPipelinedRefusedMailFailsAll(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		reply     *smtp.SMTPError
		temporary bool
	}{
		{"550", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "sender rejected"}, false},
		{"451", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "try later"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			var refuse atomic.Bool
			refuse.Store(true)
			srv := testenv.StartSMTP(t, testenv.WithMailReply(func(string) *smtp.SMTPError {
				if refuse.Load() {
					return tt.reply
				}
				return nil
			}))
			e.addMX("refused.test", "mx.refused.test", "192.0.2.1", 10, srv)

			res := e.attempt(t, "refused.test", "a@refused.test", "b@refused.test")
			want := "5.7.1"
			if tt.temporary {
				want = "4.7.1"
			}
			for i, r := range res.Rcpts {
				if r.Err == nil || r.Err.Code != tt.reply.Code || r.Err.EnhancedCode != want || r.Err.Temporary() != tt.temporary {
					t.Fatalf("recipient %d: %+v", i, r)
				}
			}
			if n := len(srv.Messages()); n != 0 {
				t.Fatalf("%d messages delivered after MAIL was refused", n)
			}
			if e.pool.idleCount() != 1 {
				t.Fatalf("idle connections %d, want 1", e.pool.idleCount())
			}

			refuse.Store(false)
			res = e.attempt(t, "refused.test", "a@refused.test", "b@refused.test")
			for i, r := range res.Rcpts {
				if r.Err != nil {
					t.Fatalf("next transaction, recipient %d: %v", i, r.Err)
				}
			}
			if n, c := len(srv.Messages()), srv.Connections(); n != 1 || c != 1 {
				t.Fatalf("%d messages over %d connections, want 1 over 1", n, c)
			}
		})
	}
}

// TestPipelinedEveryRecipientRefused sends DATA with the RCPTs, as
// pipelining must; the server refuses it, nothing is delivered, and the
// next transaction on the connection starts with RSET.
func TestPipelinedEveryRecipientRefused(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	var refuse atomic.Bool
	refuse.Store(true)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(string) *smtp.SMTPError {
		if refuse.Load() {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}))
	e.addMX("nobody.test", "mx.nobody.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "nobody.test", "a@nobody.test", "b@nobody.test")
	for i, r := range res.Rcpts {
		if r.Err == nil || r.Err.Code != 550 || r.Err.EnhancedCode != "5.1.1" {
			t.Fatalf("recipient %d: %+v", i, r)
		}
	}
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages with no recipient accepted", n)
	}
	refuse.Store(false)
	res = e.attempt(t, "nobody.test", "a@nobody.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatalf("next transaction: %v", err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"a@nobody.test"}) || srv.Connections() != 1 {
		t.Fatalf("messages %+v over %d connections", msgs, srv.Connections())
	}
	if n := srv.Commands("RSET"); n != 1 {
		t.Fatalf("%d RSET, want 1", n)
	}
}
