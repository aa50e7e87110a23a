package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// maxReturnedHeader bounds the original header kept to return in a report.
const maxReturnedHeader = 16 << 10

// pendingReport is what a bounce-async@ or complaint@ recipient makes the
// sandbox send once it has accepted the message: a DSN for the bounced
// recipients (one per transaction, as an MTA sends), a feedback report for
// each complaining one.
type pendingReport struct {
	from       string // the transaction's MAIL FROM: where reports go
	queueID    string
	arrived    time.Time
	bounced    []string
	complained []string
	header     []byte // the original message's header, CRLF line ends
}

// headerCapture keeps the header of a message as it is read: the bytes up
// to the first empty line, at most maxReturnedHeader of them.
type headerCapture struct {
	buf  bytes.Buffer
	done bool
}

func (h *headerCapture) Write(p []byte) (int, error) {
	if h.done {
		return len(p), nil
	}
	room := maxReturnedHeader - h.buf.Len()
	h.buf.Write(p[:min(len(p), room)])
	if i := bytes.Index(h.buf.Bytes(), []byte("\r\n\r\n")); i >= 0 {
		h.buf.Truncate(i + 2)
		h.done = true
	} else if h.buf.Len() >= maxReturnedHeader {
		h.done = true
	}
	return len(p), nil
}

// scheduleReport sends r's reports after ReportDelay, unless the server stops
// first. They go over SMTP, from the null sender, to r.from at ReportAddr: the
// bounce listener, which finds the message and recipient in the VERP address.
func (s *Server) scheduleReport(r pendingReport) {
	s.reports.Go(func() {
		t := time.NewTimer(s.cfg.ReportDelay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-s.reportCtx.Done():
			return
		}
		ctx, cancel := context.WithTimeout(s.reportCtx, 30*time.Second)
		defer cancel()
		if len(r.bounced) > 0 {
			s.sendReport(ctx, r.from, s.dsn(r), "dsn", r.bounced)
		}
		for _, rcpt := range r.complained {
			s.sendReport(ctx, r.from, s.arf(r, rcpt), "complaint", []string{rcpt})
		}
	})
}

// sendReport delivers one report to the listener and logs what happened; a
// report that cannot be delivered is dropped, as the sandbox keeps no queue.
func (s *Server) sendReport(ctx context.Context, to string, msg []byte, kind string, about []string) {
	if err := s.deliverReport(ctx, to, msg); err != nil {
		s.log.Warn("sandbox could not send report", "kind", kind, "to", to, "about", about, "err", err)
		return
	}
	s.log.Info("sandbox sent report", "kind", kind, "to", to, "about", about)
}

func (s *Server) deliverReport(ctx context.Context, to string, msg []byte) error {
	d := net.Dialer{Timeout: 10 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", s.cfg.ReportAddr)
	if err != nil {
		return fmt.Errorf("dial %s: %w", s.cfg.ReportAddr, err)
	}
	// go-smtp's client takes no context: closing the connection is what
	// ends a call in progress when ctx does.
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	c := smtp.NewClient(conn)
	defer c.Close()
	c.CommandTimeout = 30 * time.Second
	c.SubmissionTimeout = 30 * time.Second
	if err := c.Hello(s.cfg.Hostname); err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	// Reports are sent from the null reverse-path, so that they never
	// cause reports of their own (RFC 5321 section 4.5.5, RFC 3464 section 2).
	if err := c.Mail("", nil); err != nil {
		return fmt.Errorf("MAIL FROM:<>: %w", err)
	}
	if err := c.Rcpt(to, nil); err != nil {
		return fmt.Errorf("RCPT TO:<%s>: %w", to, err)
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(msg); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of data: %w", err)
	}
	return c.Quit()
}

// dsn builds a delivery status notification (RFC 3464) the way Postfix
// writes one: a multipart/report (RFC 6522) with a human-readable part, the
// message/delivery-status part, and the returned header.
func (s *Server) dsn(r pendingReport) []byte {
	host := s.cfg.Hostname
	boundary := r.queueID + "." + fmt.Sprint(r.arrived.Unix()) + "/" + host
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\r\n", args...) }
	line("From: MAILER-DAEMON@%s (Mail Delivery System)", host)
	line("To: %s", r.from)
	line("Subject: Undelivered Mail Returned to Sender")
	line("Date: %s", time.Now().Format(time.RFC1123Z))
	line("Message-Id: <%s.%s@%s>", r.arrived.Format("20060102150405"), r.queueID, host)
	line("Auto-Submitted: auto-replied")
	line("MIME-Version: 1.0")
	line("Content-Type: multipart/report; report-type=delivery-status;")
	line("\tboundary=\"%s\"", boundary)
	line("")
	line("This is a MIME-encapsulated message.")
	line("")
	line("--%s", boundary)
	line("Content-Description: Notification")
	line("Content-Type: text/plain; charset=us-ascii")
	line("")
	line("This is the mail system at host %s.", host)
	line("")
	line("I'm sorry to have to inform you that your message could not")
	line("be delivered to one or more recipients.")
	line("")
	line("                   The mail system")
	for _, rcpt := range r.bounced {
		line("")
		line("<%s>: host %s said: %s (in reply to end of DATA command)", rcpt, mailboxHost, asyncBounceReply(rcpt))
	}
	line("")
	line("--%s", boundary)
	line("Content-Description: Delivery report")
	line("Content-Type: message/delivery-status")
	line("")
	line("Reporting-MTA: dns; %s", host)
	line("X-Postfix-Queue-ID: %s", r.queueID)
	line("X-Postfix-Sender: rfc822; %s", r.from)
	line("Arrival-Date: %s", r.arrived.Format(time.RFC1123Z))
	for _, rcpt := range r.bounced {
		line("")
		line("Final-Recipient: rfc822; %s", rcpt)
		line("Original-Recipient: rfc822;%s", rcpt)
		line("Action: failed")
		line("Status: 5.1.1")
		line("Remote-MTA: dns; %s", mailboxHost)
		line("Diagnostic-Code: smtp; %s", asyncBounceReply(rcpt))
	}
	line("")
	line("--%s", boundary)
	line("Content-Description: Undelivered Message Headers")
	line("Content-Type: text/rfc822-headers")
	line("")
	b.Write(r.header)
	line("")
	line("--%s--", boundary)
	return []byte(b.String())
}

// arf builds an abuse feedback report (RFC 5965) for one recipient, as a
// mailbox provider's feedback loop sends when its user marks the message as
// spam.
func (s *Server) arf(r pendingReport, rcpt string) []byte {
	host := s.cfg.Hostname
	boundary := "arf-" + r.queueID
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\r\n", args...) }
	line("From: <feedback@%s>", host)
	line("To: %s", r.from)
	line("Subject: Abuse report")
	line("Date: %s", time.Now().Format(time.RFC1123Z))
	line("Message-Id: <arf.%s.%s@%s>", r.queueID, fmt.Sprint(len(rcpt)), host)
	line("MIME-Version: 1.0")
	line("Content-Type: multipart/report; report-type=feedback-report;")
	line("\tboundary=\"%s\"", boundary)
	line("")
	line("--%s", boundary)
	line("Content-Type: text/plain; charset=us-ascii")
	line("")
	line("This is an email abuse report for a message received from you.")
	line("")
	line("--%s", boundary)
	line("Content-Type: message/feedback-report")
	line("")
	line("Feedback-Type: abuse")
	line("User-Agent: posthaste-sandbox/1")
	line("Version: 1")
	line("Original-Mail-From: <%s>", r.from)
	line("Original-Rcpt-To: <%s>", rcpt)
	line("Arrival-Date: %s", r.arrived.Format(time.RFC1123Z))
	line("Reporting-MTA: dns; %s", host)
	line("")
	line("--%s", boundary)
	line("Content-Type: text/rfc822-headers")
	line("")
	b.Write(r.header)
	line("")
	line("--%s--", boundary)
	return []byte(b.String())
}

// mailboxHost is the made-up final mail server whose refusal a DSN reports.
const mailboxHost = "mailbox.sandbox.invalid"

// asyncBounceReply is the reply the DSN of a bounce-async@ recipient quotes.
func asyncBounceReply(rcpt string) string {
	return "550 5.1.1 <" + rcpt + ">: Recipient address rejected: User unknown in virtual mailbox table"
}
