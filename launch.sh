#!/usr/bin/env bash
# ./launch.sh                      set up and run the main job on embedded defaults
# ./launch.sh -np N [--hostfile F] [--max-restarts K] [mpirun options] -- SUBCOMMAND [convirt options]
#                                  run `convirt SUBCOMMAND ...` on N ranks under mpirun; `train` resumes
#                                  from the run directory's latest checkpoint and a failed job is
#                                  restarted up to K times
#
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
# A failed rebuild stops here with the compiler's errors (never runs a stale binary).
build_log="$(mktemp)"
if ! swift build -c release >"$build_log" 2>&1; then
  grep -vE '^\[[0-9]+/[0-9]+\]' "$build_log" >&2
  rm -f "$build_log"
  echo "launch.sh: the release build failed (errors above)" >&2
  exit 1
fi
grep -vE '^\[[0-9]+/[0-9]+\]' "$build_log" || true
rm -f "$build_log"
bin="$(swift build -c release --show-bin-path)/convirt"
[ -x "$bin" ] || { echo "launch.sh: the release build produced no $bin" >&2; exit 1; }

mpi_flags=(--bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  # Open MPI refuses root unless told; these two variables say so for mpirun and every rank.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Single-node runs use shared memory and loopback only (no probing of other interfaces).
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader,tcp}" OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-lo}"

if [ $# -eq 0 ]; then
  # The main job on embedded defaults: synthetic MIMIC-CXR, prepared, 2-rank demo pretraining, then the
  # held-out retrieval check. Set CONVIRT_DATA / CONVIRT_RUN to use other directories.
  data="${CONVIRT_DATA:-data}" run="${CONVIRT_RUN:-runs/demo}"
  export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
  if [ ! -f "$data/mimic/mimic-cxr-2.0.0-metadata.csv.gz" ]; then
    echo "== synthesising MIMIC-CXR-JPG into $data/mimic"
    "$bin" synth mimic --out "$data/mimic" --studies 2000
  fi
  if [ ! -f "$data/prepared/manifest.json" ]; then
    echo "== preparing $data/prepared"
    "$bin" prepare mimic --root "$data/mimic" --out "$data/prepared"
  fi
  echo "== pretraining: 2 ranks, demo preset"
  mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" train --data "$data/prepared" --run-dir "$run" --preset demo \
    --checkpoint-every 500 --resume
  # The paper's evaluations on synthetic CheXpert, RSNA, COVIDx and MURA (each in its released layout):
  # linear evaluation of the pretrained encoder and of a random-init one, and CheXpert 8x200 retrieval.
  for dataset in chexpert rsna covidx mura; do
    if [ ! -e "$data/eval/$dataset/.complete" ]; then
      echo "== synthesising $dataset into $data/eval/$dataset"
      "$bin" synth "$dataset" --out "$data/eval/$dataset" && touch "$data/eval/$dataset/.complete"
    fi
  done
  for dataset in chexpert rsna covidx mura; do
    for init in convirt random; do
      echo "== linear evaluation on $dataset: $init encoder (2 ranks, 5 runs)"
      mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" eval linear --dataset "$dataset" --root "$data/eval/$dataset" \
        --checkpoint "$run" --init "$init" --out "$run/eval/linear-$dataset-$init.json" | grep -E "over [0-9]+ run|^  "
    done
  done
  echo "== CheXpert 8x200 retrieval (2 ranks)"
  mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" eval retrieval --checkpoint "$run" --root "$data/eval/chexpert" \
    --queries "$data/eval/chexpert/chexpert_8x200" --out "$run/eval/retrieval.json"
  echo "== report"
  "$bin" report "$run" --quiet
  echo "Results: $run/report.html (curves, throughput, the evaluation tables beside the paper's, retrieval examples),"
  echo "         $run/config.json (the resolved configuration), $run/metrics.jsonl (one JSON object per step),"
  echo "         $run/heldout_retrieval.json (image-to-text precision@10 on held-out studies, with chance level),"
  echo "         $run/checkpoints/ (sharded checkpoints; rerunning ./launch.sh continues from the latest),"
  echo "         $run/eval/*.json (linear evaluation, ConVIRT and random init, and retrieval; the tables above"
  echo "         print them beside the paper's Tables 1 and 2)."
  exit 0
fi

mpirun_args=()
max_restarts=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  if [ "$1" = "--max-restarts" ]; then max_restarts="${2:?--max-restarts needs a number}"; shift 2; continue; fi
  mpirun_args+=("$1"); shift
done
[ "${1:-}" = "--" ] || { echo "usage: ./launch.sh -np N [--hostfile F] [--max-restarts K] [mpirun options] -- SUBCOMMAND [options]" >&2; exit 2; }
shift
args=("$@")
# Training always continues from the run directory's latest complete checkpoint, if it has one.
if [ "${args[0]:-}" = "train" ] && ! printf '%s\n' "${args[@]}" | grep -qx -- "--resume"; then args+=(--resume); fi
attempt=0
until mpirun --oversubscribe "${mpi_flags[@]}" "${mpirun_args[@]}" "$bin" "${args[@]}"; do
  status=$?
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$max_restarts" ]; then exit "$status"; fi
  echo "launch.sh: the job failed (status $status); restart $attempt of $max_restarts from the latest checkpoint" >&2
done
