#!/usr/bin/env bash
# The project's test command (README's second command): unit tests, then the
# integration tests that boot the committed test guests and Linux kernels.
# Ends with one summary line, "N passed, N failed, N not run", over every test
# binary. "Not run" counts tests that could not run here (no /dev/kvm outside CI;
# under CI, CI=true, that is a failure instead); each one is listed.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
not_run=target/not-run.log
mkdir -p target
rm -f "$not_run"
set +e
cargo test --release "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
skipped=0
if [ -f "$not_run" ]; then
    skipped=$(wc -l <"$not_run")
    echo
    echo "Not run (they passed vacuously; no /dev/kvm):"
    sed 's/^/  /' "$not_run"
fi
echo
echo "$passed passed, $failed failed, $skipped not run"
exit "$status"
