package passwdfile

import (
	"errors"
	"strings"
	"testing"
)

// TestMalformedValues checks that values of a known scheme that Dovecot
// could never verify are refused at parse time, without their content in
// the error.
func TestMalformedValues(t *testing.T) {
	t.Parallel()
	const (
		argonSalt = "VLs+t/1FP2sppvX1rQrAqA"
		argonSum  = "KzxBMI3I+/GxUBAPwam7b97vGgAlGrPiOnEJ19g4mEk"
		b20       = "bw1S4oUhCcPw0PziRiOCh8Be1rQ="
		b32       = "FOI6H39YmbiR50xKSw1lOaPsGsCpr8OXKw6eL3Z5ZTw="
	)
	for _, field := range []string{
		"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$" + argonSalt,                        // no hash
		"{ARGON2ID}$argon2d$v=19$m=65536,t=3,p=1$" + argonSalt + "$" + argonSum,        // Argon2d
		"{ARGON2ID}$argon2id$v=16$m=65536,t=3,p=1$" + argonSalt + "$" + argonSum,       // version 1.0
		"{ARGON2ID}$argon2id$m=65536,t=3,p=1$" + argonSalt + "$" + argonSum,            // no version
		"{ARGON2ID}$argon2id$v=19$t=3,m=65536,p=1$" + argonSalt + "$" + argonSum,       // parameters out of order
		"{ARGON2ID}$argon2id$v=19$m=65536,t=0,p=1$" + argonSalt + "$" + argonSum,       // no pass
		"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=0$" + argonSalt + "$" + argonSum,       // no lane
		"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=256$" + argonSalt + "$" + argonSum,     // too many lanes
		"{ARGON2ID}$argon2id$v=19$m=7,t=3,p=1$" + argonSalt + "$" + argonSum,           // under 8 KiB per lane
		"{ARGON2ID}$argon2id$v=19$m=4294967296,t=3,p=1$" + argonSalt + "$" + argonSum,  // memory overflowing
		"{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$c2FsdA$" + argonSum,                    // a 4-byte salt
		"{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$" + argonSalt + "$c2hvcnQ",             // a 5-byte hash
		"{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$" + argonSalt + "=$" + argonSum,        // padded salt
		"{SCRAM-SHA-1}4096," + argonSalt + "," + b20,                                   // three fields
		"{SCRAM-SHA-1}4095,c2FsdA==," + b20 + "," + b20,                                // too few iterations
		"{SCRAM-SHA-1}x4096,c2FsdA==," + b20 + "," + b20,                               // not a number
		"{SCRAM-SHA-1}4096,," + b20 + "," + b20,                                        // empty salt
		"{SCRAM-SHA-1}4096,c2FsdA==," + b32 + "," + b20,                                // StoredKey of SHA-256's size
		"{SCRAM-SHA-256}4096,c2FsdA==," + b32 + "," + b20,                              // ServerKey of SHA-1's size
		"{SCRAM-SHA-256}4096,c2FsdA==," + b32 + "," + b32 + "!",                        // not base64
		"{CRAM-MD5}" + strings.Repeat("0", 62),                                         // 31 bytes
		"{CRAM-MD5.HEX}" + strings.Repeat("0", 63) + "g",                               // not hex
		"{MD5}" + strings.Repeat("0", 30),                                              // neither MD5-crypt nor PLAIN-MD5
		"{MD5-CRYPT}$1$123456789$Y2VQQ896c9Y9d.mCafliw0",                               // a 9-character salt
		"{MD5-CRYPT}$1$0uv/3Wjk$Y2VQQ896c9Y9d.mCafliw",                                 // a short hash
		"{BLF-CRYPT}$2c" + secretBcrypt[3:],                                            // an unknown minor version
		"{BLF-CRYPT}" + secretBcrypt[:7] + "!" + secretBcrypt[8:],                      // outside the alphabet
		"{SHA512-CRYPT}$5$rounds=999$salt$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5", // rounds too low
		"{CRYPT}$$",
	} {
		_, err := Parse(strings.NewReader("alice:" + field + "\n"))
		if !errors.Is(err, ErrMalformedPassword) {
			t.Errorf("%s: %v, want a malformed password", field, err)
			continue
		}
		value := field[strings.IndexByte(field, '}')+1:]
		for _, part := range strings.FieldsFunc(value, func(r rune) bool { return strings.ContainsRune("$,=", r) }) {
			if len(part) >= 8 && strings.Contains(err.Error(), part) {
				t.Errorf("%s: error %q holds part of the value", field, err)
			}
		}
	}
}

// TestSchemeAliasesVerify checks that every name of a scheme family takes
// the family's values, as Dovecot's crypt_verify and libsodium do.
func TestSchemeAliasesVerify(t *testing.T) {
	t.Parallel()
	for _, field := range []string{
		"{SHA256-CRYPT}" + secretSHA512Cry, // SHA256-CRYPT, like CRYPT, takes any crypt form
		"{SHA512-CRYPT}" + secretBcrypt,
		"{CRYPT}" + secretMD5Crypt,
		"{MD5}" + secretMD5Crypt,
		"{MD5}" + secretPlainMD5,
		// Cheap Argon2 values from the reference implementation's argon2
		// tool (`argon2 saltsalt -id -t 1 -m 3 -p 1 -l 16 -e`), each
		// under the other variant's name.
		"{ARGON2I}$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$+RsCrdHrAKGEJIDLM0Esow",
		"{ARGON2ID}$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$YC9+jJCrQhs5R6db7LlN8Q",
	} {
		e := parseField(t, field)
		if !e.Verify("secret") || e.Verify("secreT") {
			t.Errorf("%s does not verify exactly \"secret\"", field)
		}
	}
}
