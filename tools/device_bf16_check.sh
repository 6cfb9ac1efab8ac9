#!/bin/bash
# The bf16 checks that need a CPU most machines lack (AMX above all), as one script a
# machine runs in one go: which kernels oneDNN picks, the bf16 tests (gradient pieces, layouts against
# exact arithmetic, parity against autocast judged by fp32, the world-size, accumulation and resume
# tests on every backend the CPU runs), the world-size table of the tiny preset (step-1 gradient norms
# and per-step losses on -np 1, 2, 4 and --zero1, per backend, and a resume from 2 ranks onto 1), the
# cost of gradient pieces in the paper step, oneDNN's own rates, and the paper step beside PyTorch at
# 2, 8 and 16 threads, and the passes between the products, ours against oneDNN's primitives
# (tools/bench_passes.c). Writes everything to ${OUT:-/tmp/bf16-check}; the summary is the last lines.
#
# Also: the share of the paper step inside oneDNN's primitives (tools/dnnl_share.py), convirt's step at
# 1, 2, 8 and 16 threads, a real `train --preset paper` run on 1 rank x 2 threads against 2 ranks x
# 1 thread (gradients through shared memory and, with --zero1, by MPI's collectives), 1 x 16 and 4 x 4
# (pairs/s and time breakdown from metrics.jsonl), `bench exchange` on 2, 4 and 16 ranks, and the paper
# preset's real step at its batch of 32 with BERT's rows packed and padded (tools/train_throughput.py).
#
#     scripts/install-deps.sh && swift build -c release --build-tests && tools/device_bf16_check.sh
#
# On a machine without network, bring .deps/onednn (54 MB, scripts/install-onednn.sh) along with the tree.
#     WORLD_ONLY=1 tools/device_bf16_check.sh     # the world-size table alone (a minute)
#
# PARTS picks the parts to run (all by default), for a machine lent for minutes, in calls of at most ten:
#     PARTS="passes share step" tools/device_bf16_check.sh
# The parts: world (the world-size table), pieces, dnnl (oneDNN's rates), passes (tools/bench_passes.c),
# kernels, tests, layouts, step (beside PyTorch at 2, 8 and 16 threads), memory, share, threads, ranks, exchange, text.
set -u
parts=" ${PARTS:-all} "
[ -n "${WORLD_ONLY:-}" ] && parts=" world "
want() { [[ "$parts" == *" all "* || "$parts" == *" $1 "* ]]; }
out=${OUT:-/tmp/bf16-check}
mkdir -p "$out"
bin=$PWD/.build/release/convirt
export OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader
{
    lscpu | grep -E "Model name|^CPU\(s\)"
    lscpu | grep -o -E "avx512[a-z_0-9]*|amx[a-z_0-9]*" | sort -u | tr '\n' ' '; echo
    $bin info
} > "$out/machine.txt" 2>&1

# The world-size table: tiny preset, 20 steps, bf16 on each backend this CPU runs.
if want world; then
work=$(mktemp -d)
$bin synth mimic --out "$work/mimic" --studies 120 --image-size 64 --seed 2 > /dev/null
$bin prepare mimic --root "$work/mimic" --out "$work/prepared" > /dev/null
# oneDNN's bf16 kernels where it runs them (forced where the default is the emulation), the emulation,
# and the blocked emulation (weight gradients summed in length-dependent blocks rounded to bf16).
backends="emulate blocked"
CONVIRT_BF16=native $bin info 2>/dev/null | grep -q "bf16 products on oneDNN" && backends="native $backends"
train() {  # train NAME BACKEND NP [flags...]
    local name=$1 backend=$2 np=$3; shift 3
    rm -rf "$work/$name"
    CONVIRT_BF16=$backend mpirun --oversubscribe -np "$np" "$bin" train --data "$work/prepared" --run-dir "$work/$name" --preset tiny \
        --steps 20 --retrieval-eval 0 --precision bf16 "$@" > "$work/$name.log" 2>&1 || tail -3 "$work/$name.log"
}
for b in $backends; do
    train "$b-1" "$b" 1; train "$b-2" "$b" 2; train "$b-4" "$b" 4; train "$b-z2" "$b" 2 --zero1
    train "$b-old1" "$b" 1 --gradient-piece 8; train "$b-old2" "$b" 2 --gradient-piece 4; train "$b-old4" "$b" 4 --gradient-piece 2
    rm -rf "$work/$b-r1"
    CONVIRT_BF16=$b mpirun --oversubscribe -np 2 "$bin" train --data "$work/prepared" --run-dir "$work/$b-r1" --preset tiny --steps 10 \
        --checkpoint-every 10 --retrieval-eval 0 --precision bf16 > /dev/null 2>&1
    CONVIRT_BF16=$b mpirun --oversubscribe -np 1 "$bin" train --data "$work/prepared" --run-dir "$work/$b-r1" --preset tiny --steps 20 \
        --retrieval-eval 0 --precision bf16 --resume > /dev/null 2>&1
done
python3 - "$work" $backends > "$out/world_size.txt" <<'EOF'
import json, sys
work, backends = sys.argv[1], sys.argv[2:]
def rows(name):
    try: return [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    except OSError: return []
print("backend, runs: step-1 gradient norm (relative to -np 1), largest loss difference over steps 1-8 and 9-20, first step that parts past 1e-4")
for b in backends:
    base = rows(f"{b}-1")
    for other, ref in [("2", "1"), ("4", "1"), ("z2", "1"), ("old2", "old1"), ("old4", "old1"), ("r1", "2")]:
        a, o = rows(f"{b}-{ref}"), rows(f"{b}-{other}")
        if not a or not o: print(f"{b} {other}: missing"); continue
        if other == "r1": a, o = a[10:], o[10:]
        g = abs(a[0]["grad_norm"] - o[0]["grad_norm"]) / a[0]["grad_norm"]
        d = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, o)]
        first = next((i + 1 for i, v in enumerate(d) if v > 1e-4), None)
        print(f"{b} {other} vs {ref}: step-1 grad norm {g:.1e}, losses {max(d[:8]):.1e} / {max(d[8:] or [0]):.1e}, parts at {first}")
EOF
rm -rf "$work"
fi

# The cost of gradient pieces in the paper step (bf16, batch 8 and 32), alternated.
want pieces && for batch in 8 32; do for round in 1 2; do for p in 1 2 4 $batch; do
    echo "batch $batch pieces $p: $($bin bench step --steps 3 --threads 2 --precision bf16 --batch $batch --gradient-piece $p | tail -1)"
done; done; done > "$out/pieces.txt" 2>&1

if want dnnl; then
cc -O2 -I.deps/onednn/include tools/bench_dnnl.c .deps/onednn/lib/libdnnl.so.3 -Wl,-rpath,$PWD/.deps/onednn/lib -o /tmp/bench_dnnl && for t in 2 8 16; do OMP_NUM_THREADS=$t /tmp/bench_dnnl; done > "$out/bench_dnnl.txt" 2>&1
OMP_NUM_THREADS=2 BENCH_LAYOUT=nhwc /tmp/bench_dnnl > "$out/bench_dnnl_nhwc.txt" 2>&1
fi
want passes && clang -O3 -ffp-contract=off -I.deps/onednn/include -ISources/CKernels/include tools/bench_passes.c Sources/CKernels/kernels.c \
    .deps/onednn/lib/libdnnl.so.3 -Wl,-rpath,$PWD/.deps/onednn/lib -lm -o /tmp/bench_passes && { OMP_NUM_THREADS=1 /tmp/bench_passes; OMP_NUM_THREADS=1 /tmp/bench_passes --cold; OMP_NUM_THREADS=1 /tmp/bench_passes --cold --integer-bf16; } > "$out/bench_passes.txt" 2>&1
want kernels && for t in 2 16; do $bin bench kernels --batch 8 --threads $t; done > "$out/bench_kernels.txt" 2>&1
want tests && swift test -c release --disable-testable-imports --skip-build \
    --filter "BF16KernelTests|BF16OperandTests|frozenWeightCopies|DNNLConvolutionTests|GradientPiecesTests|ModelParityTests|PrecisionCLITests|ChannelsLastTests|ResNetLayoutTests|parityOnOneDNN" \
    > "$out/tests.txt" 2>&1
want layouts && for layout in "" nchw nhwc nchw16c; do
    echo "CONVIRT_ACTIVATIONS=$layout"; CONVIRT_ACTIVATIONS=$layout $bin bench step --steps 2 --threads 2 --precision bf16
done > "$out/layouts.txt" 2>&1
want step && for t in 2 8 16; do
    python3 tools/bench_step.py --precision both --batch 8 --tokens 128 --threads $t --steps 2 --convirt "$bin"
done > "$out/bench_step.txt" 2>&1
want memory && for p in fp32 bf16; do /usr/bin/time -f "$p peak %M KB" $bin bench step --preset paper --batch 32 --steps 1 --threads 16 --precision $p; done \
    > "$out/memory.txt" 2>&1
want share && for t in 2 16; do for p in bf16 fp32; do
    python3 tools/dnnl_share.py --convirt "$bin" --precision $p --batch 8 --threads $t
    if command -v perf > /dev/null; then python3 tools/dnnl_share.py --perf --convirt "$bin" --precision $p --batch 8 --threads $t --steps 8; fi
done; done > "$out/dnnl_share.txt" 2>&1
want threads && for t in 1 2 8 16; do echo "threads $t: $($bin bench step --steps 2 --threads $t --precision bf16 | tail -1)"; done > "$out/threads.txt" 2>&1
# A real paper-preset run: 1 rank x 2 threads against 2 ranks x 1 thread, global batch 8, bf16.
if want ranks || want exchange || want text; then
work=$(mktemp -d)
$bin synth mimic --out "$work/mimic" --studies 200 --image-size 256 --seed 3 > /dev/null
$bin prepare mimic --root "$work/mimic" --out "$work/prepared" > /dev/null
want ranks && for layout in "1 2" "2 1" "2 1 --zero1" "2 1 --zero1 --gradient-exchange collectives" "1 16" "4 4 --zero1"; do
    set -- $layout
    mpirun --oversubscribe --bind-to none -np $1 "$bin" train --data "$work/prepared" --run-dir "$work/run-$1x$2" --preset paper --global-batch 8 --steps 12 \
        --retrieval-eval 0 --precision bf16 --threads $2 "${@:3}" --overwrite > "$work/run-$1x$2.log" 2>&1 || tail -3 "$work/run-$1x$2.log"
    python3 - "$work/run-$1x$2/metrics.jsonl" "$1 rank(s) x $2 thread(s) ${*:3}" <<'EOF'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"pairs_per_s"' in l][2:]
keys = sorted(k for k in rows[0] if k.startswith("time_"))
print(sys.argv[2], "pairs/s median", round(statistics.median(r["pairs_per_s"] for r in rows), 2),
      " ".join(f"{k[5:]} {statistics.median(r[k] for r in rows):.3f}" for k in keys))
EOF
done > "$out/ranks.txt" 2>&1
# The gradient sums alone: shared memory against MPI's collectives, 2, 4 and 16 ranks of the paper preset.
want exchange && for np in 2 4 16; do mpirun --oversubscribe --bind-to none -np $np "$bin" bench exchange --preset paper --steps 5; done > "$out/exchange.txt" 2>&1
# The paper preset's real step (batch 32, 2 threads) with BERT's per-token layers on the valid tokens, and on every padded position.
want text && python3 tools/train_throughput.py --data "$work/prepared" --convirt "$bin" --variant packed --variant padded:CONVIRT_TEXT_ROWS=padded \
    --rounds 2 --steps 24 > "$out/text_rows.txt" 2>&1
rm -rf "$work"
fi
[ -f "$out/tests.txt" ] && grep -E "✘|Test run" "$out/tests.txt" | tail -n 15
for f in world_size pieces bench_passes dnnl_share threads ranks exchange text_rows machine; do
    [ -f "$out/$f.txt" ] && { echo "==> $out/$f.txt <=="; tail -n 45 "$out/$f.txt"; }
done
