#!/usr/bin/env python3
"""Regenerates the benchmark figures on this machine, from the current release build:

    python3 tools/readme_benchmarks.py [--convirt .build/release/convirt] [--pairs 3] [--dry]
    python3 tools/readme_benchmarks.py --render     (rewrite both blocks from docs/benchmarks.json, no measuring)

1. the paper step (ResNet-50 at 224, BERT-base at 128 tokens, 6 layers frozen) side by side with
   PyTorch's on the same threads: `tools/bench_step.py --precision both --batch 8 --parts --convirt BIN`
   run --pairs times (each run times PyTorch, then convirt, in the same minute), then once at batch 32;
2. the peak memory of `convirt bench step --batch 32 --steps 1` in each precision (`/usr/bin/time -f %M`);
3. `convirt bench kernels`, `bench data` and `bench checkpoint --preset paper`, as they print;
4. keeps the measurements in docs/benchmarks.json, and rewrites the block between
   "<!-- bench-figures:begin -->" and "<!-- bench-figures:end -->" in docs/BENCHMARKS.md and the speed
   table between "<!-- speed:begin -->" and "<!-- speed:end -->" in README.md, naming the CPU (lscpu's
   model name and its AVX-512/AMX flags) and the kernels used.

Needs PyTorch (pip install torch torchvision); the machine should be otherwise idle.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readme_block import cpu_line, replace_block  # noqa: E402

THREADS = 2


def run(cmd, env=None):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def side_by_side(binary, batch, steps):
    """{precision: (convirt s/step, PyTorch s/step, convirt parts, PyTorch parts)} from one bench_step.py run."""
    out = run([sys.executable, "tools/bench_step.py", "--precision", "both", "--batch", str(batch), "--threads", str(THREADS),
               "--steps", str(steps), "--parts", "--convirt", binary])
    result = {}
    # bench_step.py prints, per precision: PyTorch's parts, its step, then convirt's output (parts and step).
    for precision, chunk in zip(["fp32", "bf16"], re.split(r"\n(?=PyTorch image forward)", out.strip())):
        parts = [[float(x) for x in m] for m in re.findall(
            r"image forward ([0-9.]+) s, text forward ([0-9.]+) s, image backward ([0-9.]+) s, text backward ([0-9.]+) s", chunk)]
        torch_step = float(re.search(r"PyTorch \S+ .*?forward\+backward ([0-9.]+) s per step", chunk).group(1))
        ours = float(re.search(r"\nforward\+backward ([0-9.]+) s per step", chunk).group(1))
        result[precision] = (ours, torch_step, parts[1], parts[0])
    return result, re.search(r"PyTorch (\d\S*) ", out).group(1)


def peak_memory_gb(binary, precision):
    out = subprocess.run(["/usr/bin/time", "-f", "%M", binary, "bench", "step", "--preset", "paper", "--batch", "32", "--steps", "1",
                          "--threads", str(THREADS), "--precision", precision], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench step --batch 32 failed:\n{out.stderr}")
    return int(out.stderr.strip().splitlines()[-1]) * 1024 / 1e9


def measure(binary, pairs):
    """Every figure, as docs/benchmarks.json keeps them."""
    cpu = cpu_line(run([binary, "info"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--", "Sources", "Package.swift"], capture_output=True, text=True).stdout.strip():
        commit += " with uncommitted changes"
    runs = []
    for _ in range(pairs):
        r, torch_version = side_by_side(binary, 8, 3)
        runs.append(r)
    big, _ = side_by_side(binary, 32, 2)
    return {
        "cpu": cpu, "commit": commit, "threads": THREADS, "torch": torch_version, "runs": runs, "batch32": big,
        "memory_gb": {p: peak_memory_gb(binary, p) for p in ["fp32", "bf16"]},
        "kernels": run([binary, "bench", "kernels", "--batch", "8", "--threads", str(THREADS)]).strip(),
        "data": run([binary, "bench", "data"]).strip(),
        "checkpoint": run([binary, "bench", "checkpoint", "--preset", "paper"]).strip(),
    }


def speed_table(m):
    """The README's table: the paper step against PyTorch's, medians of the batch-8 runs and batch 32."""
    lines = [
        f"The paper step (ResNet-50 at 224 px and BERT-base at 128 tokens, forward and backward), {m['threads']} threads, on {m['cpu']};",
        f"PyTorch {m['torch']} on the same machine, alternated (`python3 tools/readme_benchmarks.py`; method and every figure in",
        "[docs/BENCHMARKS.md](docs/BENCHMARKS.md)):",
        "",
        "| precision | batch | convirt s/step | PyTorch s/step | convirt's speed-up |",
        "|---|---|---|---|---|",
    ]
    for precision, torch_mode in [("fp32", "fp32"), ("bf16", "autocast bf16 + channels_last")]:
        ours = statistics.median(r[precision][0] for r in m["runs"])
        theirs = statistics.median(r[precision][1] for r in m["runs"])
        ratio = statistics.median(r[precision][1] / r[precision][0] for r in m["runs"])
        lines.append(f"| {precision} | 8 | {ours:.2f} | {theirs:.2f} ({torch_mode}) | {ratio:.2f}x (median of {len(m['runs'])}) |")
        o, t = m["batch32"][precision][0], m["batch32"][precision][1]
        lines.append(f"| {precision} | 32 | {o:.2f} | {t:.2f} | {t / o:.2f}x |")
    lines.append("")
    lines.append(f"Peak memory at batch 32: fp32 {m['memory_gb']['fp32']:.2f} GB, bf16 {m['memory_gb']['bf16']:.2f} GB.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convirt", default=".build/release/convirt")
    ap.add_argument("--pairs", type=int, default=3, help="side-by-side runs at batch 8")
    ap.add_argument("--dry", action="store_true", help="print the blocks instead of writing them")
    ap.add_argument("--render", action="store_true", help="rewrite the blocks from docs/benchmarks.json without measuring")
    args = ap.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args.render:
        m = json.load(open("docs/benchmarks.json"))
    else:
        m = measure(args.convirt, args.pairs)
        if not args.dry:
            json.dump(m, open("docs/benchmarks.json", "w"), indent=1)
    cpu, commit, torch_version, runs, big, memory = m["cpu"], m["commit"], m["torch"], m["runs"], m["batch32"], m["memory_gb"]
    kernels, data, checkpoint = m["kernels"], m["data"], m["checkpoint"]
    pairs = len(runs)

    fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    lines = [
        f"Measured by `python3 tools/readme_benchmarks.py` on {cpu}, a release build, {THREADS} threads,",
        f"PyTorch {torch_version} for the side-by-side figures.",
        "",
        f"The paper step (forward and backward of ResNet-50 at 224 px and BERT-base at 128 tokens with the embeddings",
        f"and 6 layers frozen), `python3 tools/bench_step.py --precision both --batch B --threads {THREADS} --parts --convirt",
        "BIN`: each run times PyTorch's step (fp32, or autocast bf16 + channels_last), then `convirt bench step`, in the",
        "same minute; seconds per step, convirt against PyTorch, and PyTorch's time over convirt's:",
        "",
        "| precision, batch | convirt s/step | PyTorch s/step | speed-up |",
        "|---|---|---|---|",
    ]
    for precision in ["fp32", "bf16"]:
        ours = [r[precision][0] for r in runs]
        theirs = [r[precision][1] for r in runs]
        ratios = [t / o for o, t in zip(ours, theirs)]
        lines.append(f"| {precision}, 8 ({pairs} runs) | {fmt(ours)} | {fmt(theirs)} | {fmt(ratios)}x (median "
                     f"{statistics.median(ratios):.2f}x) |")
    for precision in ["fp32", "bf16"]:
        o, t = big[precision][0], big[precision][1]
        lines.append(f"| {precision}, 32 | {o:.2f} ({32 / o:.2f} pairs/s) | {t:.2f} ({32 / t:.2f} pairs/s) | {t / o:.2f}x |")
    names = ["image forward", "text forward", "image backward", "text backward"]
    last = runs[-1]
    lines += [
        "",
        "By part at batch 8 (the last run; convirt / PyTorch, seconds): " + "; ".join(
            f"{p} " + ", ".join(f"{n} {a:.2f} / {b:.2f}" for n, a, b in zip(names, last[p][2], last[p][3])) for p in ["fp32", "bf16"]) + ".",
        f"Peak memory of the paper step at batch 32 (`/usr/bin/time -f %M convirt bench step --preset paper --batch 32 --steps 1`):",
        f"fp32 {memory['fp32']:.2f} GB, bf16 {memory['bf16']:.2f} GB.",
        "",
        f"`convirt bench kernels --batch 8 --threads {THREADS}` (GFLOP/s of each kernel against plain sgemm on the same product):",
        "",
        "```", kernels, "```",
        "",
        "`convirt bench data` (JPEG decoding and the training loader) and `convirt bench checkpoint --preset paper` (the",
        "paper model's arena with Adam moments from real steps):",
        "",
        "```", data, checkpoint, "```",
    ]
    block = "\n".join(lines)
    if args.dry:
        print(block + "\n\n" + speed_table(m))
    else:
        replace_block("bench-figures", block, readme="docs/BENCHMARKS.md")
        replace_block("speed", speed_table(m))
        print("docs/BENCHMARKS.md and README.md: benchmark figures rewritten", file=sys.stderr)


if __name__ == "__main__":
    main()
