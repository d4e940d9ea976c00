// Command pop3bench measures a RETR through caddy-pop3 against the same RETR
// straight from Dovecot, in one run with interleaved rounds, and prints the
// medians and their ratio.
//
//	go build -o bin/caddy ./cmd/caddy && go run ./cmd/pop3bench -caddy bin/caddy
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/caddy-pop3/caddy-pop3/internal/dovecot"
)

func main() {
	caddyBin := flag.String("caddy", "bin/caddy", "Caddy binary with the pop3 handler")
	sizeMiB := flag.Int("size", 32, "message size in MiB")
	rounds := flag.Int("rounds", 7, "rounds; each fetches the message once directly and once through the proxy")
	flag.Parse()
	if err := run(*caddyBin, *sizeMiB, *rounds); err != nil {
		log.Fatal(err)
	}
}

func run(caddyBin string, sizeMiB, rounds int) error {
	dir, err := os.MkdirTemp("/tmp", "pop3bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}

	msg := message(sizeMiB << 20)
	want := sha256.Sum256(append(dotStuff(msg), ".\r\n"...))
	dc, err := dovecot.Start(dovecot.Config{
		Dir:   filepath.Join(dir, "dovecot"),
		Users: []dovecot.User{{Name: "bench", Password: "bench-password", Messages: [][]byte{msg}}},
	})
	if err != nil {
		return err
	}
	defer dc.Stop()

	proxyAddr, err := freeAddr()
	if err != nil {
		return err
	}
	stop, err := startCaddy(caddyBin, dir, proxyAddr, dc.POP3Addr)
	if err != nil {
		return err
	}
	defer stop()

	var direct, proxied []float64
	for i := 0; i < rounds; i++ {
		for _, p := range []struct {
			addr string
			out  *[]float64
		}{{dc.POP3Addr, &direct}, {proxyAddr, &proxied}} {
			mbps, err := retr(p.addr, want)
			if err != nil {
				return fmt.Errorf("round %d via %s: %w", i, p.addr, err)
			}
			*p.out = append(*p.out, mbps)
		}
	}
	d, p := median(direct), median(proxied)
	fmt.Printf("RETR of a %d MiB message, %d rounds interleaved, medians (sha256 checked every round)\n", sizeMiB, rounds)
	fmt.Printf("%-28s %10s\n", "path", "MB/s")
	fmt.Printf("%-28s %10.1f\n", "direct to Dovecot", d)
	fmt.Printf("%-28s %10.1f\n", "through caddy-pop3 (plain)", p)
	fmt.Printf("ratio proxy/direct: %.3f\n", p/d)
	return nil
}

// message builds a CRLF message with lines that need dot-stuffing, 8-bit
// bytes and a 998-octet line.
func message(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: bench@example.com\r\nSubject: bench\r\n\r\n")
	for i := 0; b.Len() < size; i++ {
		switch i % 4 {
		case 0:
			b.WriteString(".leading dot line\r\n")
		case 1:
			b.WriteString("8-bit \xe9\xff\x80 bytes\r\n")
		case 2:
			b.WriteString(strings.Repeat("x", 998) + "\r\n")
		default:
			b.WriteString("plain line of text for the benchmark\r\n")
		}
	}
	return b.Bytes()
}

func dotStuff(msg []byte) []byte {
	var out bytes.Buffer
	for _, line := range bytes.SplitAfter(msg, []byte("\r\n")) {
		if bytes.HasPrefix(line, []byte(".")) {
			out.WriteByte('.')
		}
		out.Write(line)
	}
	return out.Bytes()
}

// retr logs in, fetches message 1 and returns MB/s of the RETR alone.
func retr(addr string, want [32]byte) (float64, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReaderSize(c, 64*1024)
	expect := func() error {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if !strings.HasPrefix(line, "+OK") {
			return fmt.Errorf("got %q", strings.TrimSpace(line))
		}
		return nil
	}
	if err := expect(); err != nil {
		return 0, err
	}
	if _, err := io.WriteString(c, "USER bench\r\nPASS bench-password\r\n"); err != nil {
		return 0, err
	}
	if err := expect(); err != nil {
		return 0, err
	}
	if err := expect(); err != nil {
		return 0, err
	}
	start := time.Now()
	if _, err := io.WriteString(c, "RETR 1\r\n"); err != nil {
		return 0, err
	}
	if err := expect(); err != nil {
		return 0, err
	}
	h := sha256.New()
	var n int
	for {
		line, err := r.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return 0, err
		}
		h.Write(line)
		n += len(line)
		if string(line) == ".\r\n" {
			break
		}
	}
	elapsed := time.Since(start)
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return 0, errors.New("message differs from what was stored")
	}
	_, _ = io.WriteString(c, "QUIT\r\n")
	return float64(n) / 1e6 / elapsed.Seconds(), nil
}

func startCaddy(bin, dir, listen, upstream string) (func(), error) {
	conf := filepath.Join(dir, "Caddyfile")
	cfg := fmt.Sprintf("{\n\tadmin off\n\tlayer4 {\n\t\t%s {\n\t\t\troute {\n\t\t\t\tpop3 %s {\n\t\t\t\t\tstarttls off\n\t\t\t\t}\n\t\t\t}\n\t\t}\n\t}\n}\n", listen, upstream)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "--config", conf, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir, "HOME="+dir)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	stop := func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if c, err := net.Dial("tcp", listen); err == nil {
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "+OK") {
				return stop, nil
			}
		}
	}
	stop()
	return nil, fmt.Errorf("caddy did not start:\n%s", logs.String())
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}
