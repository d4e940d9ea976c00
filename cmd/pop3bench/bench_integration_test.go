//go:build integration

package main

import (
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestQuick runs `pop3bench -quick` end to end: it builds Caddy, starts
// Dovecot, Caddy and NGINX, and checks that every phase ran without an
// error (the plain logins through the listener with every limit on
// included, and through a second Caddy with those limits in a private
// redis-server) and that the report and the chart were written.
// scripts/test.sh installs NGINX with its mail module and redis-server; a
// developer without NGINX may opt out with POP3_TEST_NO_NGINX=1 (never in
// CI).
func TestQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	if os.Getenv("POP3_TEST_NO_NGINX") != "" && os.Getenv("CI") == "" {
		t.Skip("POP3_TEST_NO_NGINX is set")
	}
	if _, err := os.Stat("/usr/lib/nginx/modules/ngx_mail_module.so"); err != nil {
		t.Fatalf("NGINX's mail module is missing (scripts/install-deps.sh nginx libnginx-mod-mail): %v", err)
	}
	dir := t.TempDir()
	caddy := filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", caddy, "github.com/caddy-pop3/caddy-pop3/cmd/caddy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building Caddy: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "out")
	cfg, err := parseFlags([]string{"-quick", "-caddy", caddy, "-out", out, "-sessions", "100", "-tls-sessions", "50", "-pprof", "-pprof-seconds", "1"})
	if err != nil {
		t.Fatal(err)
	}
	failed, err := run(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if failed {
		t.Error("some sessions failed: see the tables above")
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## RETR throughput", "## Proxy CPU per GB relayed", "| TLS (995) | caddy-pop3 |", "| STLS | NGINX |", "| 100 | plain | caddy-pop3 |", "| 100 | plain | NGINX |", "| 50 | TLS (995) | caddy-pop3 |", "| 50 | TLS (995) | NGINX |", "## Login latency with one client", "| caddy-pop3 | ", "## Login rate with passwd_file at the proxy", "| caddy-pop3 pass-through | ", "| caddy-pop3 passwd_file | ", "| caddy-pop3 passwd_file + auth_cache | ",
		// The plain listener with every limit on logs in, and none refuses.
		"| plain | caddy-pop3 limits on | ", "## Plain logins with limits on", "| errors | 0 | 0 | |",
		// So does the second Caddy with the same limits in Redis, which
		// holds its zone: no Redis call failed (run fails otherwise).
		"| plain | caddy-pop3 limits in Redis | ", "## Plain logins with limits in Redis", "| failed Redis calls (`caddy_layer4_pop3_store_errors_total`) | | 0 | |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q", want)
		}
	}
	f, err := os.Open(filepath.Join(out, "login-latency.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("login-latency.png: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 1000 || b.Dy() < 400 {
		t.Errorf("login-latency.png is %v", b)
	}
	profiles, _ := filepath.Glob(filepath.Join(out, "pprof", "*.pb.gz"))
	if len(profiles) != 6 {
		t.Errorf("profiles: %q, want 4 CPU and 2 heap (plain and TLS idle sessions)", profiles)
	}
}
