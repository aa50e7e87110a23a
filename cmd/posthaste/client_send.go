package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// runSend sends one message, built from flags or read from a JSON file in
// the API's form, and with --wait follows it until every recipient is final.
func runSend(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newPlainFlagSet("send", stderr)
	var (
		cf                        clientFlags
		from, subject, text, html string
		file                      string
		to, tags                  listFlag
		headers                   repeatedFlag
		wait                      bool
		pollInterval              time.Duration
	)
	cf.register(fs)
	fs.StringVar(&from, "from", "", `sender, "Name <addr>" or addr`)
	fs.Var(&to, "to", "recipient, repeatable or comma-separated")
	fs.StringVar(&subject, "subject", "", "subject")
	fs.StringVar(&text, "text", "", "plain-text body")
	fs.StringVar(&html, "html", "", "HTML body")
	fs.Var(&tags, "tag", "tag, repeatable or comma-separated")
	fs.Var(&headers, "header", `extra header "Name: value", repeatable`)
	fs.StringVar(&file, "file", "", "JSON file holding the message as the API's SendMessage request; replaces the message flags")
	fs.BoolVar(&wait, "wait", false, "follow the message until every recipient is final; exits non-zero unless all were delivered")
	fs.DurationVar(&pollInterval, "poll-interval", time.Second, "with --wait, how often to ask a server without WatchMessage")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("send: unexpected argument %q", fs.Arg(0))
	}
	req := &posthastev1.SendMessageRequest{}
	if file != "" {
		if from != "" || len(to) > 0 || subject != "" || text != "" || html != "" || len(tags) > 0 || len(headers) > 0 {
			return errors.New("send: give either --file or the message flags, not both")
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return fmt.Errorf("send: %w", err)
		}
		if err := protojson.Unmarshal(b, req); err != nil {
			return fmt.Errorf("send: %s: %w", file, err)
		}
	} else {
		var err error
		if req.From, err = parseAddress(from); err != nil {
			return fmt.Errorf("send: --from: %w", err)
		}
		for _, t := range to {
			a, err := parseAddress(t)
			if err != nil {
				return fmt.Errorf("send: --to: %w", err)
			}
			req.To = append(req.To, a)
		}
		for _, h := range headers {
			name, value, ok := strings.Cut(h, ":")
			if !ok {
				return fmt.Errorf("send: --header: want \"Name: value\", got %q", h)
			}
			req.Headers = append(req.Headers, &posthastev1.Header{Name: strings.TrimSpace(name), Value: strings.TrimSpace(value)})
		}
		req.Subject, req.Text, req.Html, req.Tags = subject, text, html, tags
	}
	client, conn, err := cf.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := client.SendMessage(ctx, req)
	if err != nil {
		return callError("send", err)
	}
	if cf.json {
		if err := writeJSON(stdout, resp); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "Accepted %s for %d recipient(s)\n", resp.GetId(), len(resp.GetRecipients()))
	}
	if !wait {
		return nil
	}
	addrs := make(map[string]string, len(resp.GetRecipients()))
	for _, r := range resp.GetRecipients() {
		addrs[r.GetId()] = r.GetAddress()
	}
	return follow(ctx, client, resp.GetId(), addrs, pollInterval, cf.json, stdout)
}

// follow prints what happens to a message until every recipient is final,
// from WatchMessage, or by polling GetMessage on a server without it.
func follow(ctx context.Context, client posthastev1.MailServiceClient, id string, addrs map[string]string, every time.Duration, asJSON bool, stdout io.Writer) error {
	stream, err := client.WatchMessage(ctx, &posthastev1.WatchMessageRequest{Id: id})
	if err != nil {
		return callError("watch", err)
	}
	for {
		ev, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if status.Code(err) == codes.Unimplemented {
			return poll(ctx, client, id, every, asJSON, stdout)
		}
		if err != nil {
			return callError("watch", err)
		}
		if asJSON {
			if err := writeJSON(stdout, ev); err != nil {
				return err
			}
			continue
		}
		who := addrs[ev.GetRecipientId()]
		if who == "" {
			who = "-"
		}
		fmt.Fprintf(stdout, "%s  %-10s %s  %s\n", formatTime(ev.GetCreatedAt()), ev.GetType(), who, formatReply(ev.GetReply()))
	}
	// The stream ended because every recipient is final; say how it ended.
	msg, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: id})
	if err != nil {
		return callError("status", err)
	}
	return finish(msg, asJSON, stdout)
}

// poll asks for the message until every recipient is final, printing each
// recipient's changes.
func poll(ctx context.Context, client posthastev1.MailServiceClient, id string, every time.Duration, asJSON bool, stdout io.Writer) error {
	seen := make(map[string]string)
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		msg, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: id})
		if err != nil {
			return callError("status", err)
		}
		done := true
		for _, r := range msg.GetRecipients() {
			if seen[r.GetId()] != r.GetStatus() {
				seen[r.GetId()] = r.GetStatus()
				if !asJSON {
					fmt.Fprintf(stdout, "%s  %-10s %s  %s\n", formatTime(r.GetUpdatedAt()), r.GetStatus(), r.GetAddress(), formatReply(r.GetLastReply()))
				}
			}
			done = done && finalStatus(r.GetStatus())
		}
		if done {
			return finish(msg, asJSON, stdout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
		}
	}
}

// finish prints the final state of a message and fails unless every
// recipient was delivered.
func finish(msg *posthastev1.Message, asJSON bool, stdout io.Writer) error {
	if asJSON {
		if err := writeJSON(stdout, msg); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "Message %s is %s\n", msg.GetId(), msg.GetStatus())
	}
	if msg.GetStatus() != "delivered" {
		return fmt.Errorf("message %s: %w (status %s)", msg.GetId(), errNotDelivered, msg.GetStatus())
	}
	return nil
}

// printMessage writes a message and its recipients as a table.
func printMessage(w io.Writer, msg *posthastev1.Message) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Message\t%s\n", msg.GetId())
	fmt.Fprintf(tw, "Status\t%s\n", msg.GetStatus())
	fmt.Fprintf(tw, "From\t%s\n", msg.GetFrom())
	fmt.Fprintf(tw, "Subject\t%s\n", msg.GetSubject())
	fmt.Fprintf(tw, "Tags\t%s\n", strings.Join(msg.GetTags(), ", "))
	fmt.Fprintf(tw, "Created\t%s\n", formatTime(msg.GetCreatedAt()))
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RECIPIENT\tKIND\tSTATUS\tATTEMPTS\tNEXT ATTEMPT\tLAST REPLY")
	for _, r := range msg.GetRecipients() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", r.GetAddress(), r.GetKind(), r.GetStatus(), r.GetAttemptCount(), formatTime(r.GetNextAttemptAt()), formatReply(r.GetLastReply()))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}
