"""Shared by the scripts that write the measured blocks of README.md and docs/ (tools/readme_figures.sh,
tools/readme_benchmarks.py, tools/precision_learning.sh): the CPU line that names where figures came from, and the rewrite of one
block between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""
import os
import re
import subprocess
import sys


def cpu_line(convirt_info):
    """'MODEL (N cores; avx512/amx flags; OpenBLAS core C, oneDNN ISA I)' from lscpu and `convirt info`'s output."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.*)", lscpu).group(1).strip()
    flags = re.search(r"Flags:\s*(.*)", lscpu).group(1).split()
    isa = sorted(f for f in flags if f.startswith("avx512") or f.startswith("amx")) or ["no AVX-512, no AMX"]
    blas = re.search(r"core (\S+)", convirt_info).group(1)
    dnnl = re.search(r"ISA ([A-Za-z0-9_]+)", convirt_info).group(1)
    return f"{model} ({os.cpu_count()} cores; {', '.join(isa)}; OpenBLAS core {blas}, oneDNN ISA {dnnl})"


def replace_block(name, block, readme="README.md"):
    """Rewrites the text between `readme`'s `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers."""
    text = open(readme).read()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{readme} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(readme, "w").write(head + begin + "\n" + block + "\n" + end + tail)
