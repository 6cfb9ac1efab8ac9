#!/usr/bin/env bash
# The README's first command: set-up and the demo job with no arguments, or any convirt subcommand under
# mpirun with resume and restarts (usage below, or ./launch.sh --help).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'USAGE'
usage: ./launch.sh [--full]
         set up (Debian packages, oneDNN 3, a release build) and run the demo job: synthetic MIMIC-CXR,
         2-rank pretraining, every evaluation, the report (--full: the paper's fine-tuning protocol)
       ./launch.sh -np N [--hostfile F] [--max-restarts K] [mpirun options] -- SUBCOMMAND [convirt options]
         run `convirt SUBCOMMAND` on N ranks; `train` resumes from the run directory's latest checkpoint,
         a failed job is restarted up to K times, and SIGUSR1 makes every rank checkpoint and stop
         (status 75, not restarted). `convirt --help` (in .build/release) lists the subcommands.
USAGE
}
# The arguments are read before anything is installed or built: help, or a usage error (status 64).
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
demo=0
if [ $# -eq 0 ] || { [ $# -eq 1 ] && [ "$1" = "--full" ]; }; then
  demo=1
else
  # -np N [mpirun options] [--max-restarts K] -- SUBCOMMAND ...
  mpirun_args=() max_restarts=0
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    if [ "$1" = "--max-restarts" ]; then
      if ! [[ "${2:-}" =~ ^[0-9]+$ ]]; then
        [ $# -ge 2 ] && [ "$2" != "--" ] || { usage >&2; exit 64; }
        echo "launch.sh: --max-restarts takes a number of restarts, got '$2'" >&2; exit 64
      fi
      max_restarts=$2; shift 2; continue
    fi
    mpirun_args+=("$1"); shift
  done
  [ $# -ge 2 ] || { usage >&2; exit 64; }  # the "--" and a subcommand
  shift
  args=("$@")
fi

scripts/install-deps.sh   # apt only when a package is missing (dpkg-query otherwise)

# One release build, shared with ./test.sh (which builds with the same flags: no testable imports), and
# reused while the sources are unchanged: the stamp holds the hash of Package.swift and Sources, the
# binary and its mtime, so a second call starts at once.
build_path="${CONVIRT_BUILD_PATH:-.build}"
stamp="$build_path/launch.stamp"
sources_hash="$(find Package.swift Sources -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
bin=""
if [ -f "$stamp" ]; then
  { read -r stamp_hash; read -r stamp_bin; read -r stamp_mtime; } <"$stamp" || true
  if [ "${stamp_hash:-}" = "$sources_hash" ] && [ -x "${stamp_bin:-}" ] && [ "$(stat -c %Y "$stamp_bin")" = "${stamp_mtime:-}" ]; then
    bin="$stamp_bin"
  fi
fi
if [ -z "$bin" ]; then
  echo "== building convirt (release, in $build_path; once: later calls reuse it while the sources are unchanged)"
  build_start=$(date +%s)
  build_log="$(mktemp)"
  # A failed build stops here with the compiler's errors (never runs a stale binary).
  if ! swift build -c release --build-path "$build_path" >"$build_log" 2>&1; then
    grep -vE '^\[[0-9]+/[0-9]+\]' "$build_log" >&2
    rm -f "$build_log"
    echo "launch.sh: the release build failed (errors above)" >&2
    exit 1
  fi
  grep -E '^/.*: (warning|error):' "$build_log" | sort -u | head -20 || true
  rm -f "$build_log"
  bin="$(swift build -c release --build-path "$build_path" --show-bin-path)/convirt"
  [ -x "$bin" ] || { echo "launch.sh: the release build produced no $bin" >&2; exit 1; }
  printf '%s\n%s\n%s\n' "$sources_hash" "$bin" "$(stat -c %Y "$bin")" >"$stamp"
  echo "   built in $(( $(date +%s) - build_start )) s"
fi

# -q: no Open MPI banners; convirt prints one line naming the problem (rank 0, once) and exits 1, and a
# rank killed by a signal is reported below.
mpi_flags=(--bind-to none -q)
if [ "$(id -u)" -eq 0 ]; then
  # Open MPI refuses root unless told; these two variables say so for mpirun and every rank.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Single-node runs use shared memory and loopback only (no probing of other interfaces).
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader,tcp}" OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-lo}"

if [ "$demo" = 1 ]; then
  # The main job on embedded defaults: synthetic MIMIC-CXR, prepared, 2-rank demo pretraining, then the
  # held-out retrieval check. Set CONVIRT_DATA / CONVIRT_RUN to use other directories.
  data="${CONVIRT_DATA:-data}" run="${CONVIRT_RUN:-runs/demo}"
  # Fine-tuning: 2 runs per cell and at most 10 epochs keep the first run short; `./launch.sh --full` (or
  # CONVIRT_FULL=1) runs the paper's protocol, 5 runs per cell up to the 100-epoch cap.
  full="${CONVIRT_FULL:-0}"
  [ "${1:-}" = "--full" ] && full=1
  if [ "$full" = 1 ]; then
    finetune_protocol=(--runs 5) finetune_note="5 runs per cell, up to 100 epochs (the paper's protocol)"
  else
    finetune_protocol=(--runs 2 --max-epochs 10)
    finetune_note="2 runs per cell, at most 10 epochs (./launch.sh --full: the paper's 5 runs, up to 100 epochs)"
  fi
  start=$SECONDS
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
  pretraining_start=$SECONDS
  mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" train --data "$data/prepared" --run-dir "$run" --preset demo \
    --checkpoint-every 500 --resume
  pretraining_seconds=$((SECONDS - pretraining_start))
  # The paper's evaluations on synthetic CheXpert, RSNA, COVIDx and MURA (each in its released layout):
  # linear evaluation of the pretrained encoder and of a random-init one, and CheXpert 8x200 retrieval.
  # At the calibrated difficulty (faint to obvious findings, normal variation that mimics disease, the
  # datasets' label noise and class balance). The marker names the generator's version: data written by
  # an earlier one (full-contrast findings, smaller test sets) is written again.
  synth_version="synth-v3 difficulty 1"
  for dataset in chexpert rsna covidx mura; do
    if [ "$(cat "$data/eval/$dataset/.complete" 2>/dev/null)" != "$synth_version" ]; then
      echo "== synthesising $dataset into $data/eval/$dataset"
      rm -rf "$data/eval/$dataset"
      "$bin" synth "$dataset" --out "$data/eval/$dataset" && echo "$synth_version" >"$data/eval/$dataset/.complete"
    fi
  done
  # Fine-tuning's short protocol ends its runs at the 10-epoch cap by design, and each line counts them
  # ("2 at the cap"): convirt's warning about the cap (on stdout), one per cell, is left out there.
  cap_warnings() {
    if [ "$1" = finetune ] && [ "$full" != 1 ]; then
      grep -v -E '^warning: [0-9]+ of [0-9]+ run\(s\) of .* ended at the [0-9]+-epoch cap before' || true
    else
      cat
    fi
  }
  # Table 1's cells of one dataset for `eval PROTOCOL`: 1%, 10% and all of the training labels (COVIDx:
  # 10% and all, as the paper), the pretrained encoder and a random-init one; one line per evaluation (2
  # ranks): the mean and spread, the epochs, and how many runs the epoch cap (not the plateau) ended
  # (convirt warns of them, except in the short fine-tuning). The tables follow, beside the paper's.
  table1_cells() {
    local protocol=$1 dataset=$2 fraction init fractions="0.01 0.1 1"
    shift 2
    if [ "$dataset" = covidx ]; then fractions="0.1 1"; fi
    for fraction in $fractions; do
      for init in convirt random; do
        printf '== '
        # The pipeline fails where mpirun does (pipefail).
        mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" eval "$protocol" --dataset "$dataset" --root "$data/eval/$dataset" \
          --checkpoint "$run" --init "$init" --fraction "$fraction" "$@" --out "$run/eval/$protocol-$dataset-$init-$fraction.json" --quiet \
          | cap_warnings "$protocol"
      done
    done
  }
  linear_start=$SECONDS
  for dataset in chexpert rsna covidx mura; do
    # The demo encoder's 128 features are not ResNet-50's 2048: at the paper's rate (1e-4) its linear
    # heads had not converged when the 100-epoch cap ended every run, so the demo evaluates both
    # encoders at 1e-3 (the paper's COVIDx rate) with a cap of 300 epochs, where the plateau ends them.
    # The synthetic training sets are small (a 1% split is a batch or less), so an epoch is at least
    # 20 classifier steps: the validation checks and the patience then measure learning, not one step;
    # and the epoch kept is the one with the best validation AUC/accuracy (on 48 images the loss is
    # often lowest before the classifier ranks anything).
    table1_cells linear "$dataset" --lr 1e-3 --max-epochs 300 --min-epoch-steps 20 --keep-best metric
    # Zero-shot from the prompts convirt ships (CheXzero's protocol: no labels at all).
    printf '== zero-shot (default prompts, no labels): ' 
    mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" eval zeroshot --dataset "$dataset" --root "$data/eval/$dataset" \
      --checkpoint "$run" --out "$run/eval/zeroshot-$dataset.json" --quiet
  done
  printf '== CheXpert 8x200 retrieval (2 ranks): '
  mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" eval retrieval --checkpoint "$run" --root "$data/eval/chexpert" \
    --queries "$data/eval/chexpert/chexpert_8x200" --out "$run/eval/retrieval.json" --quiet
  linear_seconds=$((SECONDS - linear_start))
  # Table 1's second half: the whole network fine-tuned (the classifier alone first, 200 steps), for
  # both encoders at the same fractions, on the paper's fine-tuning protocol (its rates and batch).
  echo "== fine-tuning: $finetune_note"
  finetune_start=$SECONDS
  for dataset in chexpert rsna covidx mura; do
    table1_cells finetune "$dataset" "${finetune_protocol[@]}"
  done
  finetune_seconds=$((SECONDS - finetune_start))
  echo "== results beside the paper's (Table 1: linear evaluation and fine-tuning, AUC or accuracy in %; Table 2: retrieval precision@k in %)"
  "$bin" report "$run"
  echo
  echo "Results in $run:"
  echo "  report.html              the report: curves, throughput, these tables, epochs and stop reasons, retrieval examples"
  echo "  eval/*.json              linear evaluation and fine-tuning (ConVIRT and random init, 1%, 10% and all labels),"
  echo "                           zero-shot and retrieval, one file each"
  echo "  tensorboard/             TensorBoard event files: every metrics.jsonl scalar and the evaluations (tensorboard --logdir $run)"
  echo "  heldout_retrieval.json   image-to-text precision@10 on held-out studies, with chance and best possible"
  echo "  metrics.jsonl            one JSON object per step;  config.json: the resolved configuration"
  echo "  checkpoints/             sharded checkpoints; rerunning ./launch.sh continues from the latest"
  echo "Time: $((SECONDS - start)) s in all; pretraining ${pretraining_seconds} s, linear evaluation, zero-shot and retrieval" \
    "${linear_seconds} s, fine-tuning ${finetune_seconds} s ($finetune_note)"
  exit 0
fi

# Training always continues from the run directory's latest complete checkpoint, if it has one.
if [ "${args[0]:-}" = "train" ] && ! printf '%s\n' "${args[@]}" | grep -qx -- "--resume"; then args+=(--resume); fi
# The job, with SIGUSR1 (checkpoint and stop) passed on to mpirun, which passes it to every rank.
run_job() {
  mpirun --oversubscribe "${mpi_flags[@]}" "${mpirun_args[@]}" "$bin" "${args[@]}" &
  local job=$!
  trap 'kill -USR1 "$job" 2>/dev/null' USR1
  while :; do
    wait "$job"; status=$?
    # A wait cut short by the trap returns above 128 while the job goes on.
    if [ "$status" -gt 128 ] && kill -0 "$job" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1
  return "$status"
}
attempt=0
until run_job; do
  attempt=$((attempt + 1))
  if [ "$status" -eq 75 ]; then
    echo "launch.sh: the job stopped on request (SIGUSR1) after writing a checkpoint; the same command resumes it" >&2
    exit "$status"
  fi
  if [ "$status" -gt 128 ]; then echo "launch.sh: a rank was killed by signal $((status - 128)) (status $status)" >&2; fi
  if [ "$attempt" -gt "$max_restarts" ]; then exit "$status"; fi
  echo "launch.sh: the job failed (status $status); restart $attempt of $max_restarts from the latest checkpoint" >&2
done
