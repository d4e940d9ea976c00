#!/usr/bin/env bash
# bench.sh: caddy-pop3 against Dovecot directly and NGINX's mail proxy, in
# one run (cmd/pop3bench). On a fresh Debian machine (root or sudo) it
# installs NGINX with its mail module, Dovecot and redis-server (for
# caddy-pop3's limits in Redis) with apt, without letting their system
# services start, builds bin/caddy and bin/pop3bench, raises the open files
# limit and runs the benchmark. Results: bench/results.md and
# bench/login-latency.png (bench/pop3bench.log has the whole output).
#
#   scripts/bench.sh              # the full run, a few minutes
#   scripts/bench.sh -quick       # smoke run, under a minute
#   scripts/bench.sh -pprof       # also CPU and heap profiles of Caddy
#
# Arguments go to pop3bench (see go run ./cmd/pop3bench -h); BENCH_OUT
# changes the output directory (default bench). Measure on a quiet
# machine: every server and the client share its CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bench: %s\n' "$*"; }
fail() {
	printf 'bench: %s\n' "$*" >&2
	exit 1
}

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || fail "go is not installed (https://go.dev/dl/)"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
	SUDO=(sudo)
fi

# service_active NAME: the system service is running.
service_active() {
	if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
		systemctl is-active --quiet "$1" 2>/dev/null
	elif command -v service >/dev/null; then
		service "$1" status >/dev/null 2>&1
	else
		return 1
	fi
}

# stop_service NAME: stop it now and keep it from starting at boot.
stop_service() {
	if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
		"${SUDO[@]}" systemctl stop "$1" >/dev/null 2>&1 || true
		"${SUDO[@]}" systemctl disable "$1" >/dev/null 2>&1 || true
	elif command -v service >/dev/null; then
		"${SUDO[@]}" service "$1" stop >/dev/null 2>&1 || true
		if command -v update-rc.d >/dev/null; then
			"${SUDO[@]}" update-rc.d "$1" disable >/dev/null 2>&1 || true
		fi
	fi
}

# Services that run now are someone else's: they are left alone. The ones
# the install below brings must neither run nor start at boot: the
# benchmark runs private instances.
services=(nginx dovecot redis-server)
was_active=()
for svc in "${services[@]}"; do
	service_active "$svc" && was_active+=("$svc")
done
# install-deps.sh installs Dovecot and redis-server (among what the tests
# need), and NGINX with its mail module as asked.
scripts/install-deps.sh nginx libnginx-mod-mail
for svc in "${services[@]}"; do
	if [[ " ${was_active[*]} " != *" $svc "* ]] && service_active "$svc"; then
		stop_service "$svc"
		service_active "$svc" && fail "the system $svc service is still running; stop it and run again"
	fi
done
for svc in "${services[@]}"; do
	if service_active "$svc"; then
		log "note: a system $svc service is running (left alone); it shares the CPUs with the benchmark"
	fi
done
[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || fail "/usr/lib/nginx/modules/ngx_mail_module.so is missing (libnginx-mod-mail)"
command -v redis-server >/dev/null || fail "redis-server is missing (apt-get install redis-server)"
log "$(/usr/sbin/nginx -v 2>&1), dovecot $(/usr/sbin/dovecot --version), $(redis-server --version | cut -d' ' -f1-3)"

log "building bin/caddy and bin/pop3bench"
go build -o bin/caddy ./cmd/caddy
go build -o bin/pop3bench ./cmd/pop3bench

# Open files: every idle session holds two sockets in the proxy. Raise the
# hard limit where allowed (root), else use what the hard limit gives.
want=1048576
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
	ulimit -Hn "$want" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
log "open files limit: $nofile"
if [ "$nofile" != unlimited ] && [ "$nofile" -lt 21400 ]; then
	log "warning: 10,000 idle sessions through caddy-pop3 need about 21,400 descriptors (2 sockets each, and caddy-pop3 keeps 1/16 of its limit in reserve); raise the hard limit (e.g. LimitNOFILE, /etc/security/limits.conf) or pass -sessions 1000"
fi

read -r load1 _ </proc/loadavg
log "load average: $load1 on $(nproc) CPUs (measure on a quiet machine)"

out=${BENCH_OUT:-bench}
mkdir -p "$out"
log "running bin/pop3bench -caddy bin/caddy -out $out $*"
set +e
bin/pop3bench -caddy bin/caddy -out "$out" "$@" 2>&1 | tee "$out/pop3bench.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
	fail "pop3bench failed (exit $status); see $out/pop3bench.log"
fi
log "results: $out/results.md, $out/login-latency.png"
