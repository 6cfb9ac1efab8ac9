#!/bin/bash
# The bf16 checks that need a CPU with AVX-512 / AMX (issue 12), as one short script for a lent machine:
# which kernels oneDNN picks, oneDNN's own rates from C, ours, the bf16 kernel and parity tests on oneDNN's
# native bf16 (they run the emulation on CPUs without it), the ResNet's activation layout oneDNN picks
# (NHWC expected on AMX) against the other one, and the paper step in both precisions beside PyTorch at 2,
# 8 and 16 threads. Writes everything to ${OUT:-/tmp/bf16-check}.
#
#     tools/device_bf16_check.sh            # after `swift build -c release --build-tests`
set -u
out=${OUT:-/tmp/bf16-check}
mkdir -p "$out"
bin=.build/release/convirt
export OPENBLAS_NUM_THREADS=1
{
    lscpu | grep -E "Model name|^CPU\(s\)"
    lscpu | grep -o -E "avx512[a-z_0-9]*|amx[a-z_0-9]*" | sort -u | tr '\n' ' '; echo
    $bin info
} > "$out/machine.txt" 2>&1
cc -O2 tools/bench_dnnl.c -ldnnl -o /tmp/bench_dnnl && for t in 2 8 16; do OMP_NUM_THREADS=$t /tmp/bench_dnnl; done > "$out/bench_dnnl.txt" 2>&1
OMP_NUM_THREADS=2 BENCH_LAYOUT=nhwc /tmp/bench_dnnl > "$out/bench_dnnl_nhwc.txt" 2>&1
for t in 2 16; do $bin bench kernels --batch 8 --threads $t; done > "$out/bench_kernels.txt" 2>&1
swift test -c release --disable-testable-imports --skip-build \
    --filter "BF16KernelTests|DNNLConvolutionTests|ModelParityTests|PrecisionCLITests|ChannelsLastTests|parityOnOneDNN" > "$out/tests.txt" 2>&1
for layout in "" nchw nhwc; do
    CONVIRT_ACTIVATIONS=$layout $bin bench step --steps 2 --threads 2 --precision bf16
done > "$out/layouts.txt" 2>&1
for t in 2 8 16; do
    python3 tools/bench_step.py --precision both --batch 8 --tokens 128 --threads $t --steps 2 --convirt $bin
done > "$out/bench_step.txt" 2>&1
for p in fp32 bf16; do /usr/bin/time -f "$p peak %M KB" $bin bench step --preset paper --batch 32 --steps 1 --threads 16 --precision $p; done \
    > "$out/memory.txt" 2>&1
tail -n 3 "$out"/*.txt
