#!/usr/bin/env bash
# test.sh: every check CI runs (.ci/run calls it). Installs what is missing,
# then gofmt, go vet, the unit tests with the race detector (including fuzz
# seed corpora and Caddyfile adapt tests), the integration tests against
# a private Dovecot, a smoke run of the benchmark (pop3bench -quick against
# Dovecot and NGINX's mail proxy) and a build with xcaddy
# (scripts/xcaddy-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin

step() { printf '\n=== %s\n' "$*"; }

# A missing Dovecot, NGINX, gsasl or fail2ban fails the tests; the opt-outs
# are for a developer's own machine only, never for CI.
for optout in POP3_TEST_NO_DOVECOT POP3_TEST_NO_NGINX POP3_TEST_NO_GSASL POP3_TEST_NO_FAIL2BAN; do
	if [ -n "${CI:-}" ] && [ -n "${!optout:-}" ]; then
		echo "test.sh: ignoring $optout in CI"
		unset "$optout"
	fi
done

step "Dependencies"
# NGINX with its mail module for the benchmark's smoke run (no service is started).
scripts/install-deps.sh nginx libnginx-mod-mail

step "gofmt -l ."
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "these files need gofmt -w:"
	# shellcheck disable=SC2001
	sed 's/^/  /' <<<"$unformatted"
	exit 1
fi
echo "all formatted"

step "go vet ./... (also with -tags integration)"
go vet ./...
go vet -tags integration ./...

step "Unit tests: go test -race -count=1 ./..."
go test -race -count=1 ./...

step "Integration tests: go test -race -count=1 -tags integration -timeout 20m ./integration/..."
go test -race -count=1 -tags integration -timeout 20m ./integration/...

step "Benchmark smoke run: go test -count=1 -tags integration -run TestQuick ./cmd/pop3bench"
go test -count=1 -tags integration -run TestQuick -timeout 10m ./cmd/pop3bench

step "xcaddy build: scripts/xcaddy-check.sh"
scripts/xcaddy-check.sh
