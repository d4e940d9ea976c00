#!/usr/bin/env bash
# demo.sh: the POP3 proxy end to end on this machine. It installs what is
# missing, builds Caddy with the pop3 handler, starts a private Dovecot as
# the upstream, runs Caddy with Caddyfile.example, and fetches the demo
# message through the proxy with curl, over STLS and over implicit TLS.
#
# Override the listen addresses with POP3_LISTEN, POP3S_LISTEN,
# POP3_UPSTREAM and POP3_ADMIN (see Caddyfile.example).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
fail() {
	printf '\ndemo: %s\n' "$*" >&2
	exit 1
}

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || fail "go is not installed (https://go.dev/dl/)"

export POP3_LISTEN=${POP3_LISTEN:-127.0.0.1:1110}
export POP3S_LISTEN=${POP3S_LISTEN:-127.0.0.1:1995}
export POP3_UPSTREAM=${POP3_UPSTREAM:-127.0.0.1:11110}
export POP3_HOSTNAME=localhost # the name curl connects to and checks
export POP3_ADMIN=${POP3_ADMIN:-localhost:2019}

say "Installing missing packages (Dovecot, curl, ...)"
scripts/install-deps.sh

say "Building bin/caddy and bin/demo-backend"
go build -o bin/caddy ./cmd/caddy
go build -o bin/demo-backend ./internal/cmd/demo-backend

# Under /tmp and world-traversable: Dovecot's unprivileged users read the
# backend's files inside it.
work=$(mktemp -d /tmp/caddy-pop3-demo.XXXXXX)
chmod 755 "$work"
export XDG_DATA_HOME=$work/data XDG_CONFIG_HOME=$work/config
backend_pid='' caddy_pid='' ok=0

cleanup() {
	for pid in $caddy_pid $backend_pid; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in $caddy_pid $backend_pid; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "$ok" -eq 1 ]; then
		rm -rf "$work"
	else
		for f in "$work"/backend.log "$work"/caddy.log "$work"/dovecot/dovecot.log; do
			[ -s "$f" ] && printf '\n--- last lines of %s\n' "$f" && tail -n 15 "$f"
		done
		printf '\nlogs are in %s\n' "$work"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# greets HOST:PORT succeeds when a POP3 server there says "+OK".
greets() {
	# shellcheck disable=SC2016 # expanded by the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/${1%:*}/${1##*:}" && IFS= read -r line <&3 && [[ $line == "+OK"* ]]' _ "$1" 2>/dev/null
}

# wait_for SECONDS PID WHAT COMMAND...: polls COMMAND twice a second while
# process PID lives.
wait_for() {
	local secs=$1 pid=$2 what=$3
	shift 3
	for ((i = 0; i < secs * 2; i++)); do
		"$@" && return 0
		kill -0 "$pid" 2>/dev/null || fail "waiting for $what: the process exited"
		sleep 0.5
	done
	fail "waiting for $what: gave up after ${secs}s"
}

say "Starting Dovecot (user demo, password demo-password) on $POP3_UPSTREAM"
bin/demo-backend -pop3 "$POP3_UPSTREAM" -dir "$work/dovecot" >"$work/backend.log" 2>&1 &
backend_pid=$!
wait_for 20 "$backend_pid" "Dovecot" grep -q '^ready' "$work/backend.log"

say "Starting Caddy: POP3 with STLS on $POP3_LISTEN, POP3S on $POP3S_LISTEN"
bin/caddy run --config Caddyfile.example --adapter caddyfile >"$work/caddy.log" 2>&1 &
caddy_pid=$!
wait_for 30 "$caddy_pid" "the proxy's greeting on $POP3_LISTEN" greets "$POP3_LISTEN"
# Caddy's internal CA writes its root when it starts; the server
# certificate for localhost follows in the background.
root=$XDG_DATA_HOME/caddy/pki/authorities/local/root.crt
wait_for 30 "$caddy_pid" "Caddy's local CA root ($root)" test -s "$root"

# fetch URL: curl through the proxy, trusting Caddy's root. Retried while the
# certificate may still be on its way.
fetch() {
	local out
	for ((i = 0; i < 10; i++)); do
		if out=$(curl --silent --show-error --ssl-reqd --cacert "$root" -u demo:demo-password "$1" 2>&1); then
			printf '%s\n' "$out" | tr -d '\r' | sed 's/^/    /'
			return 0
		fi
		sleep 1
	done
	printf '%s\n' "$out" >&2
	return 1
}

stls_port=${POP3_LISTEN##*:}
tls_port=${POP3S_LISTEN##*:}
say "Message 1 over POP3 + STLS: curl --ssl-reqd pop3://localhost:$stls_port/1"
fetch "pop3://localhost:$stls_port/1" || fail "fetching message 1 through the proxy failed"
say "The mailbox over POP3S: curl pop3s://localhost:$tls_port/ (message number and size)"
fetch "pop3s://localhost:$tls_port/" || fail "listing the mailbox over POP3S failed"

ok=1
say "It works: Caddy proxied POP3 to Dovecot, with TLS from Caddy's own CA."
