// Command caddy is a local Caddy build with the standard modules, all of
// caddy-l4 and the pop3 handler, so the project can run without xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/caddy-pop3/caddy-pop3"
)

func main() { caddycmd.Main() }
