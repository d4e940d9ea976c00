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

func TestCRAMMD5(t *testing.T) {
	c := NewCRAMMD5("<1896.697170952@postoffice.example.net>")
	ch, done, err := c.Next(nil)
	if err != nil || done || string(ch) != "<1896.697170952@postoffice.example.net>" {
		t.Fatalf("challenge %q %v %v", ch, done, err)
	}
	// RFC 2195 §2 example.
	_, done, err = c.Next([]byte("tim b913a602c7eda7a495b4e6e7334d3890"))
	if err != nil || !done || c.Credentials() != (Credentials{Username: "tim", Password: "b913a602c7eda7a495b4e6e7334d3890"}) {
		t.Fatalf("got %+v %v %v", c.Credentials(), done, err)
	}
	for _, bad := range []string{"tim", "tim xyz", " b913a602c7eda7a495b4e6e7334d3890", "t\rim b913a602c7eda7a495b4e6e7334d3890"} {
		c := NewCRAMMD5("<x@y>")
		_, _, _ = c.Next(nil)
		if _, _, err := c.Next([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if _, _, err := NewCRAMMD5("<x@y>").Next([]byte("tim b913a602c7eda7a495b4e6e7334d3890")); err == nil {
		t.Error("initial response accepted")
	}
}

func TestExternal(t *testing.T) {
	got, _, err := run(NewExternal(), nil, []byte("admin"))
	if err != nil || got.Username != "admin" {
		t.Errorf("got %+v %v", got, err)
	}
	got, _, err = run(NewExternal(), []byte{})
	if err != nil || got.Username != "" {
		t.Errorf("empty identity: %+v %v", got, err)
	}
	if _, _, err := run(NewExternal(), []byte("ad\nmin")); err == nil {
		t.Error("LF accepted")
	}
}

func TestOAuth(t *testing.T) {
	got, _, err := run(NewOAuthBearer(), []byte("n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"))
	if err != nil || got != (Credentials{Username: "user@example.com", Password: "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="}) {
		t.Errorf("OAUTHBEARER: %+v %v", got, err)
	}
	got, _, err = run(NewXOAuth2(), nil, []byte("user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"))
	if err != nil || got != (Credentials{Username: "someuser@example.com", Password: "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"}) {
		t.Errorf("XOAUTH2: %+v %v", got, err)
	}
	for _, bad := range []string{"n,,\x01auth=Bearer x\x01\x01", "n,a=u,\x01auth=Basic x\x01\x01", "garbage"} {
		if _, _, err := run(NewOAuthBearer(), []byte(bad)); err == nil {
			t.Errorf("OAUTHBEARER %q accepted", bad)
		}
	}
	if _, _, err := run(NewXOAuth2(), []byte("user=\x01auth=Bearer x\x01\x01")); err == nil {
		t.Error("XOAUTH2 without user accepted")
	}
}

// FuzzMechanisms feeds any response to every mechanism: none may panic or
// yield a value that could break an upstream command or header.
func FuzzMechanisms(f *testing.F) {
	f.Add([]byte("n,a=u,\x01auth=Bearer t\x01\x01"))
	f.Add([]byte("user=u\x01auth=Bearer t\x01\x01"))
	f.Add([]byte("tim b913a602c7eda7a495b4e6e7334d3890"))
	f.Add([]byte("\x00bob\x00pw"))
	f.Add([]byte("n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		for _, s := range []Server{NewPlain(), NewLogin(), NewCRAMMD5("<1.2@h>"), NewExternal(), NewOAuthBearer(), NewXOAuth2(),
			NewSCRAMSHA1(lookupOf(nil, nil)), NewSCRAMSHA256(lookupOf(nil, nil)), NewSCRAMSHA256Plus(lookupOf(nil, nil), []byte("cb"))} {
			_, _, _ = s.Next(nil)
			for i := 0; i < 3; i++ {
				_, done, err := s.Next(msg)
				if err != nil {
					break
				}
				if done {
					c := s.Credentials()
					if !valid(c.Identity, c.Username, c.Password) {
						t.Fatalf("%T accepted %+v", s, c)
					}
					break
				}
			}
		}
	})
}
