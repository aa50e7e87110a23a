package bounce_test

import (
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/posthaste/posthaste/delivery/bounce"
)

func ExampleVERP() {
	v, err := bounce.NewVERP("bounces.example.test", "b", [][]byte{[]byte("a secret of at least 16 bytes")})
	if err != nil {
		panic(err)
	}
	msg := uuid.MustParse("0190f1a2-7b3c-7d4e-8f60-123456789abc")
	addr := v.Address(msg, bounce.RecipientAt(2))
	local, domain, _ := strings.Cut(addr, "@")
	fmt.Println(len(local), domain)

	// Some MTAs fold the address to upper or lower case; it still parses.
	tok, err := v.Parse(strings.ToUpper(addr))
	fmt.Println(tok.Message, tok.Recipient.Position, err)
	// Output:
	// 52 bounces.example.test
	// 0190f1a2-7b3c-7d4e-8f60-123456789abc 2 <nil>
}

func ExampleParseReport() {
	raw := "From: MAILER-DAEMON@mx.example.test\r\n" +
		"Subject: failure notice\r\n" +
		"\r\n" +
		"Hi. This is the qmail-send program at mx.example.test.\r\n" +
		"\r\n" +
		"<someone@example.test>:\r\n" +
		"Remote host said: 550 5.1.1 User unknown\r\n"
	r := bounce.ParseReport([]byte(raw))
	fmt.Println(r.Kind, r.Recipients[0].FinalRecipient, r.Recipients[0].ReplyCode, r.Recipients[0].Status)
	// Output: unstructured_bounce someone@example.test 550 5.1.1
}
