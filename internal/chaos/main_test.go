//go:build chaos && linux

package chaos

import (
	"testing"

	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}
