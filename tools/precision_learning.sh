#!/usr/bin/env bash
# Does bf16 learn as fp32 does? Trains the demo recipe (./launch.sh's pretraining: 4000 steps of 32 pairs
# on 2 ranks) in each precision with two seeds on ./launch.sh's data, evaluates each encoder on held-out
# retrieval and CheXpert 8x200, and rewrites the block of docs/PRECISION.md between
# "<!-- precision-learning:begin -->" and "<!-- precision-learning:end -->" (README_FIGURES_DRY=1: print it instead).
#
#   tools/precision_learning.sh [WORK_DIR]     (run ./launch.sh once first, for data/ and the build)
#   TABLE_ONLY=1 tools/precision_learning.sh WORK_DIR    (the block from an earlier run's WORK_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d /tmp/convirt-precision.XXXXXX)}"
data="${CONVIRT_DATA:-data}"
bin=.build/release/convirt
for need in "$bin" "$data/prepared/manifest.json" "$data/eval/chexpert/chexpert_8x200"; do
  [ -e "$need" ] || { echo "tools/precision_learning.sh: $need is missing: run ./launch.sh first" >&2; exit 1; }
done
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
[ -n "${TABLE_ONLY:-}" ] || "$bin" info >"$work/info.txt"
for precision in fp32 bf16; do
  [ -z "${TABLE_ONLY:-}" ] || break
  for seed in 0 1; do
    run="$work/$precision-$seed"
    rm -rf "$run"
    echo "== $precision, seed $seed: $run"
    start=$SECONDS
    mpirun --oversubscribe -q --bind-to none -np 2 "$bin" train --data "$data/prepared" --run-dir "$run" --preset demo \
      --checkpoint-every 500 --precision "$precision" --seed "$seed" >"$run.log" 2>&1
    echo $((SECONDS - start)) >"$run.seconds"
    mpirun --oversubscribe -q --bind-to none -np 2 "$bin" eval retrieval --checkpoint "$run" --root "$data/eval/chexpert" \
      --queries "$data/eval/chexpert/chexpert_8x200" --out "$run/retrieval.json" --precision "$precision" --quiet >>"$run.log" 2>&1
  done
done

python3 - "$work" <<'PY'
import json, os, sys

sys.path.insert(0, "tools")
from readme_block import cpu_line, replace_block

work = sys.argv[1]
lines = [
    f"Measured by `tools/precision_learning.sh` on {cpu_line(open(os.path.join(work, 'info.txt')).read())}: `mpirun -np 2 convirt",
    "train --preset demo --precision P --seed S` on `./launch.sh`'s synthetic MIMIC-CXR, then `eval retrieval` on its CheXpert 8x200:",
    "",
    "| precision, seed | validation loss | held-out P@10 by source | over distinct sentences | 8x200 i2i P@10 | t2i P@10 | 4000 steps |",
    "|---|---|---|---|---|---|---|",
]
columns = ["validation loss", "held-out P@10 by source", "over distinct sentences", "8x200 i2i P@10", "t2i P@10"]
values = {}  # (precision, column) -> the seeds' values
for precision in ["fp32", "bf16"]:
    for seed in [0, 1]:
        run = os.path.join(work, f"{precision}-{seed}")
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        held = json.load(open(os.path.join(run, "heldout_retrieval.json")))
        retrieval = json.load(open(os.path.join(run, "retrieval.json")))
        p10 = lambda mode: retrieval[mode]["precision@10"]["mean"] * 100
        row = [[r["val_loss"] for r in rows if r.get("val_loss") is not None][-1], held["precision@10"],
               held["distinct"]["precision@10"], p10("image_to_image"), p10("text_to_image")]
        for column, value in zip(columns, row):
            values.setdefault((precision, column), []).append(value)
        cells = [f"{v:.3f}" if i < 3 else f"{v:.1f}" for i, v in enumerate(row)]
        seconds = open(run + ".seconds").read().strip()
        lines.append(f"| {precision}, {seed} | " + " | ".join(cells) + f" | {seconds} s |")
# The precision's effect against the seeds' spread: where bf16's range lies within or overlaps fp32's,
# two seeds a side cannot tell the two apart.
lines.append("")
summary = []
for i, column in enumerate(columns):
    show = (lambda v: f"{v:.3f}") if i < 3 else (lambda v: f"{v:.1f}")
    f, b = sorted(values[("fp32", column)]), sorted(values[("bf16", column)])
    relation = "within" if f[0] <= b[0] and b[-1] <= f[-1] else "overlapping" if b[0] <= f[-1] and f[0] <= b[-1] else "apart from"
    summary.append(f"{column} bf16 {show(b[0])}-{show(b[-1])}, {relation} fp32's {show(f[0])}-{show(f[-1])}")
lines.append("Ranges over the two seeds: " + "; ".join(summary) + ".")
block = "\n".join(lines)
if os.environ.get("README_FIGURES_DRY"):
    print(block)
else:
    replace_block("precision-learning", block, readme="docs/PRECISION.md")
    print("docs/PRECISION.md: precision learning figures rewritten")
PY
