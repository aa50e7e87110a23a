package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

const messagesUsage = `Usage: posthaste messages list [flags]

Lists the messages of the API key's project, newest first. Run
"posthaste messages list -h" for the filters.
`

const eventsUsage = `Usage: posthaste events tail [flags]

Prints the API key's project's events as they happen, until Ctrl-C. Run
"posthaste events tail -h" for the flags.
`

// runStatus prints one message and its recipients.
func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newPlainFlagSet("status", stderr)
	var cf clientFlags
	cf.register(fs)
	positional, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(positional) != 1 {
		return errors.New("status: give one message id")
	}
	client, conn, err := cf.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	msg, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: positional[0]})
	if err != nil {
		return callError("status", err)
	}
	if cf.json {
		return writeJSON(stdout, msg)
	}
	return printMessage(stdout, msg)
}

// runMessages runs "messages list".
func runMessages(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprint(stdout, messagesUsage)
		if len(args) == 0 {
			return errors.New("messages: no subcommand given")
		}
		return nil
	}
	if args[0] != "list" {
		return fmt.Errorf("messages: unknown subcommand %q", args[0])
	}
	fs := newPlainFlagSet("messages list", stderr)
	var (
		cf                   clientFlags
		statuses, tags       listFlag
		recipient, pageToken string
		limit                int
	)
	cf.register(fs)
	fs.Var(&statuses, "status", "only messages with one of these statuses, repeatable or comma-separated")
	fs.Var(&tags, "tag", "only messages with one of these tags, repeatable or comma-separated")
	fs.StringVar(&recipient, "recipient", "", "only messages to this address")
	fs.IntVar(&limit, "limit", 20, "most messages to list (at most 100)")
	fs.StringVar(&pageToken, "page-token", "", "the next page token a previous listing printed")
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("messages list: unexpected argument %q", fs.Arg(0))
	}
	client, conn, err := cf.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := client.ListMessages(ctx, &posthastev1.ListMessagesRequest{
		Statuses:  statuses,
		Tags:      tags,
		Recipient: recipient,
		PageSize:  int32(min(max(limit, 0), 1000)),
		PageToken: pageToken,
	})
	if err != nil {
		return callError("list messages", err)
	}
	if cf.json {
		return writeJSON(stdout, resp)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATUS\tCREATED\tFROM\tTO\tSUBJECT")
	for _, m := range resp.GetMessages() {
		var to []string
		for _, r := range m.GetRecipients() {
			to = append(to, r.GetAddress())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.GetId(), m.GetStatus(), formatTime(m.GetCreatedAt()), m.GetFrom(), strings.Join(to, ", "), m.GetSubject())
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if t := resp.GetNextPageToken(); t != "" {
		fmt.Fprintf(stdout, "\nMore: --page-token %s\n", t)
	}
	return nil
}

// runEvents runs "events tail".
func runEvents(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprint(stdout, eventsUsage)
		if len(args) == 0 {
			return errors.New("events: no subcommand given")
		}
		return nil
	}
	if args[0] != "tail" {
		return fmt.Errorf("events: unknown subcommand %q", args[0])
	}
	fs := newPlainFlagSet("events tail", stderr)
	var (
		cf        clientFlags
		types     listFlag
		tags      listFlag
		after     string
		fromStart bool
	)
	cf.register(fs)
	fs.Var(&types, "types", "only events of these types (accepted, delivered, bounced, ...), repeatable or comma-separated")
	fs.Var(&tags, "tag", "only events of messages with one of these tags, repeatable or comma-separated")
	fs.StringVar(&after, "after", "", "start after this cursor (as printed with --json); default: events from now on")
	fs.BoolVar(&fromStart, "from-start", false, "start from the first event still kept")
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("events tail: unexpected argument %q", fs.Arg(0))
	}
	if fromStart && after != "" {
		return errors.New("events tail: give --after or --from-start, not both")
	}
	client, conn, err := cf.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	if after == "" && !fromStart {
		if after, err = feedEnd(ctx, client, types); err != nil {
			return stopped(ctx, err)
		}
	}
	return stopped(ctx, tail(ctx, client, after, types, tags, cf.json, stdout, stderr))
}

// stopped makes the end of the context, which is how the user stops a
// stream, a clean exit.
func stopped(ctx context.Context, err error) error {
	if ctx.Err() != nil && (errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled) {
		return nil
	}
	return err
}

// feedEnd returns the position after the last event written so far, where
// a stream "from now on" begins. StreamEvents starts at a cursor only, so
// the feed is read to its end once.
func feedEnd(ctx context.Context, client posthastev1.MailServiceClient, types []string) (string, error) {
	cursor := ""
	for {
		page, err := client.ListEvents(ctx, &posthastev1.ListEventsRequest{After: cursor, Types: types, Limit: 1000})
		if err != nil {
			return "", callError("find the end of the event feed", err)
		}
		cursor = page.GetNextCursor()
		if !page.GetHasMore() {
			return cursor, nil
		}
	}
}

// tail prints events from the stream, and reconnects from the last cursor
// when the server ends the stream by shutting down.
func tail(ctx context.Context, client posthastev1.MailServiceClient, after string, types, tags []string, asJSON bool, stdout, stderr io.Writer) error {
	for {
		stream, err := client.StreamEvents(ctx, &posthastev1.StreamEventsRequest{After: after, Types: types, Tags: tags})
		if err != nil {
			return callError("stream events", err)
		}
		for {
			resp, err := stream.Recv()
			if err != nil {
				if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return fmt.Errorf("stream events: %w", err)
				}
				fmt.Fprintf(stderr, "posthaste: stream interrupted (%s), reconnecting\n", status.Convert(err).Message())
				break
			}
			after = resp.GetCursor()
			ev := resp.GetEvent()
			if ev == nil {
				continue // a checkpoint: only the cursor moves
			}
			if asJSON {
				if err := writeJSON(stdout, ev); err != nil {
					return err
				}
				continue
			}
			fmt.Fprintf(stdout, "%s  %-12s message %s  recipient %s  %s\n", formatTime(ev.GetCreatedAt()), ev.GetType(), ev.GetMessageId(), orDash(ev.GetRecipientId()), formatReply(ev.GetReply()))
		}
		// A server that is restarting needs a moment; a fixed pause keeps
		// this simple and is short next to a restart.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
