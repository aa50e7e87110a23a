package app_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// selfSigned writes a certificate for 127.0.0.1 and its key as PEM files
// and returns their paths and a pool that trusts the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "posthaste.test"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// With a certificate, both listeners speak TLS only, and REST calls still
// reach the gRPC server through the gateway's in-memory connection.
func TestTLSListeners(t *testing.T) {
	t.Parallel()
	certFile, keyFile, pool := selfSigned(t)
	a, err := app.New(app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		TLSCertFile:     certFile,
		TLSKeyFile:      keyFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Stop(context.Background()); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	tlsClient := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}

	// REST over HTTPS, HTTP/2 and HTTP/1.1 alike.
	for _, h2 := range []bool{true, false} {
		tr := &http.Transport{TLSClientConfig: tlsClient.Clone(), ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		client := &http.Client{Transport: tr}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+a.HTTPAddr()+"/v1/messages", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+testKey)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("https (h2 %t): %v", h2, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || (resp.ProtoMajor == 2) != h2 {
			t.Errorf("https (h2 %t): %s %d %s", h2, resp.Proto, resp.StatusCode, body)
		}
		tr.CloseIdleConnections()
	}
	// Plain HTTP gets no API.
	resp, err := http.Get("http://" + a.HTTPAddr() + "/healthz")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain http: HTTP %d, want 400 from a TLS server", resp.StatusCode)
		}
	}

	// gRPC over TLS.
	conn, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(credentials.NewTLS(tlsClient)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	callCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+testKey)
	if _, err := posthastev1.NewMailServiceClient(conn).ListMessages(callCtx, &posthastev1.ListMessagesRequest{}); err != nil {
		t.Errorf("grpc over tls: %v", err)
	}
	// A plaintext gRPC client is not served.
	plain, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	shortCtx, shortCancel := context.WithTimeout(callCtx, 2*time.Second)
	defer shortCancel()
	if _, err := posthastev1.NewMailServiceClient(plain).ListMessages(shortCtx, &posthastev1.ListMessagesRequest{}); err == nil {
		t.Error("plaintext grpc call to a TLS listener succeeded")
	}
}

// The certificate and the key come together; a certificate that cannot be
// loaded stops Start before anything else.
func TestTLSConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, cert, key, field string
	}{
		{"cert alone", "cert.pem", "", "TLSKeyFile"},
		{"key alone", "", "key.pem", "TLSCertFile"},
	} {
		_, err := app.New(app.Config{DatabaseURL: "postgres://unused", TLSCertFile: tc.cert, TLSKeyFile: tc.key})
		var fe *app.FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("%s: %v, want a FieldError for %s", tc.name, err, tc.field)
		}
	}
	dir := t.TempDir()
	a, err := app.New(app.Config{
		HTTPAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0", DatabaseURL: "postgres://127.0.0.1:1/none",
		TLSCertFile: filepath.Join(dir, "missing.pem"), TLSKeyFile: filepath.Join(dir, "missing-key.pem"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(t.Context()); err == nil {
		t.Error("Start with a missing certificate succeeded")
	}
}
