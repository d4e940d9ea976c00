package main

import (
	"strings"
	"testing"
)

// TestRoundOrder: the paths without beside rotate as before; a path beside
// another runs right after it in even rounds and right before it in odd ones,
// and one beside that path next to it in turn.
func TestRoundOrder(t *testing.T) {
	path := func(name, beside string) loginPath { return loginPath{t: &target{name: name}, beside: beside} }
	check := func(paths []loginPath, want ...string) {
		t.Helper()
		for i, w := range want {
			var got []string
			for _, p := range roundOrder(paths, i) {
				got = append(got, p.t.name)
			}
			if g := strings.Join(got, " "); g != w {
				t.Errorf("round %d: %s, want %s", i, g, w)
			}
		}
	}
	paths := []loginPath{path("D", ""), path("C", ""), path("N", ""), path("L", "C")}
	check(paths, "D C L N", "L C N D", "N D C L", "D L C N", "C L N D")
	// R beside L beside C: R next to L, on the far side from C.
	check(append(paths, path("R", "L")), "D C L R N", "R L C N D", "N D C L R")
	plain := paths[:3]
	for i := range 3 {
		got := roundOrder(plain, i)
		if len(got) != 3 {
			t.Fatalf("round %d: %d paths", i, len(got))
		}
		for j, p := range got {
			if p.t != plain[(i+j)%3].t {
				t.Errorf("round %d: %s at %d, want the rotation", i, p.t.name, j)
			}
		}
	}
}
