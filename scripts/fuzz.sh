#!/usr/bin/env bash
# fuzz.sh [DURATION] [PATTERN]: runs every fuzz target of the module, one
# after the other, for DURATION each (default 1m; a Go duration such as 30s
# or 10m). PATTERN, if given, keeps only targets whose name matches it (grep
# -E), e.g. `scripts/fuzz.sh 10m 'Response'`.
#
# Not part of CI: CI runs only the seed corpora (f.Add and testdata/fuzz/),
# which `go test ./...` does. A failing input is written by Go into the
# package's testdata/fuzz/FuzzX/; keep it there (it becomes a seed) and fix
# the code. The script goes on with the other targets and exits 1 if any
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin

duration=${1:-1m}
pattern=${2:-.}
failed=()
for pkg in $(go list ./...); do
	# `go test -list` prints the package's tests, fuzz targets among them.
	targets=$(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep -E '^Fuzz' | grep -E -- "$pattern" || true)
	for target in $targets; do
		printf '\n=== %s %s (%s)\n' "$pkg" "$target" "$duration"
		if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$duration" -fuzzminimizetime 10s "$pkg"; then
			failed+=("$pkg $target")
		fi
	done
done
if [ ${#failed[@]} -gt 0 ]; then
	printf '\nfuzz.sh: failed:\n'
	printf '  %s\n' "${failed[@]}"
	exit 1
fi
printf '\nfuzz.sh: every target ran %s without a failure\n' "$duration"
