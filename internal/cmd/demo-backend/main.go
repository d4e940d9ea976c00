// Command demo-backend runs a private Dovecot with one demo mailbox, as the
// upstream for scripts/demo.sh. It serves user "demo" with password
// "demo-password" on a fixed POP3 port until SIGINT or SIGTERM.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

func main() {
	pop3 := flag.String("pop3", "127.0.0.1:11110", "plaintext POP3 listen address (STLS offered)")
	pop3s := flag.String("pop3s", "", "implicit TLS POP3 listen address (empty: a free port)")
	dir := flag.String("dir", "", "private directory for Dovecot's files (default: a new directory under /tmp, removed on exit)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("demo-backend: ")
	if err := run(*pop3, *pop3s, *dir); err != nil {
		log.Fatal(err)
	}
}

func run(pop3, pop3s, dir string) error {
	if dir == "" {
		// Not os.TempDir: Dovecot's unprivileged users must reach the
		// directory, which a private TMPDIR may not allow.
		d, err := os.MkdirTemp("/tmp", "caddy-pop3-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}

	srv, err := dovecot.Start(dovecot.Config{
		Dir:       dir,
		POP3Addr:  pop3,
		POP3SAddr: pop3s,
		Users: []dovecot.User{{
			Name:     "demo",
			Password: "demo-password",
			Messages: [][]byte{demoMessage(time.Now())},
		}},
	})
	if err != nil {
		return err
	}
	fmt.Printf("ready: dovecot POP3 on %s (STLS), POP3S on %s\n", srv.POP3Addr, srv.POP3SAddr)
	fmt.Printf("ready: user demo, password demo-password, 1 message; log %s\n", srv.LogFile)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	if err := srv.Stop(); err != nil {
		return err
	}
	fmt.Println("stopped")
	return nil
}

// demoMessage is a short RFC 5322 message with CRLF line ends.
func demoMessage(now time.Time) []byte {
	return []byte("From: Dovecot Demo <demo@localhost>\r\n" +
		"To: Demo User <demo@localhost>\r\n" +
		"Subject: Hello from caddy-pop3\r\n" +
		"Date: " + now.Format(time.RFC1123Z) + "\r\n" +
		fmt.Sprintf("Message-ID: <demo-%d@localhost>\r\n", now.UnixNano()) +
		"\r\n" +
		"This message came from a private Dovecot,\r\n" +
		"through Caddy and the layer4 pop3 handler.\r\n")
}
