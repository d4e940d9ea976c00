package redistest

import "testing"

func TestStopPauseRestart(t *testing.T) {
	t.Parallel()
	s := Run(t)
	if err := ping(s.Addr); err != nil {
		t.Fatalf("PING after Start: %v", err)
	}
	if s.Pid() <= 0 {
		t.Fatalf("Pid of a running server: %d", s.Pid())
	}
	if err := s.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := ping(s.Addr); err == nil {
		t.Fatal("a paused server answered PING")
	}
	if err := s.Continue(); err != nil {
		t.Fatal(err)
	}
	if err := ping(s.Addr); err != nil {
		t.Fatalf("PING after Continue: %v", err)
	}
	if err := s.Restart(); err == nil {
		t.Fatal("Restart of a running server succeeded")
	}
	addr := s.Addr
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := ping(addr); err == nil {
		t.Fatal("a stopped server answered PING")
	}
	if pid := s.Pid(); pid != 0 {
		t.Fatalf("Pid of a stopped server: %d", pid)
	}
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if s.Addr != addr {
		t.Fatalf("restarted on %s; want %s", s.Addr, addr)
	}
	if err := ping(s.Addr); err != nil {
		t.Fatalf("PING after Restart: %v", err)
	}
}
