// Package integration holds tests that run the pop3 handler inside Caddy:
// Caddyfile adapt golden files here, and Dovecot tests behind the
// integration build tag.
package integration

import (
	jsonMod "encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/caddy-pop3/caddy-pop3"
)

// TestCaddyfileAdaptToJSON adapts each caddyfile_adapt/*.caddytest file (a
// Caddyfile, a line of ----------, then the expected JSON as `caddy adapt
// --pretty` prints it) and compares the result, as caddy-l4 does.
func TestCaddyfileAdaptToJSON(t *testing.T) {
	// load the list of test files from the dir
	files, err := os.ReadDir("./caddyfile_adapt")
	if err != nil {
		t.Fatalf("failed to read caddyfile_adapt dir: %s", err)
	}

	// prep a regexp to fix strings on Windows
	winNewlines := regexp.MustCompile(`\r?\n`)

	var n int
	for _, f := range files {
		if f.IsDir() || !strings.HasSuffix(f.Name(), ".caddytest") {
			continue
		}
		n++

		// read the test file
		filename := f.Name()
		t.Run(strings.TrimSuffix(filename, ".caddytest"), func(t *testing.T) {
			data, err := os.ReadFile("./caddyfile_adapt/" + filename)
			if err != nil {
				t.Fatalf("failed to read %s: %s", filename, err)
			}

			// split the Caddyfile (first) and JSON (second) parts
			// (append newline to Caddyfile to match formatter expectations)
			parts := strings.Split(string(data), "----------")
			if len(parts) != 2 {
				t.Fatalf("%s: want one ---------- separator, found %d", filename, len(parts)-1)
			}
			caddyfile, json := strings.TrimSpace(parts[0])+"\n", strings.TrimSpace(parts[1])

			// replace windows newlines in the JSON with Unix newlines
			json = winNewlines.ReplaceAllString(json, "\n")

			// replace os-specific default path for file_server's hide field
			replacePath, _ := jsonMod.Marshal(fmt.Sprint(".", string(filepath.Separator), "Caddyfile"))
			json = strings.ReplaceAll(json, `"./Caddyfile"`, string(replacePath))

			// run the test
			if !caddytest.CompareAdapt(t, filename, caddyfile, "caddyfile", json) {
				t.Errorf("failed to adapt %s", filename)
			}
		})
	}
	if n == 0 {
		t.Fatal("no .caddytest files found in caddyfile_adapt")
	}
}
