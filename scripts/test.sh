#!/usr/bin/env bash
# test.sh: every check CI runs (.ci/run calls it). Installs what is missing,
# then gofmt, go vet, the unit tests with the race detector (including fuzz
# seed corpora and Caddyfile adapt tests), the integration tests against
# a private Dovecot, and a build with xcaddy (scripts/xcaddy-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin

step() { printf '\n=== %s\n' "$*"; }

# A missing Dovecot fails the tests; the opt-out is for a developer's own
# machine only, never for CI.
if [ -n "${CI:-}" ] && [ -n "${POP3_TEST_NO_DOVECOT:-}" ]; then
	echo "test.sh: ignoring POP3_TEST_NO_DOVECOT in CI"
	unset POP3_TEST_NO_DOVECOT
fi

step "Dependencies"
scripts/install-deps.sh

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

step "xcaddy build: scripts/xcaddy-check.sh"
scripts/xcaddy-check.sh
