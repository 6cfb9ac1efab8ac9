#!/usr/bin/env bash
# The effect of --exclude-identical-texts on the synthetic MIMIC-CXR: the demo pretraining twice, with
# the same seed, without and with the option, then the held-out retrieval (written by train) and
# ./launch.sh's linear evaluation of each encoder (1%, 10% and all of the labels; COVIDx 10% and all).
#
#   tools/false_negatives.sh [WORK_DIR]     (default: a new temporary directory)
#
# Reads ./launch.sh's data (CONVIRT_DATA, default data/; run ./launch.sh first) and prints a Markdown
# table: how often the option fires, and each result side by side with its 95% bootstrap interval.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${CONVIRT_DATA:-data}"
work="${1:-$(mktemp -d /tmp/convirt-false-negatives.XXXXXX)}"
mkdir -p "$work"
bin=.build/release/convirt
[ -f "$data/prepared/manifest.json" ] || { echo "no $data/prepared: run ./launch.sh first" >&2; exit 1; }
export OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for setting in plain excluded; do
  flags=()
  [ "$setting" = excluded ] && flags=(--exclude-identical-texts)
  echo "== pretraining ($setting)" >&2
  mpirun --oversubscribe --bind-to none -q -np 2 "$bin" train --data "$data/prepared" --run-dir "$work/$setting" --preset demo \
    --overwrite "${flags[@]}" >"$work/$setting.log"
  for dataset in chexpert rsna covidx mura; do
    fractions="0.01 0.1 1"
    [ "$dataset" = covidx ] && fractions="0.1 1"
    for fraction in $fractions; do
      mpirun --oversubscribe --bind-to none -q -np 2 "$bin" eval linear --dataset "$dataset" --root "$data/eval/$dataset" \
        --checkpoint "$work/$setting" --fraction "$fraction" --lr 1e-3 --max-epochs 300 --min-epoch-steps 20 --keep-best metric \
        --out "$work/$setting/eval/linear-$dataset-$fraction.json" --quiet >&2
    done
  done
done
python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
def rows(setting):
    return [json.loads(l) for l in open(os.path.join(work, setting, "metrics.jsonl")) if l.strip()]
excluded = [r.get("excluded_negatives", 0) for r in rows("excluded")]
batch = json.load(open(os.path.join(work, "excluded", "config.json")))["global_batch"]
fired = sum(1 for e in excluded if e > 0)
print(f"--exclude-identical-texts on the demo preset (global batch {batch}, {len(excluded)} steps): it fired in {fired} steps "
      f"({100 * fired / len(excluded):.0f}%), excluding {sum(excluded) / len(excluded):.2f} of the {batch * (batch - 1)} ordered pairs per step on average "
      f"(at most {max(excluded)}).\n")
def cell(setting, name):
    path = os.path.join(work, setting, "eval", name)
    r = json.load(open(path))
    ci = r.get("ci95", {}).get("mean")
    return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" + (f" [{100 * ci['lower']:.1f}, {100 * ci['upper']:.1f}]" if ci else "")
held = {s: json.load(open(os.path.join(work, s, "heldout_retrieval.json"))) for s in ("plain", "excluded")}
print("| result | paper's loss (all negatives) | identical sentences excluded |")
print("|---|---|---|")
print(f"| held-out image-to-text precision@10, distinct sentences | {held['plain']['distinct']['precision@10']:.3f} "
      f"| {held['excluded']['distinct']['precision@10']:.3f} |")
print(f"| held-out image-to-text precision@10, by source study | {held['plain']['precision@10']:.3f} | {held['excluded']['precision@10']:.3f} |")
names = {"chexpert": "CheXpert (mean AUC)", "rsna": "RSNA (AUC)", "covidx": "COVIDx (accuracy)", "mura": "MURA (AUC)"}
for dataset, title in names.items():
    for fraction in (["0.1", "1"] if dataset == "covidx" else ["0.01", "0.1", "1"]):
        name = f"linear-{dataset}-{fraction}.json"
        label = {"0.01": "1%", "0.1": "10%", "1": "all"}[fraction]
        print(f"| linear, {title}, {label} | {cell('plain', name)} | {cell('excluded', name)} |")
PY
