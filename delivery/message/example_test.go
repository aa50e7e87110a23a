package message_test

import (
	"bytes"
	"fmt"
	"time"

	gomessage "github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"

	"github.com/posthaste/posthaste/delivery/message"
)

func ExampleBuild() {
	built, err := message.Build(message.Spec{
		From:    message.Address{Name: "Ada Lovelace", Address: "ada@example.test"},
		To:      []message.Address{{Name: "Jörg Müller", Address: "joerg@bücher.test"}},
		Subject: "Grüße",
		Text:    "Hello Jörg.\n",
		HTML:    "<p>Hello Jörg.</p>\n",
		Headers: []message.Header{{Name: "X-Campaign", Value: "welcome"}},
		// The Message-ID is <random@mail.example.test>.
		MessageIDDomain: "mail.example.test",
		Date:            time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	})
	if err != nil {
		fmt.Println(err)
		return
	}

	// Read the message back to show what it holds.
	e, err := gomessage.Read(bytes.NewReader(built.Raw))
	if err != nil {
		fmt.Println(err)
		return
	}
	h := mail.Header{Header: e.Header}
	for _, k := range []string{"Date", "From", "To", "Subject", "X-Campaign"} {
		fmt.Printf("%s: %s\n", k, h.Get(k))
	}
	subject, _ := h.Subject()
	mediaType, _, _ := h.ContentType()
	fmt.Println("decoded subject:", subject)
	fmt.Println("structure:", mediaType)
	// Output:
	// Date: Fri, 02 Jan 2026 03:04:05 +0000
	// From: "Ada Lovelace" <ada@example.test>
	// To: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@xn--bcher-kva.test>
	// Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=
	// X-Campaign: welcome
	// decoded subject: Grüße
	// structure: multipart/alternative
}
