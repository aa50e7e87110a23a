package testenv

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Main runs a package's tests, stops the embedded PostgreSQL if this process
// started one, and then fails the run if goroutines leaked. Packages that use
// a database call it from TestMain instead of goleak.VerifyTestMain, whose
// leak check would otherwise run while the embedded server is still up.
func Main(m *testing.M, opts ...goleak.Option) {
	code := m.Run()
	if err := stopEmbedded(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: %v\n", err)
		code = 1
	}
	// Keep-alive connections of the default client are not leaks.
	http.DefaultClient.CloseIdleConnections()
	if code == 0 {
		if err := goleak.Find(opts...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func stopEmbedded() error {
	embedded.mu.Lock()
	defer embedded.mu.Unlock()
	if embedded.srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := embedded.srv.Stop(ctx)
	embedded.srv = nil
	if rmErr := os.RemoveAll(embedded.dir); err == nil && rmErr != nil {
		err = rmErr
	}
	if err != nil {
		return fmt.Errorf("stop embedded PostgreSQL: %w", err)
	}
	return nil
}
