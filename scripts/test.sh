#!/usr/bin/env bash
# The project's test command (README's second command): unit tests, then the
# integration tests that boot the committed test guests on /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release "$@"
