#!/usr/bin/env python3
"""Loads what `convirt checkpoint export RUN --out DIR` wrote into PyTorch, strictly, and runs it once.

    python3 tools/load_export.py DIR

The image encoder loads into torchvision's ResNet (resnet50() for the paper preset; the same classes at
the checkpoint's width otherwise) with load_state_dict(strict=True) apart from the classifier, the
text encoder with transformers' BertModel.from_pretrained, and each head into nn.Sequential(Linear, ReLU,
Linear). Copy the training vocab.txt into DIR/text_encoder to use the tokenizer there too.
"""
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file

import torch_compat  # noqa: F401  (before torchvision and transformers)
from make_parity_fixture import ResNetEncoder
from transformers import BertModel


def main():
    out = sys.argv[1]
    cfg = json.load(open(os.path.join(out, "convirt_config.json")))
    image = ResNetEncoder(cfg["image"])
    state = load_file(os.path.join(out, "image_encoder.safetensors"))
    missing, unexpected = image.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    assert not missing and not unexpected, (missing, unexpected)
    text = BertModel.from_pretrained(os.path.join(out, "text_encoder"), add_pooling_layer=False)
    heads = {}
    for name in ("image_head", "text_head"):
        state = load_file(os.path.join(out, f"{name}.safetensors"))
        head = nn.Sequential(nn.Linear(state["0.weight"].shape[1], state["0.weight"].shape[0]), nn.ReLU(),
                             nn.Linear(state["2.weight"].shape[1], state["2.weight"].shape[0]))
        head.load_state_dict(state, strict=True)
        heads[name] = head
    image.eval(); text.eval()
    with torch.no_grad():
        size = cfg["image"]["image_size"]
        v = heads["image_head"](image(torch.zeros(1, 3, size, size)))
        u = heads["text_head"](text(input_ids=torch.tensor([[2, 10, 3]])).last_hidden_state.max(dim=1).values)
    print(f"loaded {out}: image encoder {sum(p.numel() for p in image.parameters())} parameters, text encoder "
          f"{sum(p.numel() for p in text.parameters())}, embeddings {tuple(v.shape)} and {tuple(u.shape)}")


if __name__ == "__main__":
    main()
