package delivery

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/textproto"
	"strings"
	"time"
)

// pipe returns the reader and writer of pipelined transactions on the
// connection's current stream (plain, or TLS once STARTTLS is done). Only
// replies to commands written here are read here, so nothing is left
// buffered between transactions for another reader to miss.
func (sc *smtpConn) pipe() (*textproto.Reader, *bufio.Writer) {
	if sc.pipeOn != sc.conn {
		sc.pipeOn = sc.conn
		sc.pipeR = textproto.NewReader(bufio.NewReader(sc.conn))
		sc.pipeW = bufio.NewWriter(sc.conn)
	}
	return sc.pipeR, sc.pipeW
}

// pipelinedTransaction runs a transaction with a server that offers
// PIPELINING (RFC 2920): RSET (on a reused connection), MAIL, every RCPT and
// DATA go out in one write, and their replies are read in order; the
// message follows the 354, and the reply to its end closes the transaction.
// That is two round trips whatever the number of recipients, where waiting
// for each reply takes four plus one per recipient. DATA ends the group, as
// section 3.1 requires: the message itself waits for the 354.
//
// Every reply is read and checked, as section 3.1 asks of a client: a 5yz
// or 4yz to RCPT fails only that recipient; a refused MAIL fails every
// recipient with its own reply (the RCPT replies that follow it, which say
// only that MAIL is missing, are read and dropped); and when nothing was
// accepted, a 354 to DATA all the same is answered with a lone dot, its
// reply dropped, so that no message is sent.
//
// A reused connection whose RSET gets no positive reply was dropped while it
// was idle; nothing of the transaction can have been accepted, and
// errStale says to try another connection.
func (sc *smtpConn) pipelinedTransaction(ctx context.Context, from string, rcpts []string, data []byte) ([]rcptResult, error) {
	reset := sc.reused
	sc.reused = false
	data, body8, serr := sc.prepare(data)
	if serr != nil {
		// Refused before MAIL: no transaction was started, and the
		// connection stays usable.
		return failAll(len(rcpts), serr), nil
	}
	sc.uses++
	stop := context.AfterFunc(ctx, func() { sc.raw.Close() })
	defer func() {
		if !stop() {
			sc.broken = true
		}
	}()
	defer sc.raw.SetDeadline(time.Time{})

	t := &txResults{sc: sc, ctx: ctx, results: make([]rcptResult, len(rcpts)), decided: make([]bool, len(rcpts))}
	mail, err := sc.mailLine(from, len(data), body8)
	if err != nil {
		return t.failRest(err), nil
	}
	for _, rcpt := range rcpts {
		if strings.ContainsAny(rcpt, "\r\n") {
			return t.failRest(fmt.Errorf("recipient %q holds a line break", rcpt)), nil
		}
	}

	r, w := sc.pipe()
	if reset {
		w.WriteString("RSET\r\n")
	}
	w.WriteString(mail)
	w.WriteString("\r\n")
	for _, rcpt := range rcpts {
		w.WriteString("RCPT TO:<")
		w.WriteString(rcpt)
		w.WriteString(">\r\n")
	}
	w.WriteString("DATA\r\n")
	sc.raw.SetDeadline(time.Now().Add(sc.cfg.CommandTimeout))
	flushErr := w.Flush()
	read := func(expect int) (int, string, error) {
		if flushErr != nil {
			return 0, "", flushErr
		}
		sc.raw.SetReadDeadline(time.Now().Add(sc.cfg.CommandTimeout))
		return r.ReadResponse(expect)
	}

	if reset {
		if _, _, err := read(250); err != nil {
			sc.broken = true
			if ctx.Err() != nil {
				return t.failRest(err), nil
			}
			return nil, fmt.Errorf("%w: %w", errStale, err)
		}
	}
	_, _, mailErr := read(250)
	if mailErr != nil && brokenConnection(mailErr) {
		return t.failRest(mailErr), nil
	}
	accepted := 0
	for i := range rcpts {
		// RFC 5321 section 4.1.1.3: 250 or 251 accept a recipient.
		_, _, err := read(25)
		switch {
		case err != nil && brokenConnection(err):
			return t.failRest(err), nil
		case mailErr != nil:
			// Section 3.1 of RFC 2920: after a refused MAIL the server
			// answers the RCPTs that were already on their way with
			// errors about the missing MAIL; the recipients fail with
			// the reply to MAIL below.
		case err != nil:
			t.results[i].Err = asSMTPError(err)
			t.decided[i] = true
		default:
			accepted++
		}
	}
	_, _, dataErr := read(354)
	if dataErr != nil && brokenConnection(dataErr) {
		return t.failRest(dataErr), nil
	}
	if mailErr != nil || accepted == 0 {
		if dataErr == nil {
			// RFC 2920 section 3.1: a server that accepts DATA with no
			// transaction or no recipient is sent a lone dot, and its
			// reply means nothing.
			w.WriteString(".\r\n")
			if err := w.Flush(); err != nil {
				return t.failRest(err), nil
			}
			if _, _, err := read(0); err != nil && brokenConnection(err) {
				return t.failRest(err), nil
			}
		}
		if mailErr != nil {
			return t.failRest(mailErr), nil
		}
		// Every recipient was refused: the server's transaction ends with
		// the RSET that starts the connection's next use.
		return t.results, nil
	}
	if dataErr != nil {
		return t.failRest(dataErr), nil
	}

	// The message goes out under the data timeout: without one, a server
	// that stops reading would block the write for good.
	sc.raw.SetDeadline(time.Now().Add(sc.cfg.DataTimeout))
	dw := textproto.NewWriter(w).DotWriter()
	if _, err := dw.Write(data); err != nil {
		sc.broken = true
		return t.failRest(err), nil
	}
	// The end of the data is the point of no return: once it is sent the
	// server may take the message. An attempt past its deadline stops short
	// of it: the lease that the deadline protects may be gone, and another
	// dispatcher may be sending the same message. The buffered writer keeps
	// the dot, and the last bytes before it, until Close.
	if ctx.Err() != nil {
		sc.broken = true
		return t.failRest(context.Cause(ctx)), nil
	}
	err = dw.Close()
	code, msg := 0, ""
	if err == nil {
		sc.raw.SetReadDeadline(time.Now().Add(sc.cfg.DataTimeout))
		// Any 2yz is a positive completion (RFC 5321 section 4.2.1).
		code, msg, err = r.ReadResponse(2)
	}
	if err != nil {
		if !isReply(err) && !writeFailed(err) {
			// The final "." was written (a failed write would have kept
			// it, the last bytes, back): the server may have taken the
			// message, and only its reply was lost (RFC 1047).
			sc.broken = true
			cause := err
			if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
				cause = fmt.Errorf("%w: %w", context.Cause(ctx), err)
			}
			return t.failRest(ambiguousError(cause)), nil
		}
		return t.failRest(err), nil
	}
	enhanced, text := splitEnhancedCode(msg)
	accept := reply{Code: code, EnhancedCode: enhanced, Text: text}
	for i := range t.results {
		if !t.decided[i] {
			t.results[i].Reply = accept
			t.decided[i] = true
		}
	}
	return t.results, nil
}

// txResults are the per-recipient results of a transaction being made.
type txResults struct {
	sc      *smtpConn
	ctx     context.Context
	results []rcptResult
	decided []bool
}

// failRest gives every recipient not decided yet err, and marks the
// connection broken when err leaves it so.
func (t *txResults) failRest(err error) []rcptResult {
	se := asSMTPError(err)
	if t.ctx.Err() != nil && !isReply(err) && !errors.Is(err, t.ctx.Err()) {
		// The connection was closed under the client because the context
		// ended; say so rather than "use of closed connection".
		se = asSMTPError(fmt.Errorf("%w: %w", context.Cause(t.ctx), err))
	}
	for i := range t.results {
		if !t.decided[i] {
			t.results[i].Err = se
			t.decided[i] = true
		}
	}
	if brokenConnection(err) {
		t.sc.broken = true
	}
	return t.results
}
