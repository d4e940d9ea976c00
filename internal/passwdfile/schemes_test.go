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
	for _, field := range []string{
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
// the family's values, as Dovecot's crypt_verify does.
func TestSchemeAliasesVerify(t *testing.T) {
	t.Parallel()
	for _, field := range []string{
		"{SHA256-CRYPT}" + secretSHA512Cry, // SHA256-CRYPT, like CRYPT, takes any crypt form
		"{SHA512-CRYPT}" + secretBcrypt,
		"{CRYPT}" + secretMD5Crypt,
		"{MD5}" + secretMD5Crypt,
		"{MD5}" + secretPlainMD5,
	} {
		e := parseField(t, field)
		if !e.Verify("secret") || e.Verify("secreT") {
			t.Errorf("%s does not verify exactly \"secret\"", field)
		}
	}
}
