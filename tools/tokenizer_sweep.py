#!/usr/bin/env python3
"""`convirt tokenize` against Hugging Face's BertTokenizer on every Unicode code point up to U+2FFFF,
each inside and beside a word ("a<c>b <c>"), lowercased and cased; prints the code points whose ids
differ, by Unicode category (Python's unicodedata), with examples.

    pip install "transformers>=5" tokenizers
    python3 tools/tokenizer_sweep.py VOCAB.txt [--convirt .build/release/convirt] [--legacy]

The reference is transformers 5's BertTokenizer (the tokenizers library's BertNormalizer, BertPreTokenizer
and WordPiece); --legacy also compares with transformers 4's Python tokenizer (BertTokenizerLegacy).
Surrogates are skipped, and so are the characters that end a line (stdin is read line by line).
"""
import argparse
import collections
import subprocess
import sys
import unicodedata


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vocab")
    parser.add_argument("--convirt", default=".build/release/convirt")
    parser.add_argument("--legacy", action="store_true")
    args = parser.parse_args()
    from transformers import BertTokenizer
    line_ends = set(map(ord, "\n\r\x85\u2028\u2029\x0b\x0c\x1c\x1d\x1e"))
    points = [c for c in range(0x30000) if not 0xD800 <= c <= 0xDFFF and c not in line_ends]
    texts = [f"a{chr(c)}b {chr(c)}" for c in points]
    differing = 0
    for lower in (True, False):
        done = subprocess.run([args.convirt, "tokenize", "--vocab", args.vocab, "--lowercase" if lower else "--no-lowercase"],
                              input=("\n".join(texts) + "\n").encode(), capture_output=True)
        if done.returncode != 0:
            sys.exit(f"convirt tokenize failed: {done.stderr.decode()[-2000:]}")
        ours = [[int(i) for i in line.split()] for line in done.stdout.decode().split("\n")[:len(texts)]]
        references = [("BertTokenizer", BertTokenizer(args.vocab, do_lower_case=lower))]
        if args.legacy:
            from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
            references.append(("BertTokenizerLegacy", BertTokenizerLegacy(args.vocab, do_lower_case=lower)))
        for name, tokenizer in references:
            theirs = tokenizer(texts)["input_ids"]
            by_category = collections.defaultdict(list)
            for c, a, b in zip(points, ours, theirs):
                if a != b:
                    by_category[unicodedata.category(chr(c))].append(c)
            count = sum(len(v) for v in by_category.values())
            differing += count if name == "BertTokenizer" else 0
            print(f"{'lowercased' if lower else 'cased'}, against {name}: {count} of {len(points)} code points differ")
            for category, codes in sorted(by_category.items(), key=lambda kv: -len(kv[1])):
                print(f"  {category} {len(codes):6d}: " + " ".join(f"U+{c:04X}" for c in codes[:10]) + (" ..." if len(codes) > 10 else ""))
    print(f"python {sys.version.split()[0]} (unicodedata {unicodedata.unidata_version})")
    return differing


if __name__ == "__main__":
    main()
