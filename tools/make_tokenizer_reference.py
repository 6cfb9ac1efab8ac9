#!/usr/bin/env python3
"""Writes the tokenizer reference: Hugging Face BertTokenizer ids for a set of hard sentences, with a
lowercasing and a cased tokenizer over the same vocabulary, for convirt's WordPiece tests.

    pip install transformers tokenizers
    python3 tools/make_tokenizer_reference.py VOCAB.txt OUT.json
"""
import json
import sys

import torch_compat  # noqa: F401  (before transformers)
from transformers import BertTokenizer, BertTokenizerFast

SENTENCES = [
    "There is a small left pleural effusion.",
    "No pneumothorax. Heart size is normal; mediastinal contours are unremarkable!",
    "Interval increase in bibasilar opacities, likely atelectasis vs. pneumonia (clinical correlation).",
    "ET tube terminates 4.5 cm above the carina; NG tube courses below the diaphragm.",
    "Compared to 2019-03-14, the 3x2-cm nodule at T10-T11 is stable.",
    "Café résumé naïve Zürich coöperate façade — “quotes” and ‘apostrophes’…",
    "ÅÄÖ åäö ÉÈÊ ñ Ñ ß İstanbul",
    "Electroencephalographically supercalifragilisticexpialidocious antidisestablishmentarianism.",
    "a" * 101 + " short",
    "中文字符 and 日本語 mixed with English",
    "tabs\tand\nnewlines\r\nand  multiple   spaces",
    "control\x00chars\x07removed\u200bzero\ufeffwidth",
    "emoji 🫁 lungs 🩻 x-ray",
    "[CLS] special [SEP] tokens [MASK] inside [UNK] text",
    "Ünicode ﬁ ligature and full-width ＡＢＣ１２３",
    "   ",
    "",
    "Findings: 1. Lines/tubes: none. 2. Lungs: clear. IMPRESSION: No acute cardiopulmonary process.",
]


def main():
    vocab, out = sys.argv[1], sys.argv[2]
    cases = []
    for lower in (True, False):
        slow = BertTokenizer(vocab, do_lower_case=lower)
        fast = BertTokenizerFast(vocab, do_lower_case=lower)
        for s in SENTENCES:
            ids = slow(s)["input_ids"]
            truncated = slow(s, truncation=True, max_length=8)["input_ids"]
            cases.append({"text": s, "lowercase": lower, "ids": ids, "max_length_8": truncated,
                          "fast_agrees": fast(s)["input_ids"] == ids})
    with open(out, "w") as f:
        json.dump({"tokenizer": "transformers.BertTokenizer", "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {out}: {len(cases)} cases; fast tokenizer disagrees on {sum(not c['fast_agrees'] for c in cases)}")


if __name__ == "__main__":
    main()
