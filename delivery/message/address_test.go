package message_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/delivery/message"
)

func TestNormalizeMailboxValid(t *testing.T) {
	t.Parallel()
	label63 := strings.Repeat("a", 63)
	// The longest domain a mailbox can have: "a@" and 252 octets make the
	// 254 a path leaves for the mailbox.
	domain252 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 55) + ".test"
	domain190 := label63 + "." + label63 + "." + strings.Repeat("c", 57) + ".test"
	tests := []struct {
		in, envelope, domain string
	}{
		{"user@example.test", "user@example.test", "example.test"},
		{"User.Name+tag@Example.TEST", "User.Name+tag@example.test", "example.test"},
		{"user@bücher.test", "user@xn--bcher-kva.test", "xn--bcher-kva.test"},
		{"user@BÜCHER.Test", "user@xn--bcher-kva.test", "xn--bcher-kva.test"},
		{"user@xn--bcher-kva.test", "user@xn--bcher-kva.test", "xn--bcher-kva.test"},
		{"user@XN--BCHER-KVA.TEST", "user@xn--bcher-kva.test", "xn--bcher-kva.test"},
		{"user@straße.test", "user@xn--strae-oqa.test", "xn--strae-oqa.test"},
		{"user@mail.日本.test", "user@mail.xn--wgv71a.test", "mail.xn--wgv71a.test"},
		{"user@bücher\u3002test", "user@xn--bcher-kva.test", "xn--bcher-kva.test"}, // ideographic full stop is a dot (UTS #46)
		{"a@r3---sn-abc.example.test", "a@r3---sn-abc.example.test", "r3---sn-abc.example.test"},
		{"a@1a.example.test", "a@1a.example.test", "1a.example.test"},
		{"a@b.c1", "a@b.c1", "b.c1"},
		{"!#$%&'*+-/=?^_`{|}~@example.test", "!#$%&'*+-/=?^_`{|}~@example.test", "example.test"},
		{`"john doe"@example.test`, `"john doe"@example.test`, "example.test"},
		{`"john"@example.test`, "john@example.test", "example.test"},
		{`"a.b"@example.test`, "a.b@example.test", "example.test"},
		{`"a..b"@example.test`, `"a..b"@example.test`, "example.test"},
		{`".a"@example.test`, `".a"@example.test`, "example.test"},
		{`"a\"b"@example.test`, `"a\"b"@example.test`, "example.test"},
		{`"a\\b"@example.test`, `"a\\b"@example.test`, "example.test"},
		{`"a\b"@example.test`, "ab@example.test", "example.test"},
		{`"a@b"@example.test`, `"a@b"@example.test`, "example.test"},
		{"a@[192.0.2.1]", "a@[192.0.2.1]", "[192.0.2.1]"},
		{"a@[IPv6:2001:DB8::1]", "a@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"},
		{"a@[ipv6:2001:db8:0:0:0:0:0:1]", "a@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"},
		{"a@[IPv6:::ffff:192.0.2.1]", "a@[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:192.0.2.1]"},
		{strings.Repeat("l", 64) + "@example.test", strings.Repeat("l", 64) + "@example.test", "example.test"},
		{"a@" + label63 + ".test", "a@" + label63 + ".test", label63 + ".test"},
		{"a@" + domain252, "a@" + domain252, domain252},
		{strings.Repeat("l", 63) + "@" + domain190, strings.Repeat("l", 63) + "@" + domain190, domain190}, // 254 octets
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			env, dom, err := message.NormalizeMailbox(tt.in)
			if err != nil {
				t.Fatalf("NormalizeMailbox(%q): %v", tt.in, err)
			}
			if env != tt.envelope || dom != tt.domain {
				t.Errorf("NormalizeMailbox(%q) = %q, %q; want %q, %q", tt.in, env, dom, tt.envelope, tt.domain)
			}
			// The envelope form is itself a valid mailbox that normalizes to itself.
			env2, dom2, err := message.NormalizeMailbox(env)
			if err != nil || env2 != env || dom2 != dom {
				t.Errorf("NormalizeMailbox(%q) = %q, %q, %v; want it unchanged", env, env2, dom2, err)
			}
		})
	}
}

func TestNormalizeMailboxInvalid(t *testing.T) {
	t.Parallel()
	label63 := strings.Repeat("a", 63)
	domain190 := label63 + "." + label63 + "." + strings.Repeat("c", 57) + ".test"
	tests := []struct {
		name, in string
		smtputf8 bool
	}{
		{"empty", "", false},
		{"leading space", " a@example.test", false},
		{"trailing space", "a@example.test ", false},
		{"inner space", "a b@example.test", false},
		{"space before at", "a @example.test", false},
		{"space after at", "a@ example.test", false},
		{"tab", "a\t@example.test", false},
		{"angle brackets", "<a@example.test>", false},
		{"display name", "A <a@example.test>", false},
		{"ESMTP parameter", "a@example.test> NOTIFY=SUCCESS", false},
		{"ESMTP parameter without bracket", "a@example.test NOTIFY=SUCCESS", false},
		{"angle bracket inside a quoted local part", `"x> NOTIFY=SUCCESS"@example.test`, false},
		{"open angle bracket inside a quoted local part", `"a<b"@example.test`, false},
		{"command injection", "a@example.test\r\nRCPT TO:<x@example.test>", false},
		{"trailing CRLF", "a@example.test\r\n", false},
		{"trailing LF", "a@example.test\n", false},
		{"trailing CR", "a@example.test\r", false},
		{"NUL", "a\x00@example.test", false},
		{"no at", "a.example.test", false},
		{"empty local", "@example.test", false},
		{"empty domain", "a@", false},
		{"two ats", "a@b@example.test", false},
		{"dotless domain", "a@example", false},
		{"localhost", "root@localhost", false},
		{"leading dot", ".a@example.test", false},
		{"trailing dot", "a.@example.test", false},
		{"double dot", "a..b@example.test", false},
		{"domain empty label", "a@example..test", false},
		{"domain leading dot", "a@.example.test", false},
		{"domain trailing dot", "a@example.test.", false},
		{"domain leading hyphen", "a@-example.test", false},
		{"domain trailing hyphen", "a@example-.test", false},
		{"underscore in domain", "a@ex_ample.test", false},
		{"comma", "a@example.test,b@example.test", false},
		{"comment", "a(comment)@example.test", false},
		{"domain comment", "a@example.test(comment)", false},
		{"special in local", "a,b@example.test", false},
		{"backslash outside quotes", `a\b@example.test`, false},
		{"quote in dot-string", `a"b@example.test`, false},
		{"unterminated quote", `"a@example.test`, false},
		{"empty quoted", `""@example.test`, false},
		{"text after quoted", `"a"b@example.test`, false},
		{"CR in quoted", "\"a\rb\"@example.test", false},
		{"LF in quoted", "\"a\nb\"@example.test", false},
		{"CRLF in quoted", "\"a\r\nRCPT TO:<x@example.test>\"@example.test", false},
		{"escaped LF in quoted", "\"a\\\nb\"@example.test", false},
		{"local part 65", strings.Repeat("l", 65) + "@example.test", false},
		{"quoted local part 65", `"` + strings.Repeat("l", 62) + ` "@example.test`, false},
		{"label 64", "a@" + strings.Repeat("a", 64) + ".test", false},
		{"domain 254", "a@" + label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 57) + ".test", false},
		{"domain 256", "a@" + label63 + "." + label63 + "." + label63 + "." + label63 + ".tes", false},
		{"mailbox 255", strings.Repeat("l", 64) + "@" + domain190, false},
		{"huge", strings.Repeat("a", 5000) + "@example.test", false},
		{"numeric TLD", "a@192.0.2.1", false},
		{"IPv4 literal short", "a@[192.0.2]", false},
		{"IPv4 literal leading zero", "a@[192.0.2.01]", false},
		{"IPv6 without tag", "a@[2001:db8::1]", false},
		{"IPv6 tag with IPv4", "a@[IPv6:192.0.2.1]", false},
		{"IPv6 zone", "a@[IPv6:fe80::1%eth0]", false},
		{"general literal", "a@[x-tag:foo]", false},
		{"unclosed literal", "a@[192.0.2.1", false},
		{"literal with trailing text", "a@[192.0.2.1]x", false},
		{"invalid A-label", "a@xn--zz.test", false},
		{"IDN zero width joiner", "a@b\u200dc.test", false},
		{"IDN leading hyphen", "a@-bücher.test", false},
		{"IDN with space", "a@bü cher.test", false},
		{"IDN fullwidth bracket", "a@bücher.test\uff1e", false},
		{"non-ASCII local", "jörg@example.test", true},
		{"non-ASCII quoted local", `"jörg"@example.test`, true},
		{"non-ASCII local and IDN", "用户@例子.test", true},
		{"invalid UTF-8 local", "a\xff@example.test", true},
		{"invalid UTF-8 domain", "a@exa\xffmple.test", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			env, dom, err := message.NormalizeMailbox(tt.in)
			if err == nil {
				t.Fatalf("NormalizeMailbox(%q) = %q, %q; want an error", tt.in, env, dom)
			}
			if env != "" || dom != "" {
				t.Errorf("NormalizeMailbox(%q) returned %q, %q with its error", tt.in, env, dom)
			}
			if !errors.Is(err, message.ErrInvalidMailbox) {
				t.Errorf("error %v does not wrap ErrInvalidMailbox", err)
			}
			if got := errors.Is(err, message.ErrSMTPUTF8Unsupported); got != tt.smtputf8 {
				t.Errorf("errors.Is(%v, ErrSMTPUTF8Unsupported) = %v, want %v", err, got, tt.smtputf8)
			}
			if strings.ContainsAny(err.Error(), "\r\n") {
				t.Errorf("error message holds a line break: %q", err)
			}
		})
	}
}

func TestAddressLiteralIP(t *testing.T) {
	t.Parallel()
	tests := []struct {
		domain string
		ip     string // "" means not a literal
	}{
		{"[192.0.2.1]", "192.0.2.1"},
		{"[IPv6:2001:db8::1]", "2001:db8::1"},
		{"[ipv6:2001:DB8::1]", "2001:db8::1"},
		{"example.test", ""},
		{"[2001:db8::1]", ""},
		{"[IPv6:192.0.2.1]", ""},
		{"[bogus]", ""},
		{"", ""},
	}
	for _, tt := range tests {
		ip, ok := message.AddressLiteralIP(tt.domain)
		switch {
		case tt.ip == "" && ok:
			t.Errorf("AddressLiteralIP(%q) = %v, true; want false", tt.domain, ip)
		case tt.ip != "" && (!ok || ip != netip.MustParseAddr(tt.ip)):
			t.Errorf("AddressLiteralIP(%q) = %v, %v; want %s", tt.domain, ip, ok, tt.ip)
		}
	}
}

func FuzzNormalizeMailbox(f *testing.F) {
	for _, s := range []string{
		"user@example.test", `"john doe"@example.test`, `"a\"b"@example.test`, "a@[192.0.2.1]",
		"a@[IPv6:2001:db8::1]", "user@bücher.test", "a@example.test> NOTIFY=SUCCESS",
		"a@example.test\r\nRCPT TO:<x@example.test>", "<a@example.test>", `"a b"@ex ample.test`,
		"a@b\u3002test", "a@xn--bcher-kva.test", `"<a>"@example.test`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		env, dom, err := message.NormalizeMailbox(in)
		if err != nil {
			if !errors.Is(err, message.ErrInvalidMailbox) {
				t.Fatalf("error %v does not wrap ErrInvalidMailbox", err)
			}
			return
		}
		if len(env) > 254 {
			t.Fatalf("%q: envelope %q is %d octets", in, env, len(env))
		}
		for i := 0; i < len(env); i++ {
			if c := env[i]; c < ' ' || c > '~' {
				t.Fatalf("%q: envelope %q has octet %#x", in, env, c)
			}
		}
		if !strings.HasSuffix(env, "@"+dom) {
			t.Fatalf("%q: envelope %q does not end in @%s", in, env, dom)
		}
		local := strings.TrimSuffix(env, "@"+dom)
		if strings.HasPrefix(local, `"`) {
			if len(local) < 3 || !strings.HasSuffix(local, `"`) {
				t.Fatalf("%q: malformed quoted local part %q", in, local)
			}
		} else if strings.ContainsAny(local, "<> \"\\") {
			t.Fatalf("%q: unquoted local part %q has a special", in, local)
		}
		if strings.ContainsAny(dom, "<> \"\\") || dom != strings.ToLower(dom) && !strings.HasPrefix(dom, "[IPv6:") {
			t.Fatalf("%q: domain %q is not lowercase or has a special", in, dom)
		}
		env2, dom2, err := message.NormalizeMailbox(env)
		if err != nil || env2 != env || dom2 != dom {
			t.Fatalf("%q: NormalizeMailbox(%q) = %q, %q, %v; want it unchanged", in, env, env2, dom2, err)
		}
	})
}
