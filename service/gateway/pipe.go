package gateway

import (
	"context"
	"errors"
	"net"
	"sync"
)

// PipeListener is a net.Listener whose connections are made in memory by
// Dial, each one end of a net.Pipe. Serving the gRPC server on one and
// dialing it with WithDialer lets the gateway reach the server in its own
// process without a socket: no loopback TCP, no port, nothing another
// process could connect to, while the call still passes through the gRPC
// server's interceptors like any other.
type PipeListener struct {
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

// NewPipeListener returns a listener that accepts what Dial makes.
func NewPipeListener() *PipeListener {
	return &PipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

// errPipeClosed is what Accept and Dial return once the listener is closed.
var errPipeClosed = errors.New("in-memory listener closed")

// Accept waits for a Dial and returns the server's end of its pipe.
func (l *PipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, &net.OpError{Op: "accept", Net: pipeNetwork, Err: errPipeClosed}
	}
}

// Close stops Accept and Dial; connections already made stay open.
func (l *PipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

// Addr names the listener; it is not an address anything can dial.
func (l *PipeListener) Addr() net.Addr { return pipeAddr{} }

// Dial makes a connection to the listener and returns the client's end, once
// Accept took the other. The address is ignored: there is one listener.
func (l *PipeListener) Dial(ctx context.Context, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
	case <-ctx.Done():
	}
	client.Close()
	server.Close()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return nil, &net.OpError{Op: "dial", Net: pipeNetwork, Err: errPipeClosed}
}

const pipeNetwork = "pipe"

type pipeAddr struct{}

func (pipeAddr) Network() string { return pipeNetwork }
func (pipeAddr) String() string  { return "in-process" }
