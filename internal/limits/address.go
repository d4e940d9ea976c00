package limits

import "net/netip"

// DefaultV6Prefix is the IPv6 prefix [AddressKey] groups by when given 0: a
// /64 is what one customer or host usually gets, and the host bits are free.
const DefaultV6Prefix = 64

// AddressKey returns the part of a limit key that names a client address:
// an IPv4 address (an IPv4-mapped IPv6 address is unmapped first) as itself,
// an IPv6 address as its v6Prefix network ("2001:db8::/64"), so one host
// cannot dodge a limit by cycling through the addresses of its prefix. A
// v6Prefix of 0 means [DefaultV6Prefix]; one above 128 means 128. Zones are
// dropped. An invalid address gives "".
func AddressKey(addr netip.Addr, v6Prefix int) string {
	if !addr.IsValid() {
		return ""
	}
	addr = addr.Unmap().WithZone("")
	if addr.Is4() {
		return addr.String()
	}
	switch {
	case v6Prefix <= 0:
		v6Prefix = DefaultV6Prefix
	case v6Prefix > 128:
		v6Prefix = 128
	}
	p, _ := addr.Prefix(v6Prefix) // cannot fail: addr is a valid IPv6 address without zone and the bits are in range
	return p.String()
}
