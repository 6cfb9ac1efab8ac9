#!/usr/bin/env python3
"""Writes the tokenizer reference: Hugging Face BertTokenizer ids for a set of hard sentences, with a
lowercasing and a cased tokenizer over the same vocabulary, for convirt's WordPiece tests.

    pip install "transformers>=5" tokenizers
    python3 tools/make_tokenizer_reference.py VOCAB.txt OUT.json

The reference is transformers 5's BertTokenizer, which runs the tokenizers library (BertTokenizerFast
in transformers 4). Each case also records whether transformers 4's Python tokenizer, kept in
transformers 5 as BertTokenizerLegacy, gives the same ids: it differs on unassigned code points, which
it removes, and, when cased, on text that Unicode's NFC composition changes, which it composes.
"""
import json
import sys

import torch_compat  # noqa: F401  (before transformers)
import transformers
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

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
    "line\u2028and paragraph\u2029separators",
    "[UNK]\u0301 after a special token, x[SEP]y and [MASK]\u00e9",
    "unassigned \u0378 code\U000E0080points\uFFFF kept",
    "decomposed cafe\u0301 re\u0301sume\u0301 and composed caf\u00e9",
    "compatibility \uF902 \u037E singletons \u2329x\u232A",
    "ΟΔΟΣ ΟΔΟΣ. σίγμα ΣΊΓΜΑ",
    "extension E \U0002B820\U0002B921 ideographs",
]


def main():
    vocab, out = sys.argv[1], sys.argv[2]
    cases = []
    for lower in (True, False):
        tokenizer = BertTokenizer(vocab, do_lower_case=lower)
        legacy = BertTokenizerLegacy(vocab, do_lower_case=lower)
        for s in SENTENCES:
            ids = tokenizer(s)["input_ids"]
            truncated = tokenizer(s, truncation=True, max_length=8)["input_ids"]
            cases.append({"text": s, "lowercase": lower, "ids": ids, "max_length_8": truncated,
                          "legacy_agrees": legacy(s)["input_ids"] == ids})
    with open(out, "w") as f:
        json.dump({"tokenizer": f"transformers {transformers.__version__} BertTokenizer", "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {out}: {len(cases)} cases; transformers 4's Python tokenizer differs on {sum(not c['legacy_agrees'] for c in cases)}")


if __name__ == "__main__":
    main()
