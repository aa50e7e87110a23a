package bounce

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run on leaked goroutines: every listener a test starts
// must be stopped.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
