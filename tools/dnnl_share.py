#!/usr/bin/env python3
"""How much of convirt's step runs inside oneDNN's primitives: runs `convirt bench step` with
ONEDNN_VERBOSE=1, sums the execution times oneDNN reports per primitive kind, and sets them against
the step time the same run prints.

    python3 tools/dnnl_share.py --precision bf16 --batch 8 --threads 2
    python3 tools/dnnl_share.py --precision fp32 --convirt .build/release/convirt

The step time printed by `bench step` includes the logging itself, and each primitive's time the
wait for its stream; the two err in opposite directions (on an AMD EPYC Zen 4 the trace's share came
within 1-4 points of the CPU samples' of --perf), so the trace is a rough guide. The passes are counted by the stem convolution's
forward calls (one per image forward: the warm-up step and each timed step); the warm-up's are left out
(the work a step does before its stem, weights' reorders, then counts from the second timed step on).

With --perf (Linux perf on the PATH), the share comes from CPU samples instead: `perf record` over the
timed steps only (from --delay seconds, past the set-up and the warm-up step), each sample counted by
the code it fell in: oneDNN's generated kernels ([JIT]) and libdnnl, libgomp's waiting threads, our
own passes (the convirt binary), the kernel and the rest. Our hottest functions are listed.

    python3 tools/dnnl_share.py --perf --precision bf16 --batch 8 --threads 2 --steps 8 --delay 8
"""
import argparse
import collections
import os
import re
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convirt", default=".build/release/convirt")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--perf", action="store_true", help="CPU samples by perf instead of oneDNN's verbose trace")
    parser.add_argument("--delay", type=float, default=8, help="with --perf: seconds before sampling starts")
    args = parser.parse_args()
    if args.perf:
        return sampled(args)
    env = dict(os.environ, ONEDNN_VERBOSE="1", OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    command = step_command(args)
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-2000:]}")
    milliseconds = collections.Counter()
    calls = collections.Counter()
    passes = 0
    step = None
    for line in run.stdout.splitlines():
        if line.startswith("onednn_verbose,") and ",exec," in line:
            fields = line.split(",")
            kind = fields[3]
            if kind == "convolution":
                kind += " " + fields[5].replace("_training", "")
                if fields[5] == "forward_training" and "_ic3oc" in line:
                    passes += 1
            # The warm-up step (up to the second pass's stem) is not timed: its first touches of memory
            # make its primitives several times slower.
            if passes >= 2:
                milliseconds[kind] += float(fields[-1])
                calls[kind] += 1
        match = re.search(r"forward\+backward ([0-9.]+) s per step", line)
        if match:
            step = float(match.group(1))
    if passes < 2 or step is None:
        sys.exit("no timed pass or step time in the output of " + " ".join(command))
    passes -= 1
    inside = sum(milliseconds.values()) / passes / 1000
    print(f"{' '.join(command[1:])}: {passes} timed passes, step {step:.3f} s")
    for kind, ms in milliseconds.most_common():
        print(f"  {kind:28s} {ms / passes / 1000:7.3f} s per step  ({calls[kind] // passes} calls)")
    print(f"inside oneDNN {inside:.3f} s of {step:.3f} s per step: {100 * inside / step:.0f}%; outside {step - inside:.3f} s")


def step_command(args):
    return [args.convirt, "bench", "step", "--preset", args.preset, "--batch", str(args.batch), "--threads", str(args.threads),
            "--steps", str(args.steps), "--precision", args.precision]


def sampled(args):
    """The step's CPU samples by where they fell (perf record from --delay seconds on)."""
    import tempfile
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    command = step_command(args)
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "perf.data")
        run = subprocess.run(["perf", "record", "-q", "-F", "999", "-D", str(int(args.delay * 1000)), "-o", data] + command,
                             env=env, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"perf record {' '.join(command)} failed:\n{run.stderr[-2000:]}")
        step = re.search(r"forward\+backward ([0-9.]+) s per step", run.stdout)
        def report(sort):
            return subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", sort, "--stdio", "-g", "none"],
                                  capture_output=True, text=True).stdout.splitlines()
        by_library, by_function = report("dso"), report("dso,sym")
    share = collections.Counter()
    ours = collections.Counter()
    binary = os.path.basename(args.convirt)
    for line in by_library:
        match = re.match(r"\s*([0-9.]+)%\s+(\S+)", line)
        if not match:
            continue
        percent, dso = float(match.group(1)), match.group(2)
        if dso == "[JIT]" or dso.startswith("libdnnl"):
            share["oneDNN (generated kernels and libdnnl)"] += percent
        elif dso.startswith("libgomp"):
            share["OpenMP threads waiting (libgomp)"] += percent
        elif dso == binary:
            share["our passes (convirt)"] += percent
        elif dso == "[kernel.kallsyms]":
            share["the kernel"] += percent
        else:
            share[f"other ({dso})"] += percent
    for line in by_function:
        match = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if match and match.group(2) == binary:
            ours[match.group(3).strip()] += float(match.group(1))
    print(f"{' '.join(command[1:])}: CPU samples of the timed steps" + (f", step {step.group(1)} s" if step else ""))
    for what, percent in share.most_common():
        print(f"  {what:42s} {percent:5.1f}%")
    print("our hottest functions:")
    for symbol, percent in ours.most_common(12):
        print(f"  {percent:5.2f}%  {symbol[:100]}")


if __name__ == "__main__":
    main()
