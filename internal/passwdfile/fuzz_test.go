package passwdfile

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// FuzzParse checks that any input parses without panic, and that every
// parsed entry round-trips its user: Lookup finds it, and its line of the
// input starts with the user name followed by ':' or the line end.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"# users\nalice:{PLAIN}pw:1000:1000::/home/alice::nologin proxy host=a\n",
		"bob:" + secretSHA512Cry + "\r\ncarol:" + secretBcrypt + "\n\n:x\n",
		"dave\nerin::::::::maildir:~/Mail\nerin:{SHA256.HEX}00\n",
		"frank:{CRAM-MD5}7dead29c194d4ac3cf5f337b23fa3b9b32c9f4b1d7d7b1fa2539d66ce368e997",
		"gina:{SCRAM-SHA-1}4096,dIJdwES5nFNAxqTcaSrUqA==,bw1S4oUhCcPw0PziRiOCh8Be1rQ=,hg0cYm2MtMRCFz32UINUuRhlnMk=\n",
		"hank:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$VLs+t/1FP2sppvX1rQrAqA$KzxBMI3I+/GxUBAPwam7b97vGgAlGrPiOnEJ19g4mEk\n",
		"ivan:" + secretMD5Crypt + "$x\njudy:" + secretPlainMD5 + "[34]\n",
		"kim:{FOO}x\n", "\x00", "{", "a:{", "a:$5$rounds=$x", "a:$6$rounds=99999999999999999999$s$",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		tbl, err := Parse(bytes.NewReader(in))
		lines := strings.Split(string(in), "\n")
		if err != nil {
			var le *LineError
			if errors.As(err, &le) && (le.Line < 1 || le.Line > len(lines)) {
				t.Fatalf("error names line %d of %d: %v", le.Line, len(lines), err)
			}
			return
		}
		n := 0
		for e := range tbl.All() {
			n++
			if e.User == "" || strings.ContainsAny(e.User, ":\n") {
				t.Fatalf("user %q", e.User)
			}
			if got, ok := tbl.Lookup(e.User); !ok || got != e {
				t.Fatalf("Lookup(%q) does not return its entry", e.User)
			}
			if e.Line < 1 || e.Line > len(lines) {
				t.Fatalf("%q: line %d of %d", e.User, e.Line, len(lines))
			}
			line := strings.TrimSuffix(lines[e.Line-1], "\r")
			if rest, ok := strings.CutPrefix(line, e.User); !ok || rest != "" && rest[0] != ':' {
				t.Fatalf("%q is not the user of line %d, %q", e.User, e.Line, line)
			}
			if e.Verifier() == nil {
				t.Fatalf("%q: no verifier", e.User)
			}
			if e.Verify("") {
				t.Fatalf("%q: the empty password verifies", e.User)
			}
		}
		if n != tbl.Len() {
			t.Fatalf("All yields %d entries, Len is %d", n, tbl.Len())
		}
	})
}
