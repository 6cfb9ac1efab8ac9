#!/usr/bin/env python3
"""`convirt tokenize` against Hugging Face's BertTokenizer on every Unicode code point up to U+2FFFF,
each inside and beside a word ("a<c>b <c>"), lowercased and cased; prints the code points whose ids
differ, by Unicode category (Python's unicodedata), with examples.

    pip install "transformers>=5" tokenizers
    python3 tools/tokenizer_sweep.py VOCAB.txt [--convirt .build/release/convirt] [--legacy] [--check]

The reference is the tokenizers library's BERT tokenizer (BertNormalizer, BertPreTokenizer and WordPiece):
transformers 5's BertTokenizer, BertTokenizerFast in transformers 4 and 5 alike; --legacy (transformers 5)
also compares with transformers 4's Python tokenizer (BertTokenizerLegacy).
Surrogates are skipped, and so are the characters that end a line (stdin is read line by line).

--check (the test suite's): exit 1 unless convirt equals BertTokenizer on every code point below U+0600
(Latin, Greek, Cyrillic, Armenian, Hebrew, symbols), in the CJK, kana and Hangul blocks, and on all but
at most 1000 code points in all. What differs lies in scripts whose characters were assigned or
recategorised after Unicode 8, the version of the tokenizers library's category tables (658 lowercased
and 163 cased code points with tokenizers 0.23 and Swift 6's Unicode tables).
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
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    from transformers import BertTokenizerFast
    line_ends = set(map(ord, "\n\r\x85\u2028\u2029\x0b\x0c\x1c\x1d\x1e"))
    points = [c for c in range(0x30000) if not 0xD800 <= c <= 0xDFFF and c not in line_ends]
    texts = [f"a{chr(c)}b {chr(c)}" for c in points]
    failures = []
    # Blocks that must agree whatever the Unicode versions: below U+0600, CJK ideographs, kana, Hangul.
    exact = [(0x0, 0x5FF), (0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3)]
    for lower in (True, False):
        done = subprocess.run([args.convirt, "tokenize", "--vocab", args.vocab, "--lowercase" if lower else "--no-lowercase"],
                              input=("\n".join(texts) + "\n").encode(), capture_output=True)
        if done.returncode != 0:
            sys.exit(f"convirt tokenize failed: {done.stderr.decode()[-2000:]}")
        ours = [[int(i) for i in line.split()] for line in done.stdout.decode().split("\n")[:len(texts)]]
        references = [("BertTokenizer", BertTokenizerFast(args.vocab, do_lower_case=lower))]
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
            if name == "BertTokenizer":
                inside = [c for codes in by_category.values() for c in codes if any(lo <= c <= hi for lo, hi in exact)]
                if inside:
                    failures.append(f"{len(inside)} code points differ in blocks that must agree: "
                                    + " ".join(f"U+{c:04X}" for c in inside[:20]))
                if count > 1000:
                    failures.append(f"{count} code points differ ({'lowercased' if lower else 'cased'}), more than 1000")
            print(f"{'lowercased' if lower else 'cased'}, against {name}: {count} of {len(points)} code points differ")
            for category, codes in sorted(by_category.items(), key=lambda kv: -len(kv[1])):
                print(f"  {category} {len(codes):6d}: " + " ".join(f"U+{c:04X}" for c in codes[:10]) + (" ..." if len(codes) > 10 else ""))
    import tokenizers
    import transformers
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, python {sys.version.split()[0]} "
          f"(unicodedata {unicodedata.unidata_version})")
    if args.check:
        for failure in failures:
            print(f"check failed: {failure}")
        print("check: " + ("failed" if failures else "passed"))
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
