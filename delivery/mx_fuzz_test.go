package delivery

import (
	"context"
	"net/netip"
	"testing"

	"github.com/miekg/dns"
)

// answerResolver answers every question from one DNS message, as a hostile
// or broken server could.
type answerResolver struct{ msg *dns.Msg }

func (r answerResolver) lookupMX(context.Context, string) ([]mxRecord, error) {
	return mxRecordsOf(r.msg.Answer), nil
}

func (r answerResolver) lookupAddrs(context.Context, string, []uint16) ([]netip.Addr, error) {
	return addrsOf(nil, r.msg.Answer), nil
}

func (r answerResolver) lookupTXT(context.Context, string) ([]string, error) {
	return nil, nil
}

// FuzzMXAnswer feeds DNS messages from the wire through the MX answer
// handling and routing: no answer may panic, make the router return more
// than MaxHosts targets, or a target without a usable address, nor a host
// name that could break the SMTP session or the TLS server name (the
// resolver's names are text with escapes, never raw octets).
func FuzzMXAnswer(f *testing.F) {
	seed := func(rrs ...string) {
		m := new(dns.Msg)
		m.SetQuestion("example.test.", dns.TypeMX)
		for _, s := range rrs {
			rr, err := dns.NewRR(s)
			if err != nil {
				f.Fatal(err)
			}
			m.Answer = append(m.Answer, rr)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	seed("example.test. 60 IN MX 10 mx.example.test.", "mx.example.test. 60 IN A 192.0.2.1")
	seed("example.test. 60 IN MX 0 .")
	seed("example.test. 60 IN MX 0 .", "example.test. 60 IN MX 10 mx.example.test.")
	seed("example.test. 60 IN CNAME other.test.", "other.test. 60 IN MX 5 mx.other.test.",
		"mx.other.test. 60 IN AAAA 2001:db8::1")
	seed(`example.test. 60 IN MX 10 mx\013\010RCPT\032TO.example.test.`, "x. 60 IN A 0.0.0.0")
	seed("example.test. 60 IN MX 65535 a.test.", "example.test. 60 IN MX 65535 b.test.", "a.test. 60 IN A 255.255.255.255")
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, wire []byte) {
		msg := new(dns.Msg)
		if err := msg.Unpack(wire); err != nil {
			return
		}
		const maxHosts = 5
		r := newRouter(answerResolver{msg}, nil, 25, maxHosts)
		targets, serr := r.targets(t.Context(), "example.test")
		if serr != nil {
			if serr.Code < 400 || serr.Code > 599 {
				t.Fatalf("error code %d", serr.Code)
			}
			return
		}
		if len(targets) == 0 || len(targets) > maxHosts {
			t.Fatalf("%d targets", len(targets))
		}
		for _, tg := range targets {
			if !tg.IP.IsValid() || tg.Port != 25 || tg.Host == "" {
				t.Fatalf("target %+v", tg)
			}
			if tg.Host != "example.test" && !isHostName(tg.Host) {
				t.Fatalf("target host %q is not a host name", tg.Host)
			}
		}
	})
}
