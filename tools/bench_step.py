#!/usr/bin/env python3
"""The PyTorch side of `convirt bench step`: forward + backward of the same ConVIRT model (torchvision
ResNet-50 at 224, BERT-base with ClinicalBERT's vocabulary, embeddings and 6 layers frozen, 512-d heads)
on random data, on the CPU, with the same threads; prints pairs/s. With --convirt BIN it runs our step
too and prints both figures and the ratio.

    python3 tools/bench_step.py --batch 8 --tokens 128 --threads 2 --convirt .build/release/convirt
"""
import argparse
import re
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_compat  # noqa: F401  (before torchvision and transformers)
from make_parity_fixture import BERTS, RESNETS, ResNetEncoder
from transformers import BertConfig, BertModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--convirt", help="path to the convirt binary: also run `convirt bench step` and compare")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    ids = torch.randint(1, 28996, (b, args.tokens))
    mask = torch.ones(b, args.tokens, dtype=torch.int64)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        v = F.normalize(image_head(image(images)), dim=-1)
        hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state
        u = F.normalize(text_head(hidden.masked_fill(mask[:, :, None] == 0, float("-inf")).max(dim=1).values), dim=-1)
        logits = v @ u.t() / 0.1
        targets = torch.arange(b)
        loss = 0.75 * F.cross_entropy(logits, targets) + 0.25 * F.cross_entropy(logits.t(), targets)
        for m in (image, text, image_head, text_head):
            m.zero_grad(set_to_none=False)
        loss.backward()
        if step > 0:
            times.append(time.perf_counter() - start)
    torch_time = sum(times) / len(times)
    print(f"PyTorch {torch.__version__}: forward+backward {torch_time:.3f} s per step = {b / torch_time:.2f} pairs/s "
          f"(batch {b}, {args.tokens} tokens, {args.threads} threads)")
    if args.convirt:
        out = subprocess.run([args.convirt, "bench", "step", "--preset", "paper", "--batch", str(b), "--tokens", str(args.tokens),
                              "--threads", str(args.threads), "--steps", str(args.steps)], capture_output=True, text=True, check=True).stdout
        print(out.strip())
        ours = float(re.search(r"forward\+backward ([0-9.]+) s per step", out).group(1))
        print(f"convirt {b / ours:.2f} pairs/s vs PyTorch {b / torch_time:.2f} pairs/s: ratio {torch_time / ours:.2f}x")


if __name__ == "__main__":
    main()
