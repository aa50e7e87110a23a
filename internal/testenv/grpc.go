package testenv

import (
	"net"
	"testing"

	"google.golang.org/grpc"
)

// ServeGRPC serves gs on a free loopback port until the test ends and
// returns the address to dial.
func ServeGRPC(t testing.TB, gs *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: listen for grpc: %v", err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		gs.Stop()
		<-served
	})
	return lis.Addr().String()
}
