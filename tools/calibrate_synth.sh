#!/usr/bin/env bash
# The calibration sweep of the synthetic downstream datasets' difficulty (issue 16): for each difficulty
# and seed, `convirt synth` writes CheXpert, RSNA, COVIDx and MURA, and `convirt eval linear` scores a
# pretrained encoder and a random-init one at the label fractions, with the demo's protocol. Prints a
# Markdown table: mean +- sample std over the 5 runs of each evaluation, percent. MIN_EPOCH_STEPS (default
# 20, the demo's) is passed as --min-epoch-steps and KEEP_BEST (default metric) as --keep-best; the table in
# tools/calibration.md was measured with MIN_EPOCH_STEPS=1 KEEP_BEST=loss.
#
#   tools/calibrate_synth.sh CONVIRT_BIN CHECKPOINT WORK [DIFFICULTIES] [SEEDS] [FRACTIONS]
#   e.g. tools/calibrate_synth.sh .build/release/convirt runs/demo /tmp/cal "0 0.5 1 1.5" "0 1 2" "0.1 1"
set -euo pipefail
bin="$1" checkpoint="$2" work="$3"
difficulties="${4:-0 0.5 1 1.5}" seeds="${5:-0 1 2}" fractions="${6:-0.1 1}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
mkdir -p "$work"
printf '| dataset | difficulty | seed | fraction | ConVIRT | random init | gap |\n|---|---|---|---|---|---|---|\n'
for d in $difficulties; do
  for seed in $seeds; do
    for dataset in chexpert rsna covidx mura; do
      out="$work/d$d-s$seed/$dataset"
      if [ ! -e "$out/.complete" ]; then
        "$bin" synth "$dataset" --out "$out" --seed "$seed" --difficulty "$d" >/dev/null && touch "$out/.complete"
      fi
      root="$out"
      [ "$dataset" = chexpert ] && root="$out/CheXpert-v1.0-small"
      [ "$dataset" = mura ] && root="$out/MURA-v1.1"
      for fraction in $fractions; do
        [ "$dataset" = covidx ] && [ "$fraction" = 0.01 ] && continue
        line="| $dataset | $d | $seed | $fraction |"
        values=()
        for init in convirt random; do
          json="$out/linear-$init-$fraction.json"
          "$bin" eval linear --dataset "$dataset" --root "$root" --checkpoint "$checkpoint" --init "$init" --fraction "$fraction" \
            --lr 1e-3 --max-epochs 300 --min-epoch-steps "${MIN_EPOCH_STEPS:-20}" --keep-best "${KEEP_BEST:-metric}" --out "$json" --quiet >/dev/null
          values+=("$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("%.1f %.1f" % (100 * r["mean"], 100 * r["std"]))' "$json")")
        done
        read -r cm cs <<<"${values[0]}"; read -r rm rs <<<"${values[1]}"
        echo "$line $cm ± $cs | $rm ± $rs | $(python3 -c "print('%.1f' % ($cm - $rm))") |"
      done
    done
  done
done
