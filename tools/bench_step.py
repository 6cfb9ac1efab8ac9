#!/usr/bin/env python3
"""The PyTorch side of `convirt bench step`: forward + backward of the same ConVIRT model (torchvision
ResNet-50 at 224, BERT-base with ClinicalBERT's vocabulary, embeddings and 6 layers frozen, 512-d heads)
on random data, on the CPU, with the same threads; prints pairs/s. With --convirt BIN it runs our step
too, in the same precision, and prints both figures and the ratio.

    python3 tools/bench_step.py --batch 8 --tokens 128 --threads 2 --convirt .build/release/convirt
    python3 tools/bench_step.py --precision bf16 --batch 32 --convirt .build/release/convirt
    python3 tools/bench_step.py --precision both --convirt .build/release/convirt     # fp32 and bf16, one run

--precision bf16 is PyTorch's fastest eager CPU configuration: the forward under
torch.autocast("cpu", dtype=torch.bfloat16) and the ResNet and its images in channels_last; the loss in
fp32, as convirt's bf16 does. convirt runs `bench step --precision` the same.
"""
import argparse
import contextlib
import re
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_compat  # noqa: F401  (before torchvision and transformers)
from make_parity_fixture import BERTS, RESNETS, ResNetEncoder
from transformers import BertConfig, BertModel


def torch_step(args, precision):
    torch.manual_seed(0)
    image = ResNetEncoder(RESNETS["resnet50"])
    text = BertModel(BertConfig(**BERTS["base"]), add_pooling_layer=False)
    for p in text.embeddings.parameters():
        p.requires_grad_(False)
    for layer in text.encoder.layer[:6]:
        for p in layer.parameters():
            p.requires_grad_(False)
    image_head = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 512))
    text_head = nn.Sequential(nn.Linear(768, 512), nn.ReLU(), nn.Linear(512, 512))
    for m in (image, text, image_head, text_head):
        m.train()
    b = args.batch
    images = torch.randn(b, 3, 224, 224)
    if precision == "bf16":
        image = image.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    ids = torch.randint(1, 28996, (b, args.tokens))
    mask = torch.ones(b, args.tokens, dtype=torch.int64)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    times, parts = [], []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        laps = []
        with amp():
            zv = image_head(image(images))
            laps.append(time.perf_counter())
            hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state
            zu = text_head(hidden.masked_fill(mask[:, :, None] == 0, float("-inf")).max(dim=1).values)
            laps.append(time.perf_counter())
        v, u = F.normalize(zv.float(), dim=-1), F.normalize(zu.float(), dim=-1)
        logits = v @ u.t() / 0.1
        targets = torch.arange(b)
        loss = 0.75 * F.cross_entropy(logits, targets) + 0.25 * F.cross_entropy(logits.t(), targets)
        for m in (image, text, image_head, text_head):
            m.zero_grad(set_to_none=False)
        if args.parts:
            # As `convirt bench step` times it: the loss's gradients at the two embeddings, then each
            # encoder's backward on its own.
            gv, gu = torch.autograd.grad(loss, [zv, zu])
            laps.append(time.perf_counter())
            zv.backward(gv)
            laps.append(time.perf_counter())
            zu.backward(gu)
            laps.append(time.perf_counter())
        else:
            loss.backward()
        if step > 0:
            times.append(time.perf_counter() - start)
            if args.parts:
                parts.append([laps[0] - start, laps[1] - laps[0], laps[3] - laps[2], laps[4] - laps[3]])
    if parts:
        mean = [sum(p[i] for p in parts) / len(parts) for i in range(4)]
        print("PyTorch image forward %.3f s, text forward %.3f s, image backward %.3f s, text backward %.3f s" % tuple(mean), flush=True)
    return sum(times) / len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="fp32")
    ap.add_argument("--parts", action="store_true", help="also time each encoder's forward and backward, as `convirt bench step` does")
    ap.add_argument("--convirt", help="path to the convirt binary: also run `convirt bench step` and compare")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = args.batch
    for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
        torch_time = torch_step(args, precision)
        config = "autocast bf16 + channels_last" if precision == "bf16" else "fp32"
        print(f"PyTorch {torch.__version__} {config}: forward+backward {torch_time:.3f} s per step = {b / torch_time:.2f} pairs/s "
              f"(batch {b}, {args.tokens} tokens, {args.threads} threads)", flush=True)
        if args.convirt:
            out = subprocess.run([args.convirt, "bench", "step", "--preset", "paper", "--batch", str(b), "--tokens", str(args.tokens),
                                  "--threads", str(args.threads), "--steps", str(args.steps), "--precision", precision],
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip())
            ours = float(re.search(r"forward\+backward ([0-9.]+) s per step", out).group(1))
            print(f"{precision}: convirt {b / ours:.2f} pairs/s vs PyTorch {b / torch_time:.2f} pairs/s: ratio {torch_time / ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
