#!/usr/bin/env bash
# xcaddy-check.sh: builds Caddy with this plugin the way users do, with
# xcaddy, from the working tree, and checks that the binary lists the
# plugin's modules. Everything goes into a temporary directory; the Go
# module cache is shared. Takes about two minutes.
#
# Versions can be overridden: XCADDY_VERSION, CADDY_VERSION, L4_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin

XCADDY_VERSION=${XCADDY_VERSION:-v0.4.5}
CADDY_VERSION=${CADDY_VERSION:-v2.11.9}
L4_VERSION=${L4_VERSION:-v0.1.2}
MODULES=(layer4.handlers.pop3 admin.api.pop3)

log() { printf 'xcaddy-check: %s\n' "$*"; }

module=$(go list -m)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "installing xcaddy $XCADDY_VERSION"
GOBIN="$tmp/bin" go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"

# A plain `--with $module=$repo` makes xcaddy `go get` the module first,
# which asks the module proxy about an unpublished module; a module proxy
# that answers 403 instead of 404 fails the build. The zero pseudo-version
# needs no lookup, and the replace points it at the working tree.
log "building caddy $CADDY_VERSION with $module (from $repo) and caddy-l4 $L4_VERSION"
start=$SECONDS
"$tmp/bin/xcaddy" build "$CADDY_VERSION" \
	--output "$tmp/caddy" \
	--with "$module@v0.0.0-00010101000000-000000000000=$repo" \
	--with "github.com/mholt/caddy-l4@$L4_VERSION"
log "built in $((SECONDS - start))s: $("$tmp/caddy" version)"

listed=$("$tmp/caddy" list-modules)
status=0
for m in "${MODULES[@]}"; do
	if grep -qx "$m" <<<"$listed"; then
		log "module $m: listed"
	else
		log "module $m: MISSING from caddy list-modules" >&2
		status=1
	fi
done
exit "$status"
