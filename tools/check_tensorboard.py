#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with the `tensorboard` package and checks them against metrics.jsonl.

    python3 tools/check_tensorboard.py RUN_DIR [--expect-tag PREFIX ...]

EventAccumulator loads every RUN_DIR/tensorboard/events.out.tfevents.* file as one run (a resumed run adds
a file whose restart marker drops the steps it computes again). Checks: every metrics.jsonl field has its
scalar (train/loss, train/loss_v2u, train/loss_u2v, train/lr, train/grad_norm, train/pairs_per_s,
time/data, time/forward, time/backward, time/comm, time/optimizer, time/checkpoint, val/loss, and with the
outlier guard train/skipped, train/skipped_steps; train/tflops_per_rank, and train/peak_share with --peak-tflops) at every
step, equal to the JSON value as a float32, each step once (one continuous curve); the held-out retrieval
result, when RUN_DIR/heldout_retrieval.json exists; and, per --expect-tag, at least one tag starting with
PREFIX (the evaluations' eval/...). Exit 1 on any difference.
"""
import glob
import json
import os
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FIELDS = {"loss": "train/loss", "loss_v2u": "train/loss_v2u", "loss_u2v": "train/loss_u2v", "lr": "train/lr",
          "grad_norm": "train/grad_norm", "pairs_per_s": "train/pairs_per_s", "time_data_s": "time/data",
          "time_forward_s": "time/forward", "time_backward_s": "time/backward", "time_comm_s": "time/comm",
          "time_optimizer_s": "time/optimizer", "time_checkpoint_s": "time/checkpoint", "val_loss": "val/loss",
          "skipped": "train/skipped", "skipped_steps": "train/skipped_steps", "tflops_per_rank": "train/tflops_per_rank",
          "peak_share": "train/peak_share", "excluded_negatives": "train/excluded_negatives"}


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    run = sys.argv[1]
    expect = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--expect-tag"]
    files = sorted(glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*")))
    if not files:
        sys.exit(f"{run}/tensorboard: no event files")
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    problems, checked = [], 0
    for field, tag in FIELDS.items():
        expected = {r["step"]: r[field] for r in rows if r.get(field) is not None}
        if not expected:
            continue
        if tag not in tags:
            problems.append(f"{tag}: missing (tags: {sorted(tags)})")
            continue
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if len(steps) != len(set(steps)):
            problems.append(f"{tag}: steps logged more than once: {sorted(s for s in set(steps) if steps.count(s) > 1)}")
        if set(steps) != set(expected):
            problems.append(f"{tag}: steps {sorted(set(steps) ^ set(expected))[:10]} differ from metrics.jsonl's")
        for e in events:
            if e.step in expected and e.value != f32(expected[e.step]):
                problems.append(f"{tag} at step {e.step}: {e.value} in TensorBoard, {expected[e.step]} in metrics.jsonl")
            checked += 1
    held = os.path.join(run, "heldout_retrieval.json")
    if os.path.exists(held):
        tag = "eval/heldout/image_to_text_precision@10"
        value = json.load(open(held))["precision@10"]
        if tag not in tags or acc.Scalars(tag)[-1].value != f32(value):
            problems.append(f"{tag}: {acc.Scalars(tag)[-1].value if tag in tags else 'missing'}, heldout_retrieval.json {value}")
        else:
            checked += 1
    for prefix in expect:
        if not any(t.startswith(prefix) for t in tags):
            problems.append(f"no tag starts with {prefix} (tags: {sorted(tags)})")
    for p in problems[:20]:
        print(p)
    print(f"{run}/tensorboard: {len(files)} event file(s), {len(tags)} tags, {checked} scalars checked against metrics.jsonl: "
          + ("all equal" if not problems else f"{len(problems)} problem(s)"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
