//go:build chaos && linux

package chaos

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// counts is what every fault test reports.
type counts struct {
	sent        int // requests made
	accepted    int // 2xx / OK
	unavailable int // 503 / Unavailable
	noAnswer    int // refused, reset or timed out
	other       int // any other answer
	delivered   int // accepted messages that reached the sink
	lost        int // accepted messages that never did
	duplicated  int // copies beyond the first, over every recipient
	unsolicited int // delivered without a 2xx (the answer was lost in a fault)
}

func (c counts) String() string {
	return fmt.Sprintf("sent=%d accepted(2xx)=%d delivered=%d lost=%d duplicated=%d "+
		"(503/unavailable=%d no-answer=%d other=%d delivered-without-2xx=%d)",
		c.sent, c.accepted, c.delivered, c.lost, c.duplicated,
		c.unavailable, c.noAnswer, c.other, c.unsolicited)
}

// tally matches the requests against what the sink received.
func tally(sends []send, received map[string]int) counts {
	var c counts
	c.sent = len(sends)
	for _, s := range sends {
		n := received[s.rcpt]
		switch s.outcome {
		case accepted:
			c.accepted++
			if n > 0 {
				c.delivered++
			} else {
				c.lost++
			}
		case unavailable:
			c.unavailable++
		case noAnswer:
			c.noAnswer++
		case otherStatus:
			c.other++
		}
		if s.outcome != accepted && n > 0 {
			c.unsolicited++
		}
	}
	for _, n := range received {
		c.duplicated += max(0, n-1)
	}
	return c
}

// acceptedBefore returns the recipients of requests accepted by t.
func acceptedBefore(sends []send, t time.Time) []string {
	var out []string
	for _, s := range sends {
		if s.outcome == accepted && !s.ended.After(t) {
			out = append(out, s.rcpt)
		}
	}
	return out
}

// waitDelivered waits until every recipient in rcpts has a copy at the
// sink, and returns those still missing when ctx ends.
func waitDelivered(ctx context.Context, sk *sink, rcpts []string) []string {
	missing := rcpts
	for {
		received, changed := sk.snapshot()
		missing = slices.DeleteFunc(slices.Clone(missing), func(r string) bool { return received[r] > 0 })
		if len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return missing
		case <-changed:
		}
	}
}

// waitFinal waits until every accepted message is delivered in the
// database (the sink counts a message before its outcome is committed), and
// returns those the database does not hold (a 2xx for something not
// committed) and those still not delivered when ctx ends.
func waitFinal(ctx context.Context, databaseURL string, sends []send) (absent, undelivered []string, err error) {
	for {
		absent, undelivered, err = notFinal(ctx, databaseURL, sends)
		if err != nil || len(absent)+len(undelivered) == 0 {
			return absent, undelivered, err
		}
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return absent, undelivered, nil
		case <-t.C:
		}
	}
}

// notFinal returns the accepted messages whose ids the database does not
// hold and those not delivered.
func notFinal(ctx context.Context, databaseURL string, sends []send) (absent, undelivered []string, err error) {
	var ids []string
	for _, s := range sends {
		if s.outcome == accepted {
			ids = append(ids, s.id)
		}
	}
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to check messages: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, `SELECT id::text, status FROM messages WHERE id = ANY($1::uuid[])`, ids)
	if err != nil {
		return nil, nil, fmt.Errorf("look up accepted messages: %w", err)
	}
	status := make(map[string]string, len(ids))
	var id, st string
	_, err = pgx.ForEachRow(rows, []any{&id, &st}, func() error {
		status[id] = st
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("look up accepted messages: %w", err)
	}
	for _, id := range ids {
		st, ok := status[strings.ToLower(id)]
		switch {
		case !ok:
			absent = append(absent, id)
		case st != "delivered":
			undelivered = append(undelivered, id+" ("+st+")")
		}
	}
	return absent, undelivered, nil
}

// percentile returns the p-th percentile of ds (p in [0,1]).
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1))]
}

// firstN returns at most n elements, for failure messages.
func firstN(s []string, n int) []string {
	return s[:min(n, len(s))]
}

// leaseLostCopies tells, for the messages of lease lost warnings, how many
// copies reached the sink: a warning whose recipient arrived once was
// about an outcome that was in fact written.
func leaseLostCopies(ids []string, sends []send, received map[string]int) (once, more int) {
	rcpt := make(map[string]string, len(sends))
	for _, s := range sends {
		if s.id != "" {
			rcpt[s.id] = s.rcpt
		}
	}
	for _, id := range ids {
		switch n := received[rcpt[id]]; {
		case n == 1:
			once++
		case n > 1:
			more++
		}
	}
	return once, more
}
