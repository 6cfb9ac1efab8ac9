#!/usr/bin/env python3
"""Reference 95% bootstrap intervals (numpy only) for Sources/ConvirtEvaluation/Bootstrap.swift.

Writes Tests/ConvirtEvaluationTests/Fixtures/bootstrap_fixture.json. Each case gives the data, the resamples
(indices drawn by numpy, so that Swift computes on the same ones) and the intervals numpy computes:

- "classification": 2 runs' scores for 70 units and 3 labels (one rare, so that some resamples hold no
  positive and its AUC is left out), per resample each run's mean ROC AUC over the labels defined on it,
  averaged over the runs, and each label's AUC averaged over the runs; AUC by the Mann-Whitney rank sum
  with average ranks for ties (what sklearn.metrics.roc_auc_score computes for binary labels).
- "accuracy": 3 classes, 1 run, accuracy and per-class accuracy.
- "stratified": retrieval's mean over categories of per-query precisions, queries resampled within categories.

Intervals: numpy.percentile(values, [2.5, 97.5]) (linear interpolation).

    python3 tools/make_bootstrap_fixture.py [--out PATH]
"""
import argparse
import json
import os

import numpy as np


def auc(scores, labels):
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    average = np.bincount(inverse, weights=ranks) / counts
    r = average[inverse]
    return float((r[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def interval(values):
    lo, hi = np.percentile(np.asarray(values, dtype=float), [2.5, 97.5])
    return {"lower": float(lo), "upper": float(hi)}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(here, "..", "Tests", "ConvirtEvaluationTests", "Fixtures", "bootstrap_fixture.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(20261205)
    resamples = 300

    # Multi-label AUC, 2 runs.
    n, names = 70, ["A", "B", "Rare"]
    targets = np.zeros((n, 3))
    targets[:, 0] = rng.random(n) < 0.4
    targets[:, 1] = rng.random(n) < 0.5
    targets[rng.choice(n, 3, replace=False), 2] = 1
    runs = [np.round(rng.normal(size=(n, 3)) + 0.9 * targets, 2) for _ in range(2)]  # rounded: ties
    draws = rng.integers(0, n, size=(resamples, n))
    means, per_label = [], [[] for _ in names]
    for d in draws:
        run_means, run_labels = [], [[] for _ in names]
        for s in runs:
            defined = []
            for k in range(len(names)):
                a = auc(s[d, k], targets[d, k] >= 0.5)
                if a is not None:
                    defined.append(a)
                    run_labels[k].append(a)
            if defined:
                run_means.append(np.mean(defined))
        if len(run_means) == len(runs):
            means.append(np.mean(run_means))
        for k in range(len(names)):
            if len(run_labels[k]) == len(runs):
                per_label[k].append(np.mean(run_labels[k]))
    classification = {"names": names, "targets": targets.tolist(), "runs": [r.tolist() for r in runs], "draws": draws.tolist(),
                      "mean": interval(means), "per_label": {name: interval(v) for name, v in zip(names, per_label)},
                      "defined": {name: len(v) for name, v in zip(names, per_label)}}

    # Multi-class accuracy, 1 run.
    n, classes = 50, ["x", "y", "z"]
    truth = rng.integers(0, 3, size=n)
    targets = np.eye(3)[truth]
    scores = np.round(rng.normal(size=(n, 3)) + 1.2 * targets, 2)
    draws = rng.integers(0, n, size=(resamples, n))
    predicted = scores.argmax(axis=1)
    accuracies, per_class = [], [[] for _ in classes]
    for d in draws:
        accuracies.append(float(np.mean(predicted[d] == truth[d])))
        for k in range(3):
            members = d[truth[d] == k]
            if len(members):
                per_class[k].append(float(np.mean(predicted[members] == k)))
    accuracy = {"names": classes, "targets": targets.tolist(), "scores": scores.tolist(), "draws": draws.tolist(),
                "mean": interval(accuracies), "per_label": {name: interval(v) for name, v in zip(classes, per_class)}}

    # Retrieval: per-query precisions in 3 categories.
    strata = [np.round(rng.random(size) * 10) / 10 for size in (10, 12, 8)]
    stratum_draws = [rng.integers(0, len(s), size=(resamples, len(s))) for s in strata]
    stratified_means = [np.mean([s[d[b]].mean() for s, d in zip(strata, stratum_draws)]) for b in range(resamples)]
    stratified = {"strata": [s.tolist() for s in strata], "draws": [d.tolist() for d in stratum_draws], "interval": interval(stratified_means)}

    out = {"resamples": resamples, "classification": classification, "accuracy": accuracy, "stratified": stratified,
           "generator": "tools/make_bootstrap_fixture.py, numpy " + np.__version__}
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {args.out}: classification intervals {classification['mean']}, defined resamples {classification['defined']}")


if __name__ == "__main__":
    main()
