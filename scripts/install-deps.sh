#!/usr/bin/env bash
# Installs what the tests and the demo need on Debian 12, if missing:
# Dovecot (core + POP3), curl, fetchmail, python3 with poplib, pebble
# (an ACME test server, with pebble-challtestsrv) for the ACME test, and
# GNU SASL's gsasl (a SCRAM client for internal/sasl's interop tests),
# fail2ban (fail2ban-regex and fail2ban-client check contrib/fail2ban),
# redis-server (the shared limits store's tests run a private one),
# HAProxy (the cluster test runs one in front of three instances), plus
# any Debian packages named as arguments (scripts/bench.sh adds NGINX).
# Idempotent; runs `apt-get update` only when something is missing.
# No system service is started: a temporary policy-rc.d refuses it.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
	SUDO=(sudo)
fi

missing=()
dovecot_version() {
	local bin
	bin=$(command -v dovecot || echo /usr/sbin/dovecot)
	"$bin" --version 2>/dev/null | cut -d' ' -f1
}
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for pkg in dovecot-core dovecot-pop3d curl fetchmail pebble gsasl fail2ban redis-server haproxy "$@"; do
	have_pkg "$pkg" || missing+=("$pkg")
done
# Any python3 will do (pyenv's included) as long as it has poplib.
if ! python3 -c 'import poplib' >/dev/null 2>&1; then
	missing+=(python3)
fi

if [ "${#missing[@]}" -eq 0 ]; then
	log "all present: dovecot $(dovecot_version), curl, fetchmail, python3 with poplib, pebble, gsasl, fail2ban, redis-server, haproxy${*:+, $*}"
	exit 0
fi

if ! command -v apt-get >/dev/null; then
	log "missing ${missing[*]}, and there is no apt-get: install them by hand" >&2
	exit 1
fi

# A policy-rc.d that exits 101 keeps the packages from starting services
# (Debian policy, invoke-rc.d). An existing one is left alone.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
	log "adding a temporary $policy so no service starts"
	printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
	"${SUDO[@]}" chmod 755 "$policy"
	own_policy=1
fi
cleanup() {
	if [ "$own_policy" -eq 1 ]; then
		"${SUDO[@]}" rm -f "$policy"
		log "removed $policy"
	fi
}
trap cleanup EXIT

log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Tests run their own Dovecot, redis-server and HAProxy; system ones would
# only hold ports.
for svc in dovecot redis-server haproxy; do
	if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
		log "stopping the system $svc service"
		"${SUDO[@]}" systemctl stop "$svc" || true
	elif command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
		log "stopping the system $svc service"
		"${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
	fi
done

if ! python3 -c 'import poplib' >/dev/null 2>&1; then
	log "python3 still has no poplib (python3 is $(command -v python3))" >&2
	exit 1
fi
log "done: dovecot $(dovecot_version)"
