package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"io"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// session is one SMTP connection's state. go-smtp calls its methods from the
// connection's goroutine only.
type session struct {
	srv    *Server
	remote string

	from  string
	rcpts []string
	kinds []behaviour
}

func (s *session) Reset() {
	s.from = ""
	s.rcpts = nil
	s.kinds = nil
}

func (s *session) Logout() error { return nil }

func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	s.Reset()
	s.from = from
	return nil
}

// Rcpt answers the RCPT-stage outcomes. A refused recipient is not part of
// the transaction, so it neither receives the message nor affects DATA.
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	kind := classify(to)
	var refusal *smtp.SMTPError
	switch kind {
	case behaviourBounce:
		refusal = errBounce
	case behaviourFull:
		refusal = errFull
	case behaviourDefer:
		if s.srv.deferNow(to, s.from) {
			refusal = errDefer
		}
	}
	if refusal != nil {
		s.srv.log.Info("sandbox refused recipient",
			"from", s.from, "to", to, "code", refusal.Code, "remote", s.remote)
		return refusal
	}
	s.rcpts = append(s.rcpts, to)
	s.kinds = append(s.kinds, kind)
	return nil
}

// Data answers for the whole transaction, as SMTP has one reply to DATA
// (RFC 5321 section 4.1.1.4): a reject-data@ recipient fails every recipient
// of its transaction, and a slow@ one delays them all.
func (s *session) Data(r io.Reader) error {
	var header headerCapture
	n, err := io.Copy(&header, r)
	if err != nil {
		// go-smtp reports an oversized message as an *SMTPError (552 5.3.4)
		// and sends it as is.
		return err
	}
	slow := false
	for _, k := range s.kinds {
		switch k {
		case behaviourRejectData:
			s.srv.log.Info("sandbox rejected message",
				"from", s.from, "to", s.rcpts, "size", n, "remote", s.remote)
			return errRejectData
		case behaviourSlow:
			slow = true
		}
	}
	if slow {
		s.srv.log.Debug("sandbox delaying reply to DATA",
			"delay", s.srv.cfg.SlowDelay, "from", s.from, "to", s.rcpts, "remote", s.remote)
		if !s.srv.waitSlow() {
			return errShuttingDown
		}
	}

	id := queueID()
	s.srv.record(Received{
		From:    s.from,
		To:      append([]string(nil), s.rcpts...),
		Size:    int(n),
		At:      time.Now(),
		QueueID: id,
	})
	s.srv.log.Info("sandbox accepted message",
		"queue_id", id, "from", s.from, "to", s.rcpts, "size", n, "remote", s.remote)
	s.report(id, header.buf.Bytes())
	// A 250 "error" is how go-smtp lets a backend choose the reply text, here
	// to carry the queue id.
	return &smtp.SMTPError{
		Code:         250,
		EnhancedCode: smtp.EnhancedCode{2, 0, 0},
		Message:      acceptedPrefix + id,
	}
}

// report schedules the reports that follow the bounce-async@ and complaint@
// recipients of an accepted transaction, when there is a listener to send
// them to and a reverse-path to send them to: mail from the null sender
// gets none (RFC 5321 section 4.5.5).
func (s *session) report(id string, header []byte) {
	if s.srv.cfg.ReportAddr == "" || s.from == "" {
		return
	}
	r := pendingReport{from: s.from, queueID: id, arrived: time.Now(), header: append([]byte(nil), header...)}
	for i, k := range s.kinds {
		switch k {
		case behaviourBounceAsync:
			r.bounced = append(r.bounced, s.rcpts[i])
		case behaviourComplaint:
			r.complained = append(r.complained, s.rcpts[i])
		}
	}
	if len(r.bounced) > 0 || len(r.complained) > 0 {
		s.srv.scheduleReport(r)
	}
}

func queueID() string {
	var b [6]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails; it crashes the program instead
	return strings.ToUpper(hex.EncodeToString(b[:]))
}

// normalize folds an address for the deferral memory. Case is folded for the
// whole address: strictly a local part is case-sensitive (RFC 5321 section
// 2.4), but no sandbox sender relies on that.
func normalize(addr string) string {
	return strings.ToLower(addr)
}
