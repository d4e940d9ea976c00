// Package opensslfmt prints TLS and certificate fields as OpenSSL does,
// for the Auth-SSL-* headers of the auth_http protocol, whose auth servers
// were written against NGINX and so against OpenSSL's output.
package opensslfmt

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"strings"
	"unicode/utf8"
)

// ProtocolName is SSL_get_version's name for a TLS version.
func ProtocolName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	case 0:
		return ""
	}
	return "unknown"
}

// cipherNames maps crypto/tls suites to the OpenSSL names NGINX
// sends (SSL_get_cipher_name); TLS 1.3 suites have the IANA name in both.
var cipherNames = map[uint16]string{
	tls.TLS_AES_128_GCM_SHA256:                        "TLS_AES_128_GCM_SHA256",
	tls.TLS_AES_256_GCM_SHA384:                        "TLS_AES_256_GCM_SHA384",
	tls.TLS_CHACHA20_POLY1305_SHA256:                  "TLS_CHACHA20_POLY1305_SHA256",
	tls.TLS_RSA_WITH_RC4_128_SHA:                      "RC4-SHA",
	tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA:                 "DES-CBC3-SHA",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA:                  "AES128-SHA",
	tls.TLS_RSA_WITH_AES_256_CBC_SHA:                  "AES256-SHA",
	tls.TLS_RSA_WITH_AES_128_CBC_SHA256:               "AES128-SHA256",
	tls.TLS_RSA_WITH_AES_128_GCM_SHA256:               "AES128-GCM-SHA256",
	tls.TLS_RSA_WITH_AES_256_GCM_SHA384:               "AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_RC4_128_SHA:              "ECDHE-ECDSA-RC4-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA:          "ECDHE-ECDSA-AES128-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA:          "ECDHE-ECDSA-AES256-SHA",
	tls.TLS_ECDHE_RSA_WITH_RC4_128_SHA:                "ECDHE-RSA-RC4-SHA",
	tls.TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA:           "ECDHE-RSA-DES-CBC3-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA:            "ECDHE-RSA-AES128-SHA",
	tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA:            "ECDHE-RSA-AES256-SHA",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256:       "ECDHE-ECDSA-AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256:         "ECDHE-RSA-AES128-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:         "ECDHE-RSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256:       "ECDHE-ECDSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:         "ECDHE-RSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384:       "ECDHE-ECDSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256:   "ECDHE-RSA-CHACHA20-POLY1305",
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: "ECDHE-ECDSA-CHACHA20-POLY1305",
}

func CipherName(id uint16) string {
	if name, ok := cipherNames[id]; ok {
		return name
	}
	if id == 0 {
		return ""
	}
	return tls.CipherSuiteName(id)
}

// Serial formats a serial number as i2a_ASN1_INTEGER: upper-case
// hex, two digits a byte, "-" before a negative one, "00" for zero. (OpenSSL
// breaks serials longer than 35 bytes with a backslash and LF; RFC 5280
// allows at most 20, and no LF may go into a field anyway.)
func Serial(cert *x509.Certificate) string {
	if cert.SerialNumber == nil {
		return ""
	}
	b := cert.SerialNumber.Bytes()
	if len(b) == 0 {
		return "00"
	}
	s := strings.ToUpper(hex.EncodeToString(b))
	if cert.SerialNumber.Sign() < 0 {
		s = "-" + s
	}
	return s
}

// DN formats a DER Name as NGINX's ngx_ssl_get_subject_dn does:
// X509_NAME_print_ex(XN_FLAG_RFC2253). RDNs go most specific first,
// separated by ',' (no space), multi-valued RDNs joined by '+'; attribute
// types by OpenSSL short name, unknown ones as a dotted OID with the value
// as '#' and the DER in hex; values escaped per ASN1_STRFLGS_RFC2253 (see
// escape). "" when the Name does not parse.
func DN(der []byte) string {
	var rdns []rdnSET
	if rest, err := asn1.Unmarshal(der, &rdns); err != nil || len(rest) > 0 {
		return ""
	}
	var b strings.Builder
	for i := len(rdns) - 1; i >= 0; i-- {
		for j := len(rdns[i]) - 1; j >= 0; j-- {
			if b.Len() > 0 {
				if j == len(rdns[i])-1 {
					b.WriteByte(',')
				} else {
					b.WriteByte('+')
				}
			}
			atv := rdns[i][j]
			name, known := shortNames[atv.Type.String()]
			if !known {
				name = atv.Type.String()
			}
			b.WriteString(name)
			b.WriteByte('=')
			writeValue(&b, atv.Value, known)
		}
	}
	return b.String()
}

// rdnSET is one RDN; the SET suffix makes encoding/asn1 expect a SET.
type rdnSET []attributeValue

type attributeValue struct {
	Type  asn1.ObjectIdentifier
	Value asn1.RawValue
}

// shortNames are OBJ_nid2sn names of the attribute types seen in
// certificate names.
var shortNames = map[string]string{
	"2.5.4.3":                    "CN",
	"2.5.4.4":                    "SN",
	"2.5.4.5":                    "serialNumber",
	"2.5.4.6":                    "C",
	"2.5.4.7":                    "L",
	"2.5.4.8":                    "ST",
	"2.5.4.9":                    "street",
	"2.5.4.10":                   "O",
	"2.5.4.11":                   "OU",
	"2.5.4.12":                   "title",
	"2.5.4.13":                   "description",
	"2.5.4.15":                   "businessCategory",
	"2.5.4.17":                   "postalCode",
	"2.5.4.18":                   "postOfficeBox",
	"2.5.4.41":                   "name",
	"2.5.4.42":                   "GN",
	"2.5.4.43":                   "initials",
	"2.5.4.44":                   "generationQualifier",
	"2.5.4.45":                   "x500UniqueIdentifier",
	"2.5.4.46":                   "dnQualifier",
	"2.5.4.65":                   "pseudonym",
	"2.5.4.72":                   "role",
	"2.5.4.97":                   "organizationIdentifier",
	"1.2.840.113549.1.9.1":       "emailAddress",
	"1.2.840.113549.1.9.2":       "unstructuredName",
	"0.9.2342.19200300.100.1.1":  "UID",
	"0.9.2342.19200300.100.1.25": "DC",
	"1.3.6.1.4.1.311.60.2.1.1":   "jurisdictionL",
	"1.3.6.1.4.1.311.60.2.1.2":   "jurisdictionST",
	"1.3.6.1.4.1.311.60.2.1.3":   "jurisdictionC",
}

// writeValue writes one attribute value as do_print_ex does with
// ASN1_STRFLGS_RFC2253: string types are shown, anything else (and any
// value of an unknown attribute type) is dumped as '#' and its DER in hex.
func writeValue(b *strings.Builder, v asn1.RawValue, knownType bool) {
	width := -1 // tag2nbyte: 0 UTF-8, 1/2/4 bytes a character, -1 dump
	if knownType && v.Class == asn1.ClassUniversal && !v.IsCompound {
		switch v.Tag {
		case asn1.TagUTF8String:
			width = 0
		case asn1.TagNumericString, asn1.TagPrintableString, asn1.TagT61String,
			asn1.TagIA5String, asn1.TagUTCTime, asn1.TagGeneralizedTime, 26: // 26: VisibleString
			width = 1
		case 28: // UniversalString
			width = 4
		case asn1.TagBMPString:
			width = 2
		}
	}
	if width < 0 || (width > 1 && len(v.Bytes)%width != 0) {
		b.WriteByte('#')
		b.WriteString(strings.ToUpper(hex.EncodeToString(v.FullBytes)))
		return
	}
	if width == 0 {
		// OpenSSL does not convert UTF-8 to UTF-8: it escapes byte by byte.
		for i := 0; i < len(v.Bytes); i++ {
			escape(b, v.Bytes[i], i == 0, i == len(v.Bytes)-1)
		}
		return
	}
	// Other types: each character, converted to UTF-8, byte by byte.
	n := len(v.Bytes) / width
	var buf [utf8.UTFMax]byte
	for i := 0; i < n; i++ {
		var r rune
		for _, c := range v.Bytes[i*width : (i+1)*width] {
			r = r<<8 | rune(c)
		}
		enc := buf[:utf8.EncodeRune(buf[:], r)]
		for _, c := range enc {
			escape(b, c, i == 0, i == n-1)
		}
	}
}

// escape writes one byte as do_esc_char does with
// ASN1_STRFLGS_RFC2253: bytes above 0x7F and control bytes as \XX, the RFC
// 2253 specials ,+"\<>; with a backslash, '#' only as the first character
// and space as the first or last. As in OpenSSL's do_buf, "last" replaces
// "first" for a one-character value, so a lone '#' stays as it is.
func escape(b *strings.Builder, c byte, first, last bool) {
	const hexDigits = "0123456789ABCDEF"
	switch {
	case c > 0x7f || c < 0x20 || c == 0x7f:
		b.WriteByte('\\')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&0xf])
		return
	case strings.IndexByte(",+\"\\<>;", c) >= 0,
		c == ' ' && (first || last),
		c == '#' && first && !last:
		b.WriteByte('\\')
	}
	b.WriteByte(c)
}
