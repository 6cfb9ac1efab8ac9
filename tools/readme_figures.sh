#!/usr/bin/env bash
# Regenerates the README's demo figures from a run of ./launch.sh in a fresh clone:
#
#   tools/readme_figures.sh [WORK_DIR]     (default: a new temporary directory)
#
# 1. clones this repository's HEAD into WORK_DIR/clone (as a new user gets it: commit first);
# 2. runs ./launch.sh there with CONVIRT_DATA=WORK_DIR/data and CONVIRT_RUN=WORK_DIR/run (the release
#    build, fresh synthetic data, fresh pretraining, every evaluation), keeps its console output in
#    WORK_DIR/launch.log and times the build ("built in N s") and the job apart;
# 3. rewrites the block between "<!-- demo-figures:begin -->" and "<!-- demo-figures:end -->" in this
#    repository's README.md from the run's files (metrics.jsonl, heldout_retrieval.json, eval/*.json),
#    naming the CPU (lscpu's model name and its AVX-512/AMX flags) and the kernels the run used.
#
# Set README_FIGURES_DRY=1 to print the block instead of writing README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="${1:-$(mktemp -d /tmp/convirt-figures.XXXXXX)}"
mkdir -p "$work"
rm -rf "$work/data" "$work/run" "$work/clone"
git clone -q "$repo" "$work/clone"

start=$(date +%s)
(cd "$work/clone" && CONVIRT_DATA="$work/data" CONVIRT_RUN="$work/run" ./launch.sh) 2>&1 | tee "$work/launch.log"
total_seconds=$(( $(date +%s) - start ))
build_seconds=$(sed -n 's/^   built in \([0-9]*\) s$/\1/p' "$work/launch.log" | head -1)
job_seconds=$(( total_seconds - ${build_seconds:-0} ))
"$work/clone/.build/release/convirt" info >"$work/info.txt"

cd "$repo"
python3 - "$work" "${build_seconds:-0}" "$job_seconds" <<'PY'
import glob, json, math, os, re, sys

sys.path.insert(0, "tools")
from readme_block import cpu_line, replace_block

work, build_s, job_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
run = os.path.join(work, "run")
cpu = cpu_line(open(os.path.join(work, "info.txt")).read())

rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
steps = rows[-1]["step"]
config = json.load(open(os.path.join(run, "config.json")))
batch = config["global_batch"]
# The arithmetic the run chose (--precision auto: bf16 where the CPU has AMX-BF16 or AVX512-BF16), and
# that of the evaluations (their manifests).
eval_precisions = sorted({json.load(open(f)).get("precision", "?") for f in glob.glob(os.path.join(run, "eval", "*.manifest.json"))})
precision = config["precision"] + ("" if eval_precisions in ([], [config["precision"]]) else f", evaluations {'/'.join(eval_precisions)}")
pairs = [r["pairs_per_s"] for r in rows[1:]] or [rows[0]["pairs_per_s"]]
pairs.sort()
tflops = sorted(r["tflops_per_rank"] for r in rows[1:] if "tflops_per_rank" in r) or [float("nan")]
train_s = sum(r.get(k, 0) for r in rows for k in ("time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s"))
tail = [r["loss"] for r in rows[-50:]]
val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
held = json.load(open(os.path.join(run, "heldout_retrieval.json")))


def result(dataset, init, fraction, protocol="linear"):
    path = os.path.join(run, "eval", f"{protocol}-{dataset}-{init}-{fraction}.json")
    return json.load(open(path)) if os.path.exists(path) else None


# The stage times ./launch.sh prints last ("Time: ... pretraining N s, ... N s, fine-tuning N s (...)").
log = open(os.path.join(work, "launch.log")).read()
stages = re.search(r"Time: (\d+) s in all; pretraining (\d+) s, linear evaluation, zero-shot and retrieval (\d+) s, fine-tuning (\d+) s \((.*)\)", log)


def cell(r):
    if r is None:
        return "-"
    capped = sum(1 for s in r.get("stop_reasons") or [] if s == "max_epochs")
    ci = (r.get("ci95") or {}).get("mean")
    return (f"{r['mean'] * 100:.1f} ± {r['std'] * 100:.1f}" + (f" [{ci['lower'] * 100:.1f}, {ci['upper'] * 100:.1f}]" if ci else "")
            + (f" ({capped} capped)" if capped else ""))


names = {"chexpert": "CheXpert, 5 labels (mean AUC)", "rsna": "RSNA (AUC)", "covidx": "COVIDx, 3 classes (accuracy)",
         "mura": "MURA, per study (AUC)"}
retrieval = json.load(open(os.path.join(run, "eval", "retrieval.json")))
p = lambda mode, k: retrieval[mode][f"precision@{k}"]["mean"] * 100
m, s = divmod(round(job_s), 60)
lines = [
    f"Measured by `tools/readme_figures.sh` on {cpu}, in {precision} (`--precision auto`):",
    f"`./launch.sh` in a fresh clone took {build_s / 60:.1f} min to build (release, once; later calls reuse the build) and then {m} min {s:02d} s",
    "for the job: synthetic data, pretraining, every evaluation and the report"
    + (f" (pretraining {stages.group(2)} s, linear evaluation, zero-shot and retrieval {stages.group(3)} s, fine-tuning {stages.group(4)} s)."
       if stages else "."),
    "",
    f"- Pretraining: {steps} steps of {batch} pairs on 2 ranks in {train_s:.0f} s of steps, {pairs[len(pairs) // 2]:.0f} pairs/s (median per step),",
    f"  {tflops[len(tflops) // 2]:.3f} TFLOP/s per rank (the model's FLOPs per step over its time, metrics.jsonl's tflops_per_rank);",
    f"  loss at the last step {rows[-1]['loss']:.3f}, mean of the last {len(tail)} steps {sum(tail) / len(tail):.3f}, last validation loss",
    f"  {val[-1]:.3f}, against log({batch}) = {math.log(batch):.3f} at chance." if val else "  (no validation loss).",
    f"- Held-out image-to-text precision@10 over the {held['distinct']['sentences']} distinct sentences of {held['studies']} test studies: "
    f"{held['distinct']['precision@10']:.3f} (chance {held['distinct']['chance@10']:.3f}, best possible {held['distinct']['maximum@10']:.3f});",
    f"  by source study (every copy of a shared sentence counted apart): {held['precision@10']:.3f} (chance {held['chance@10']:.3f}).",
    "- Linear evaluation at 1%, 10% and all of the training labels, 2 ranks, 5 runs, `--lr 1e-3 --max-epochs 300 --min-epoch-steps 20",
    "  --keep-best metric` (mean ± sample std [95% bootstrap interval over the test set], percent; \"capped\": runs that the",
    "  epoch cap rather than the plateau ended):",
    "",
    "| dataset (metric) | init | 1% | 10% | all |",
    "|---|---|---|---|---|",
]
for d in ["chexpert", "rsna", "covidx", "mura"]:
    for init in ["convirt", "random"]:
        cells = [cell(result(d, init, f)) for f in ["0.01", "0.1", "1"]]
        lines.append(f"| {names[d] if init == 'convirt' else ''} | {'ConVIRT `demo`' if init == 'convirt' else 'random init'} | " + " | ".join(cells) + " |")
if any(result(d, i, f, "finetune") for d in names for i in ["convirt", "random"] for f in ["0.01", "0.1", "1"]):
    lines += [
        "",
        f"- Fine-tuning at the same fractions, 2 ranks, the paper's protocol (the classifier alone for 200 steps, then the whole network;"
        f" lr 1e-4, 1e-3 on COVIDx; batch 64), {stages.group(5) if stages else 'as ./launch.sh runs it'}:",
        "",
        "| dataset (metric) | init | 1% | 10% | all |",
        "|---|---|---|---|---|",
    ]
    for d in ["chexpert", "rsna", "covidx", "mura"]:
        for init in ["convirt", "random"]:
            cells = [cell(result(d, init, f, "finetune")) for f in ["0.01", "0.1", "1"]]
            lines.append(f"| {names[d] if init == 'convirt' else ''} | {'ConVIRT `demo`' if init == 'convirt' else 'random init'} | " + " | ".join(cells) + " |")
lines += [
    "",
    "- Synthetic downstream data at the calibrated difficulty (`--difficulty 1`: faint to obvious findings, soft-tissue",
    "  shadows, label noise; RSNA 27% pneumonia, COVIDx 3% COVID-19, MURA 63% abnormal).",
    f"- CheXpert 8x200-format retrieval (chance 12.5%; text queries phrased unlike the pretraining reports): image-to-image precision@5/10/50 {p('image_to_image', 5):.1f} / "
    f"{p('image_to_image', 10):.1f} / {p('image_to_image', 50):.1f}, text-to-image {p('text_to_image', 5):.1f} / "
    f"{p('text_to_image', 10):.1f} / {p('text_to_image', 50):.1f}.",
]
zero = {}
for d in ["chexpert", "rsna", "covidx", "mura"]:
    path = os.path.join(run, "eval", f"zeroshot-{d}.json")
    if os.path.exists(path):
        zero[d] = json.load(open(path))
if zero:
    lines.append("- Zero-shot from the default prompts (no labels): " + "; ".join(
        f"{names[d]} {r['mean'] * 100:.1f}" for d, r in zero.items()) + ".")
    if "chexpert" in zero:
        lines.append("  CheXpert per label: " + ", ".join(f"{k} {v * 100:.1f}" for k, v in sorted(zero["chexpert"]["per_label"].items())) + ".")
block = "\n".join(lines)
if os.environ.get("README_FIGURES_DRY"):
    print(block)
    sys.exit(0)
replace_block("demo-figures", block)
print(f"README.md: demo figures rewritten from {run}")
PY
