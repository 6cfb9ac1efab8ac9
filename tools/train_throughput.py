#!/usr/bin/env python3
"""A real training run's throughput and where its step goes, for one or more variants side by side:

    python3 tools/train_throughput.py --data data/prepared [--convirt BIN] [--variant LABEL[:VAR=VALUE,...]]...
        [--rounds 2] [--steps 45] [--preset paper] [--precision bf16] [--threads 2]

    python3 tools/train_throughput.py --data data/prepared --variant packed --variant padded:CONVIRT_TEXT_ROWS=padded
    python3 tools/train_throughput.py --data data/prepared --variant 1x2 --variant 2x1:RANKS=2,THREADS=1

Runs `convirt train --data DATA --preset P --steps N --precision X --threads T --retrieval-eval 0` once per
variant per round, alternating them (A B A B ...), each with its environment variables and into a fresh
run directory under /tmp, and prints the medians over the steps past the first third (the warm-up: first
passes, primitives made for new shapes) of metrics.jsonl's pairs/s, forward, backward, gradient exchange
and optimizer seconds, and the achieved TFLOP/s per rank. A variant may name another build instead
(LABEL:BINARY=/path/to/convirt), or another layout of ranks and threads (LABEL:RANKS=2,THREADS=1: under
`mpirun --oversubscribe -np 2`; pairs/s is then the job's). The data is what `convirt prepare` writes, e.g. from `convirt synth mimic
--studies 2000`: its report sentences, sampled and padded to each batch's longest, are what the text
encoder sees. The machine should be otherwise idle; compare variants only within one invocation.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def variant(spec, default_binary, default_threads):
    """(label, binary, ranks, threads, environment) of "LABEL[:VAR=VALUE,...]"."""
    label, _, settings = spec.partition(":")
    binary, ranks, threads, environment = default_binary, 1, default_threads, {}
    for setting in filter(None, settings.split(",")):
        name, _, value = setting.partition("=")
        if name == "BINARY":
            binary = value
        elif name in ("RANKS", "THREADS"):
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"--variant {spec}: {name} takes a positive whole number, not {value!r}")
            ranks, threads = (int(value), threads) if name == "RANKS" else (ranks, int(value))
        else:
            environment[name] = value
    return label, binary, ranks, threads, environment


def run(binary, ranks, threads, environment, args, steps):
    directory = tempfile.mkdtemp(prefix="convirt-throughput-")
    command = [binary, "train", "--data", args.data, "--preset", args.preset, "--steps", str(steps), "--precision", args.precision,
               "--threads", str(threads), "--retrieval-eval", "0", "--run-dir", os.path.join(directory, "run")]
    if ranks > 1:
        command = ["mpirun", "--oversubscribe", "-np", str(ranks)] + command
        environment = dict(environment, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run(command, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", **environment), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(os.path.join(directory, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "time_forward_s" in r]
    return rows[len(rows) // 3:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--convirt", default=".build/release/convirt")
    parser.add_argument("--variant", action="append", help="LABEL[:VAR=VALUE,...] (repeat to compare; default: one, as set)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants = [variant(spec, args.convirt, args.threads) for spec in args.variant or ["default"]]
    keys = [("pairs/s", "pairs_per_s"), ("forward s", "time_forward_s"), ("backward s", "time_backward_s"),
            ("exchange s", "time_comm_s"), ("optimizer s", "time_optimizer_s"), ("TFLOP/s per rank", "tflops_per_rank")]
    print(f"convirt train --preset {args.preset} --precision {args.precision} --threads {args.threads} --steps {args.steps} "
          f"(ranks and threads as a variant sets them): "
          f"medians of steps {args.steps // 3 + 1}-{args.steps}")
    print("| variant, round | " + " | ".join(name for name, _ in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for round in range(args.rounds):
        for label, binary, ranks, threads, environment in variants:
            rows = run(binary, ranks, threads, environment, args, args.steps)
            cells = [statistics.median(r.get(key, 0) for r in rows) for _, key in keys]
            print(f"| {label}, {round + 1} | " + " | ".join(f"{c:.3f}" if c < 10 else f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
