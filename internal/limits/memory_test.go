package limits_test

import (
	"testing"

	"github.com/caddy-pop3/caddy-pop3/internal/limits"
	"github.com/caddy-pop3/caddy-pop3/internal/limits/limitstest"
)

func TestMemoryConformance(t *testing.T) {
	t.Parallel()
	// No limitstest.WithLeases: Memory keeps a slot until Release.
	limitstest.StoreConformance(t, func() limits.Store { return limits.NewMemory(0) })
}

func TestMemoryConformanceSmall(t *testing.T) {
	t.Parallel()
	// Room for every key the table uses: the rules hold before eviction.
	limitstest.StoreConformance(t, func() limits.Store { return limits.NewMemory(8) })
}
