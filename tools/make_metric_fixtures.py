#!/usr/bin/env python3
"""Reference values for the evaluation metrics (Sources/ConvirtTraining/Metrics.swift) from scikit-learn.

Writes Tests/ConvirtCLITests/Fixtures/metric_fixtures.json: ROC AUC cases (random scores of several
sizes, many ties, constant scores, integer-valued scores, one-class labels, for which sklearn
has no value) and
mean/std cases (sample std, ddof = 1). Scores are written with repr() precision so that Swift reads the
same doubles.

    python3 tools/make_metric_fixtures.py [--out PATH]
"""
import argparse
import json
import math
import os
import warnings

import numpy as np
import sklearn
from sklearn.metrics import roc_auc_score


def auc_case(name, scores, labels):
    scores = [float(s) for s in scores]
    labels = [bool(l) for l in labels]
    case = {"name": name, "scores": scores, "labels": labels}
    # With one class present, older scikit-learn raises ValueError, newer warns and returns NaN.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            auc = float(roc_auc_score(np.array(labels, dtype=int), np.array(scores)))
        except ValueError as e:
            auc, caught = math.nan, [str(e)]
    if math.isnan(auc):
        case["auc"] = None
        case["undefined"] = " ".join(str(getattr(w, "message", w)) for w in caught)
    else:
        case["auc"] = auc
    return case


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(here, "..", "Tests", "ConvirtCLITests", "Fixtures", "metric_fixtures.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(20201001)
    cases = []
    for n in (2, 3, 10, 57, 500):
        labels = rng.random(n) < 0.4
        labels[0], labels[-1] = True, False  # both classes
        cases.append(auc_case(f"random n={n}", rng.normal(size=n) + 0.8 * labels, labels))
    for n in (20, 300):
        labels = rng.random(n) < 0.3
        labels[0], labels[1] = True, False
        # Many ties: scores on a coarse grid.
        cases.append(auc_case(f"ties n={n}", np.round(rng.normal(size=n) + labels, 0) / 4, labels))
        # Integer-valued scores (e.g. vote counts).
        cases.append(auc_case(f"integers n={n}", rng.integers(0, 4, size=n) + labels, labels))
        # Imbalanced: a single positive.
        one = np.zeros(n, dtype=bool)
        one[n // 2] = True
        cases.append(auc_case(f"one positive n={n}", rng.random(n), one))
    cases.append(auc_case("constant scores", [0.5] * 12, [i % 3 == 0 for i in range(12)]))
    cases.append(auc_case("perfect", [0.1, 0.2, 0.3, 0.7, 0.8], [False, False, False, True, True]))
    cases.append(auc_case("inverted", [0.9, 0.8, 0.3, 0.2], [False, False, True, True]))
    cases.append(auc_case("all ties but one", [1, 1, 1, 1, 2, 1], [True, False, True, False, True, False]))
    cases.append(auc_case("huge and tiny", [1e300, -1e300, 1e-300, 0.0, -5e-324, 3.0], [True, False, True, False, False, True]))
    cases.append(auc_case("all positive", rng.random(8), [True] * 8))
    cases.append(auc_case("all negative", rng.random(8), [False] * 8))

    spreads = []
    for values in ([0.9], [0.8, 0.9], [0.71, 0.735, 0.702, 0.744, 0.729], list(rng.random(17))):
        values = [float(v) for v in values]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        spreads.append({"values": values, "mean": float(np.mean(values)), "std": std})

    fixture = {
        "generator": f"tools/make_metric_fixtures.py, scikit-learn {sklearn.__version__}, numpy {np.__version__}",
        "roc_auc": cases,
        "mean_std_ddof1": spreads,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {len(cases)} AUC cases and {len(spreads)} mean/std cases to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
