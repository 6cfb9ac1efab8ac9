#!/usr/bin/env bash
# Runs the whole test suite: installs any missing Debian package, builds in release (numeric tests are
# 10-100x slower in debug) and runs every test target. Multi-rank tests start mpirun themselves.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
# Each rank single-threaded in tests; mpirun as root is allowed inside the test processes only.
export OPENBLAS_NUM_THREADS=1
exec swift test -c release "$@"
