package bounce

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func date(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

// TestParseReportFixtures parses one message in the style of each MTA or
// provider and checks every field a handler would use.
func TestParseReportFixtures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		file string
		want Report
	}{
		{"postfix_dsn.eml", Report{
			Kind:              KindDSN,
			Subject:           "Undelivered Mail Returned to Sender",
			From:              "MAILER-DAEMON@mx1.example.test (Mail Delivery System)",
			ReportingMTA:      "mx1.example.test",
			ArrivalDate:       date("2024-05-14T09:12:39Z"),
			OriginalMessageID: "0190f1a2.abc@shop.example.test",
			OriginalMailFrom:  "b+aeaz@bounces.example.test",
			Recipients: []RecipientReport{{
				FinalRecipient:    "nobody@example.test",
				OriginalRecipient: "Nobody@example.test",
				Action:            "failed",
				Status:            "5.1.1",
				ReplyCode:         550,
				DiagnosticType:    "smtp",
				Diagnostic:        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox table",
				RemoteMTA:         "mail.example.test",
			}},
		}},
		{"exim_dsn.eml", Report{
			Kind:              KindDSN,
			Subject:           "Mail delivery failed: returning message to sender",
			From:              "Mail Delivery System <Mailer-Daemon@relay.example.test>",
			ReportingMTA:      "relay.example.test",
			OriginalMessageID: "exim-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients: []RecipientReport{
				{FinalRecipient: "full@example.test", Action: "failed", Status: "5.0.0", ReplyCode: 552,
					DiagnosticType: "smtp", Diagnostic: "552 5.2.2 Mailbox full", RemoteMTA: "mx.example.test"},
				{FinalRecipient: "gone@example.test", Action: "failed", Status: "5.0.0", ReplyCode: 550,
					DiagnosticType: "smtp", Diagnostic: "550 5.2.1 This mailbox has been disabled", RemoteMTA: "mx.example.test"},
			},
		}},
		{"exchange_dsn.eml", Report{
			Kind:              KindDSN,
			Subject:           "Undeliverable: Password reset",
			From:              "<postmaster@contoso.example.test>",
			ReportingMTA:      "DM6PR01MB1234.namprd01.prod.outlook.com",
			ArrivalDate:       date("2024-05-16T08:30:10Z"),
			OriginalMessageID: "outlook-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients: []RecipientReport{{
				FinalRecipient: "jdoe@contoso.example.test",
				Action:         "failed",
				Status:         "5.1.10",
				ReplyCode:      550,
				DiagnosticType: "smtp",
				Diagnostic:     "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
			}},
		}},
		{"gmail_dsn.eml", Report{
			Kind:              KindDSN,
			Subject:           "Delivery Status Notification (Failure)",
			From:              "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
			ReportingMTA:      "googlemail.com",
			ArrivalDate:       date("2024-05-17T02:03:03-07:00"),
			OriginalMessageID: "gmail-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients: []RecipientReport{{
				FinalRecipient:  "alice.example@gmail.test",
				Action:          "failed",
				Status:          "5.2.2",
				ReplyCode:       552,
				DiagnosticType:  "smtp",
				Diagnostic:      "552-5.2.2 The recipient's inbox is out of storage space. Please direct the recipient to 552 5.2.2  https://support.google.test/mail/?p=OverQuotaPerm a1si123 - gsmtp",
				RemoteMTA:       "gmail-smtp-in.l.google.test",
				LastAttemptDate: date("2024-05-17T02:03:04-07:00"),
			}},
		}},
		{"yahoo_arf.eml", Report{
			Kind:              KindComplaint,
			Subject:           "FW: Weekly deals",
			From:              "Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.test>",
			ArrivalDate:       date("2024-05-18T10:15:00Z"),
			OriginalMessageID: "yahoo-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients:        []RecipientReport{{FinalRecipient: "carol@yahoo.test"}},
			Feedback: &Feedback{
				Type:           "abuse",
				UserAgent:      "Yahoo!-Mail-Feedback/2.0",
				Version:        "0.1",
				OriginalRcptTo: []string{"carol@yahoo.test"},
				SourceIP:       "198.51.100.7",
				ReportedDomain: []string{"shop.example.test"},
			},
		}},
		{"outlook_arf.eml", Report{
			Kind:              KindComplaint,
			Subject:           "complaint about message from 198.51.100.7",
			From:              "staff@hotmail.test",
			ArrivalDate:       date("2024-05-19T06:58:00-07:00"),
			OriginalMessageID: "outlook-arf-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients:        []RecipientReport{{FinalRecipient: "dave@hotmail.test"}, {FinalRecipient: "erin@hotmail.test"}},
			Feedback: &Feedback{
				Type:           "abuse",
				UserAgent:      "Hotmail FBL",
				Version:        "1",
				OriginalRcptTo: []string{"dave@hotmail.test", "erin@hotmail.test"},
				SourceIP:       "198.51.100.7",
				ReportedDomain: []string{"shop.example.test", "bounces.example.test"},
			},
		}},
		{"outlook_ooo.eml", Report{
			Kind:    KindAutoReply,
			Subject: "Automatic reply: Your invoice",
			From:    "Frank Miller <frank@contoso.example.test>",
		}},
		{"qmail.eml", Report{
			Kind:    KindUnstructuredBounce,
			Subject: "failure notice",
			From:    "MAILER-DAEMON@oldhost.example.test",
			// From the copy below the marker line.
			OriginalMessageID: "qmail-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients: []RecipientReport{
				{FinalRecipient: "henry@example.test", Action: "failed", Status: "5.1.1", ReplyCode: 550,
					Diagnostic: "Remote host said: 550 5.1.1 <henry@example.test>: Recipient address rejected: User unknown Giving up on 192.0.2.40."},
				{FinalRecipient: "ivy@example.test", Action: "failed", Status: "5.1.1",
					Diagnostic: "Sorry, no mailbox here by that name. (#5.1.1)"},
			},
		}},
		{"exim_text.eml", Report{
			Kind:              KindUnstructuredBounce,
			Subject:           "Mail delivery failed: returning message to sender",
			From:              "Mail Delivery System <Mailer-Daemon@relay.example.test>",
			OriginalMessageID: "exim-text-original@shop.example.test",
			OriginalMailFrom:  "b+token@bounces.example.test",
			Recipients: []RecipientReport{{
				FinalRecipient: "jack@example.test", Action: "failed", Status: "5.7.1", ReplyCode: 554,
				Diagnostic: "554 5.7.1 Service unavailable; Client host [198.51.100.7] blocked using zen.spamhaus.org",
			}},
		}},
		{"sendmail_old.eml", Report{
			Kind:              KindUnstructuredBounce,
			Subject:           "Returned mail: User unknown",
			From:              "Mail Delivery Subsystem <MAILER-DAEMON@old.example.test>",
			OriginalMessageID: "sendmail-original@shop.example.test",
			Recipients: []RecipientReport{{
				FinalRecipient: "kim@old.example.test", Action: "failed", ReplyCode: 550,
				Diagnostic: "<<< 550 <kim@old.example.test>... User unknown 550 <kim@old.example.test>... User unknown",
			}},
		}},
		{"failure_no_code.eml", Report{
			Kind:    KindUnstructuredBounce,
			Subject: "Delivery failure",
			From:    "postmaster@tiny.example.test",
			Recipients: []RecipientReport{{
				Diagnostic: "Your message could not be delivered. The recipient's server gave no reason.",
			}},
		}},
		{"human_reply.eml", Report{
			Kind:    KindUnknown,
			Subject: "Re: Your order",
			From:    "Lee <lee@example.test>",
		}},
	}
	for _, tt := range tests {
		t.Run(strings.TrimSuffix(tt.file, ".eml"), func(t *testing.T) {
			t.Parallel()
			got := ParseReport(readFixture(t, tt.file))
			assertReport(t, got, tt.want)
		})
	}
}

// assertReport compares reports field by field, times by instant.
func assertReport(t *testing.T, got, want Report) {
	t.Helper()
	if !got.ArrivalDate.Equal(want.ArrivalDate) {
		t.Errorf("ArrivalDate = %v, want %v", got.ArrivalDate, want.ArrivalDate)
	}
	got.ArrivalDate, want.ArrivalDate = time.Time{}, time.Time{}
	if len(got.Recipients) != len(want.Recipients) {
		t.Fatalf("%d recipients, want %d: %+v", len(got.Recipients), len(want.Recipients), got.Recipients)
	}
	for i := range got.Recipients {
		g, w := got.Recipients[i], want.Recipients[i]
		if !g.LastAttemptDate.Equal(w.LastAttemptDate) {
			t.Errorf("recipient %d: LastAttemptDate = %v, want %v", i, g.LastAttemptDate, w.LastAttemptDate)
		}
		g.LastAttemptDate, w.LastAttemptDate = time.Time{}, time.Time{}
		if g != w {
			t.Errorf("recipient %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
	got.Recipients, want.Recipients = nil, nil
	if !reflect.DeepEqual(got.Feedback, want.Feedback) {
		t.Errorf("Feedback:\n got %+v\nwant %+v", got.Feedback, want.Feedback)
	}
	got.Feedback, want.Feedback = nil, nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("report:\n got %+v\nwant %+v", got, want)
	}
}

func TestParseReportAutoReplies(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		header string
		want   Kind
	}{
		{"auto-submitted auto-replied", "Auto-Submitted: auto-replied\r\nSubject: Re: hello\r\n", KindAutoReply},
		{"auto-submitted no", "Auto-Submitted: no\r\nSubject: Re: hello\r\n", KindUnknown},
		{"x-autoreply", "X-Autoreply: yes\r\nSubject: Re: hello\r\n", KindAutoReply},
		{"x-autorespond", "X-Autorespond: Re: hello\r\nSubject: Re: hello\r\n", KindAutoReply},
		{"precedence auto_reply", "Precedence: auto_reply\r\nSubject: hello\r\n", KindAutoReply},
		{"precedence bulk is a list, not a reply", "Precedence: bulk\r\nSubject: hello\r\n", KindUnknown},
		{"out of office subject", "Subject: Out of Office: Your invoice\r\n", KindAutoReply},
		{"german subject", "Subject: AW: Abwesenheitsnotiz\r\n", KindAutoReply},
		{"encoded french subject", "Subject: =?utf-8?q?R=C3=A9ponse_automatique=3A_facture?=\r\n", KindAutoReply},
		{"suppress header alone is no reply", "X-Auto-Response-Suppress: All\r\nSubject: Re: hello\r\n", KindUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			raw := "From: someone@example.test\r\n" + tt.header + "\r\nbody\r\n"
			if got := ParseReport([]byte(raw)).Kind; got != tt.want {
				t.Fatalf("Kind = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestParseReportBroken(t *testing.T) {
	t.Parallel()
	deep := strings.Builder{}
	deep.WriteString("Content-Type: multipart/mixed; boundary=b0\r\n\r\n")
	for i := 1; i < 200; i++ {
		deep.WriteString("--b" + strconv.Itoa(i-1) + "\r\nContent-Type: multipart/mixed; boundary=b" + strconv.Itoa(i) + "\r\n\r\n")
	}
	manyParts := strings.Builder{}
	manyParts.WriteString("Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n")
	for range 10000 {
		manyParts.WriteString("--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n")
	}
	manyParts.WriteString("--x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; late.test\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--x--\r\n")

	tests := []struct {
		name string
		raw  string
		want Kind
	}{
		{"empty", "", KindUnknown},
		{"no header end", "Subject: x", KindUnknown},
		{"binary", "\x00\xff\xfe\r\n\r\n\x00", KindUnknown},
		{"unterminated multipart", "Content-Type: multipart/report; report-type=delivery-status; boundary=z\r\n\r\n--z\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x.test\r\n\r\nFinal-Recipient: rfc822; a@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n", KindDSN},
		{"report without boundary", "Content-Type: multipart/report; report-type=delivery-status\r\n\r\nnothing", KindUnknown},
		{"deep nesting", deep.String(), KindUnknown},
		// The delivery-status part comes after more parts than are read.
		{"too many parts", manyParts.String(), KindUnknown},
		{"unknown charset and encoding", "Content-Type: text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: x-weird\r\nFrom: MAILER-DAEMON@x.test\r\n\r\n550 5.1.1 no\r\n", KindUnstructuredBounce},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := ParseReport([]byte(tt.raw)).Kind; got != tt.want {
				t.Fatalf("Kind = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestFindCodes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		text     string
		enhanced string
		reply    int
	}{
		{"550 5.1.1 <a@b.test>: User unknown", "5.1.1", 550},
		{"550-5.7.26 This mail has been blocked", "5.7.26", 550},
		{"Remote host said: 552 mailbox full", "", 552},
		{"<<< 250 2.1.0 ok <<< 451 4.7.1 greylisted", "4.7.1", 451},
		{"Sorry, no mailbox here by that name. (#5.1.1)", "5.1.1", 0},
		{"host 192.0.2.5.1 said nothing", "", 0},
		{"Version 5.1.1.2 of something", "", 0},
		{"after 500 attempts", "", 0},
		{"no code here", "", 0},
		{"status 5.1.1.", "5.1.1", 0},
	}
	for _, tt := range tests {
		t.Run(tt.text, func(t *testing.T) {
			t.Parallel()
			if got := findEnhanced(tt.text); got != tt.enhanced {
				t.Errorf("findEnhanced = %q, want %q", got, tt.enhanced)
			}
			if got, _ := findReplyCode(tt.text); got != tt.reply {
				t.Errorf("findReplyCode = %d, want %d", got, tt.reply)
			}
		})
	}
}
