#!/usr/bin/env python3
"""The ceiling of held-out image-to-text precision@10 on a synthetic prepared dataset, for an ideal
model that knows every image's findings exactly.

    python3 tools/heldout_oracle.py PREPARED_DIR [--studies 100] [--trials 20]

The ideal model reads each sentence's finding from its words (the synthetic reports' vocabulary:
side, severity, lobe, finding, negation), ranks the sentences that are true of the image first, the
rarer facts before the common ones (a "No pneumothorax." is true of most images), ties at random, and
false sentences last. It prints its precision@10 under both of `convirt`'s measures: by source study
(a sentence counts when it comes from the image's own study: copies of a shared sentence cannot be told
apart, so this ceiling is far below the count bound "best possible") and over distinct sentences (each
text once, relevant when the image's own report says it). Only for synthetic reports; a real report's
facts need a labeler.
"""
import argparse
import json
import os
import random

FINDINGS = [("effusion", ["effusion", "costophrenic"]), ("pneumothorax", ["pneumothorax"]), ("cardiomegaly", ["heart", "cardi"]),
            ("consolidation", ["consolidation", "pneumonia", "opacity in"]), ("edema", ["edema", "congestion"]),
            ("atelectasis", ["atelectasis"]), ("fracture", ["fracture", "osseous"]), ("devices", ["tube", "pacemaker", "devices", "lines"])]
NEGATIONS = ["no ", "there is no", "are sharp", "normal", "within normal", "clear", "no displaced"]


def fact(sentence):
    t = sentence.lower()
    side = "left" if "left" in t else ("right" if "right" in t else "")
    severity = next((w for w in ["small", "moderate", "large", "mild", "severe"] if w in t), "")
    negated = t.startswith("no ") or any(n in t for n in NEGATIONS[1:])
    for name, words in FINDINGS:
        if any(w in t for w in words):
            if negated:
                return ("no", name)
            lobe = "upper" if "upper" in t else ("lower" if "lower" in t else "")
            return (name, side, severity if name in ("effusion", "pneumothorax", "edema") else "", lobe)
    if "acute" in t or "normal chest" in t:
        return ("normal",)
    return ("irrelevant",)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    studies = json.load(open(os.path.join(args.prepared, "studies.json")))
    test = [s for s in studies if s["split"] == "test"][: args.studies]
    n = len(test)
    facts = [set(fact(x) for x in s["sentences"]) for s in test]

    def true_for(f, i):
        if f[0] == "irrelevant":
            return True
        if f[0] == "no":
            return not any(g[0] == f[1] for g in facts[i])
        return f in facts[i]

    sentences = [(i, x, fact(x)) for i, s in enumerate(test) for x in s["sentences"]]
    frequency = {}
    for _, _, f in sentences:
        if f not in frequency:
            frequency[f] = sum(true_for(f, i) for i in range(n))
    distinct = sorted(set(x for _, x, _ in sentences))
    rng = random.Random(0)
    by_source = by_text = 0
    for _ in range(args.trials):
        for i in range(n):
            ranked = sorted(range(len(sentences)), key=lambda j: (frequency[sentences[j][2]] if true_for(sentences[j][2], i) else 1e9, rng.random()))
            by_source += sum(1 for j in ranked[:10] if sentences[j][0] == i)
            own = set(test[i]["sentences"])
            ranked = sorted(distinct, key=lambda x: (frequency[fact(x)] if true_for(fact(x), i) else 1e9, rng.random()))
            by_text += sum(1 for x in ranked[:10] if x in own)
    total = 10 * n * args.trials
    print(f"ideal model over {n} studies, {len(sentences)} sentences ({len(distinct)} distinct): precision@10 "
          f"{by_source / total:.3f} by source study, {by_text / total:.3f} over distinct sentences")


if __name__ == "__main__":
    main()
