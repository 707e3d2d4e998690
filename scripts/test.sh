#!/usr/bin/env bash
# The project's test command (README's second command): unit tests, then the
# integration tests that boot the committed test guests and Linux kernels.
# Ends with one summary line, "N passed, N failed, N not run", over every test
# binary (--no-fail-fast: a failing binary does not hide the ones after it).
# "Not run" counts tests that could not run here (no /dev/kvm or no root outside CI;
# under CI, CI=true, that is a failure instead); each one is listed. cargo reports such a test
# as passed (it returned early), so it is taken out of the passed count.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
not_run=target/not-run.log
mkdir -p target
rm -f "$not_run"
set +e
cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# No "test result" line at all (a build error) is a count of 0, not a failed grep.
sum() { { grep -E '^test result:' "$log" || true; } | sed -nE "s/.* ([0-9]+) $1.*/\\1/p" | awk '{s+=$1} END {print s+0}'; }
cargo_passed=$(sum passed)
failed=$(sum failed)
skipped=0
if [ -f "$not_run" ]; then
    # One line per test that did not run (binary and test name, see tests/common).
    skipped=$(sort -u "$not_run" | wc -l)
    echo
    echo "Not run (cargo counted them as passed):"
    sort -u "$not_run" | sed 's/^/  /'
fi
passed=$((cargo_passed - skipped))
if [ "$passed" -lt 0 ]; then
    passed=0
fi
echo
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test failed without a failing test (a build error or a crashed test binary): see above"
fi
echo "$passed passed, $failed failed, $skipped not run"
exit "$status"
