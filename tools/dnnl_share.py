#!/usr/bin/env python3
"""How much of convirt's step runs inside oneDNN's primitives: runs `convirt bench step` with
ONEDNN_VERBOSE=1, sums the execution times oneDNN reports per primitive kind, and sets them against
the step time the same run prints.

    python3 tools/dnnl_share.py --precision bf16 --batch 8 --threads 2
    python3 tools/dnnl_share.py --precision fp32 --convirt .build/release/convirt

The step time printed by `bench step` includes the logging itself, so the share is a lower bound.
The passes are counted by the stem convolution's forward calls (one per image forward: the warm-up
step and each timed step).
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
    args = parser.parse_args()
    env = dict(os.environ, ONEDNN_VERBOSE="1", OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    command = [args.convirt, "bench", "step", "--preset", args.preset, "--batch", str(args.batch), "--threads", str(args.threads),
               "--steps", str(args.steps), "--precision", args.precision]
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
            milliseconds[kind] += float(fields[-1])
            calls[kind] += 1
        match = re.search(r"forward\+backward ([0-9.]+) s per step", line)
        if match:
            step = float(match.group(1))
    if not passes or step is None:
        sys.exit("no stem convolution or step time in the output of " + " ".join(command))
    inside = sum(milliseconds.values()) / passes / 1000
    print(f"{' '.join(command[1:])}: {passes} passes, step {step:.3f} s")
    for kind, ms in milliseconds.most_common():
        print(f"  {kind:28s} {ms / passes / 1000:7.3f} s per step  ({calls[kind] // passes} calls)")
    print(f"inside oneDNN {inside:.3f} s of {step:.3f} s per step: {100 * inside / step:.0f}%; outside {step - inside:.3f} s")


if __name__ == "__main__":
    main()
