package main

import (
	"testing"

	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}
