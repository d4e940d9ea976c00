package sasl

import (
	"bytes"
	"errors"
	"testing"
)

func run(s Server, responses ...[]byte) (Credentials, [][]byte, error) {
	var challenges [][]byte
	for _, r := range responses {
		ch, done, err := s.Next(r)
		if err != nil {
			return Credentials{}, challenges, err
		}
		if done {
			return s.Credentials(), challenges, nil
		}
		challenges = append(challenges, ch)
	}
	return Credentials{}, challenges, errors.New("not done")
}

func TestPlain(t *testing.T) {
	tests := []struct {
		name      string
		responses [][]byte
		want      Credentials
		err       bool
	}{
		{"initial response", [][]byte{[]byte("\x00bob\x00p@ss wörd:%")}, Credentials{Username: "bob", Password: "p@ss wörd:%"}, false},
		{"continuation", [][]byte{nil, []byte("\x00bob\x00pw")}, Credentials{Username: "bob", Password: "pw"}, false},
		{"authzid same as user", [][]byte{[]byte("bob\x00bob\x00pw")}, Credentials{Username: "bob", Password: "pw"}, false},
		{"authzid", [][]byte{[]byte("admin\x00bob\x00pw")}, Credentials{Identity: "admin", Username: "bob", Password: "pw"}, false},
		{"two fields", [][]byte{[]byte("bob\x00pw")}, Credentials{}, true},
		{"four fields", [][]byte{[]byte("\x00bob\x00pw\x00x")}, Credentials{}, true},
		{"empty user", [][]byte{[]byte("\x00\x00pw")}, Credentials{}, true},
		{"empty password", [][]byte{[]byte("\x00bob\x00")}, Credentials{}, true},
		{"CR in user", [][]byte{[]byte("\x00b\rob\x00pw")}, Credentials{}, true},
		{"LF in password", [][]byte{[]byte("\x00bob\x00p\nw")}, Credentials{}, true},
		{"empty response", [][]byte{{}}, Credentials{}, true},
		{"two empty challenges", [][]byte{nil, nil}, Credentials{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := run(NewPlain(), tc.responses...)
			if (err != nil) != tc.err || got != tc.want {
				t.Errorf("got %+v, %v; want %+v, err %v", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestLogin(t *testing.T) {
	got, ch, err := run(NewLogin(), nil, []byte("bob@example.com"), []byte("p@ss wörd:%"))
	if err != nil || got != (Credentials{Username: "bob@example.com", Password: "p@ss wörd:%"}) {
		t.Fatalf("got %+v, %v", got, err)
	}
	if len(ch) != 2 || !bytes.Equal(ch[0], []byte("Username:")) || !bytes.Equal(ch[1], []byte("Password:")) {
		t.Errorf("challenges %q", ch)
	}
	got, ch, err = run(NewLogin(), []byte("bob"), []byte("pw"))
	if err != nil || got.Username != "bob" || len(ch) != 1 {
		t.Errorf("initial response: %+v %q %v", got, ch, err)
	}
	for _, bad := range [][][]byte{{nil, []byte("b\x00ob")}, {nil, []byte("bob"), []byte("p\rw")}, {nil, {}}} {
		if _, _, err := run(NewLogin(), bad...); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// FuzzPlain checks that whatever PLAIN accepts is free of CR, LF and NUL
// and encodes back to an equivalent message.
func FuzzPlain(f *testing.F) {
	f.Add([]byte("\x00bob\x00pw"))
	f.Add([]byte("admin\x00bob\x00p@ss wörd:%"))
	f.Add([]byte("\x00\r\x00\n"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		p := NewPlain()
		_, done, err := p.Next(msg)
		if err != nil || !done {
			return
		}
		c := p.Credentials()
		if !valid(c.Identity, c.Username, c.Password) || c.Username == "" {
			t.Fatalf("accepted %+v", c)
		}
		if !bytes.HasSuffix(msg, []byte("\x00"+c.Username+"\x00"+c.Password)) {
			t.Fatalf("%q does not end with the parsed user and password %+v", msg, c)
		}
	})
}
