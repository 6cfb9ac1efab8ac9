#!/usr/bin/env bash
# ./launch.sh                      set up and run the main job on embedded defaults
# ./launch.sh -np N [--hostfile F] [mpirun options] -- SUBCOMMAND [convirt options]
#                                  run `convirt SUBCOMMAND ...` on N ranks under mpirun
#
# Until pretraining lands (issue 5), the main job is the numerics core's job: build in release, check
# the MPI job on 2 ranks, and benchmark the kernels at ResNet-50 and BERT-base shapes.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
swift build -c release 2>&1 | grep -vE '^\[[0-9]+/[0-9]+\]' || true
bin="$(swift build -c release --show-bin-path)/convirt"
[ -x "$bin" ] || { echo "launch.sh: the release build failed (no $bin)" >&2; exit 1; }

mpi_flags=(--bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  # Open MPI refuses root unless told; these two variables say so for mpirun and every rank.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Single-node runs use shared memory and loopback only (no probing of other interfaces).
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader,tcp}" OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-lo}"

if [ $# -eq 0 ]; then
  export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
  echo "== MPI job check: 2 ranks"
  mpirun --oversubscribe "${mpi_flags[@]}" -np 2 "$bin" info
  echo "== kernel benchmark (1 thread)"
  "$bin" bench kernels
  echo "Figures above: GFLOP/s of each kernel and its ratio to plain sgemm on the same product."
  exit 0
fi

mpirun_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpirun_args+=("$1"); shift; done
[ "${1:-}" = "--" ] || { echo "usage: ./launch.sh -np N [--hostfile F] [mpirun options] -- SUBCOMMAND [options]" >&2; exit 2; }
shift
exec mpirun --oversubscribe "${mpi_flags[@]}" "${mpirun_args[@]}" "$bin" "$@"
