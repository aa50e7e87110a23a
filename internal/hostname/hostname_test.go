package hostname

import "testing"

func TestChoose(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"mail.example.com", "mail.example.com"},
		{"Mail.Example.COM.", "mail.example.com"},
		{"vm", Fallback},
		{"", Fallback},
		{".", Fallback},
		{"bad host.example", Fallback},
	} {
		if got := choose(tc.in); got != tc.want {
			t.Errorf("choose(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
