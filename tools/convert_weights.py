#!/usr/bin/env python3
"""Converts PyTorch checkpoints to the safetensors files convirt loads.

    # torchvision ResNet-50 (e.g. resnet50-11ad3fa6.pth, ImageNet) -> --image-weights FILE
    python3 tools/convert_weights.py resnet50-11ad3fa6.pth resnet50.safetensors
    # a Hugging Face BERT directory with pytorch_model.bin -> adds model.safetensors beside it (--text-weights DIR)
    python3 tools/convert_weights.py --bert-dir Bio_ClinicalBERT/

The tensors keep their names (torchvision's, Hugging Face's); convirt ignores the classifier (fc.*),
the pooler, the pre-training heads (cls.*) and num_batches_tracked.
"""
import argparse
import os

import torch
from safetensors.torch import save_file


def convert(source, target):
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, target)
    print(f"wrote {target}: {len(tensors)} tensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a .pth / .bin checkpoint")
    ap.add_argument("target", nargs="?", help="the .safetensors file to write")
    ap.add_argument("--bert-dir", help="a Hugging Face BERT directory holding pytorch_model.bin")
    args = ap.parse_args()
    if args.bert_dir:
        convert(os.path.join(args.bert_dir, "pytorch_model.bin"), os.path.join(args.bert_dir, "model.safetensors"))
    elif args.source and args.target:
        convert(args.source, args.target)
    else:
        ap.error("give SOURCE TARGET or --bert-dir DIR")


if __name__ == "__main__":
    main()
