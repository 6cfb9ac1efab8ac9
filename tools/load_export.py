#!/usr/bin/env python3
"""Loads what `convirt checkpoint export RUN --out DIR` wrote into PyTorch, strictly, and runs it once.

    python3 tools/load_export.py DIR
    python3 tools/load_export.py DIR --check-tokenizer TEXTS IDS

The image encoder loads into torchvision's ResNet (resnet50() for the paper preset; the same classes at
the checkpoint's width otherwise) with load_state_dict(strict=True) apart from the classifier, the
text encoder with transformers' BertModel.from_pretrained, the tokenizer with
BertTokenizer.from_pretrained(DIR/text_encoder), and each head into nn.Sequential(Linear, ReLU, Linear).

--check-tokenizer needs transformers only (no torch): it tokenizes each line of TEXTS with the exported
tokenizer and compares with IDS (`convirt tokenize` output, one line of ids per text line); exit 1 on
any difference.
"""
import json
import os
import sys


def check_tokenizer(out, texts_path, ids_path):
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(os.path.join(out, "text_encoder"))
    texts = open(texts_path, encoding="utf-8").read().split("\n")
    expected = [line.split() for line in open(ids_path).read().split("\n")]
    if texts and texts[-1] == "":
        texts.pop()
    expected = expected[:len(texts)]
    bad = 0
    for k, (text, ids) in enumerate(zip(texts, expected)):
        ours = [str(i) for i in tokenizer(text, truncation=True)["input_ids"]]
        if ours != ids:
            bad += 1
            if bad <= 5:
                print(f"line {k + 1}: {text!r}: Hugging Face {' '.join(ours)} != convirt {' '.join(ids)}")
    print(f"tokenizer of {out}/text_encoder ({type(tokenizer).__name__}, do_lower_case={tokenizer.do_lower_case}, "
          f"model_max_length={tokenizer.model_max_length}): {len(texts) - bad} of {len(texts)} lines with equal ids")
    return bad == 0


def main():
    out = sys.argv[1]
    if len(sys.argv) == 5 and sys.argv[2] == "--check-tokenizer":
        sys.exit(0 if check_tokenizer(out, sys.argv[3], sys.argv[4]) else 1)
    import torch
    import torch.nn as nn
    from safetensors.torch import load_file

    import torch_compat  # noqa: F401  (before torchvision and transformers)
    from make_parity_fixture import ResNetEncoder
    from transformers import BertModel, BertTokenizer

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
    tokenizer = BertTokenizer.from_pretrained(os.path.join(out, "text_encoder"))
    image.eval(); text.eval()
    with torch.no_grad():
        size = cfg["image"]["image_size"]
        v = heads["image_head"](image(torch.zeros(1, 3, size, size)))
        ids = torch.tensor([tokenizer("No acute cardiopulmonary process.")["input_ids"]])
        u = heads["text_head"](text(input_ids=ids).last_hidden_state.max(dim=1).values)
    print(f"loaded {out}: image encoder {sum(p.numel() for p in image.parameters())} parameters, text encoder "
          f"{sum(p.numel() for p in text.parameters())}, embeddings {tuple(v.shape)} and {tuple(u.shape)}")


if __name__ == "__main__":
    main()
