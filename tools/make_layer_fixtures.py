#!/usr/bin/env python3
"""Writes PyTorch reference fixtures for convirt's kernels (one safetensors file per layer kind).

Each file follows the parity fixture format of DESIGN.md: `__metadata__` holds `kind` and `config` (JSON);
tensors are `input.<name>`, `param.<name>` (parameters and buffers), `output.<name>`,
`input.output_weights` (the objective is sum(output * output_weights)) and `grad.<name>` for every input
and parameter that has a gradient. References are computed by PyTorch in float64 from float32 inputs and
stored as float32 (Adam runs in float32, PyTorch's own precision, to pin down its exact semantics).

    pip install torch safetensors numpy      # a CPU wheel is enough
    python3 tools/make_layer_fixtures.py [--out Tests/ConvirtCoreTests/Fixtures/layers]
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def f32(t):
    return t.detach().to(torch.float32).clone().contiguous()


class Fixture:
    def __init__(self, kind, **config):
        self.kind, self.config, self.tensors = kind, config, {}

    def put(self, prefix, **tensors):
        for name, t in tensors.items():
            t = t.detach()
            self.tensors[f"{prefix}.{name}"] = t.clone().contiguous() if t.dtype == torch.int64 else f32(t)

    def save(self, directory):
        path = os.path.join(directory, f"{self.kind}.safetensors")
        meta = {"kind": self.kind, "config": json.dumps(self.config, sort_keys=True), "train": "true"}
        save_file(self.tensors, path, metadata=meta)
        print(f"wrote {path} ({len(self.tensors)} tensors)")


def leaf(*shape, scale=1.0):
    """A float32 random tensor, promoted to a float64 leaf that requires grad."""
    return (torch.randn(*shape) * scale).to(torch.float32).to(torch.float64).requires_grad_(True)


def finish(fx, output, inputs, params, output_name="output"):
    w = torch.randn(output.shape, dtype=torch.float32).to(torch.float64)
    (output * w).sum().backward()
    fx.put("input", output_weights=w)
    fx.put("output", **{output_name: output})
    for name, t in {**inputs, **params}.items():
        if t.requires_grad and t.grad is not None:
            fx.put("grad", **{name: t.grad})


def conv(name, batch, cin, h, w, cout, k, stride, padding, bias):
    fx = Fixture(name, stride=stride, padding=padding, bias=bias)
    x, weight = leaf(batch, cin, h, w), leaf(cout, cin, k, k, scale=0.3)
    params = {"weight": weight}
    if bias:
        params["bias"] = leaf(cout)
    y = F.conv2d(x, weight, params.get("bias"), stride=stride, padding=padding)
    fx.put("input", x=x)
    fx.put("param", **params)
    finish(fx, y, {"x": x}, params)
    return fx


def batchnorm(train):
    fx = Fixture("batchnorm_train" if train else "batchnorm_eval", eps=1e-5, momentum=0.1)
    x = leaf(3, 4, 5, 6, scale=2.0)
    with torch.no_grad():
        x += torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1)
    gamma, beta = leaf(4), leaf(4)
    running_mean = (torch.randn(4) * 0.5).to(torch.float64)
    running_var = (torch.rand(4) + 0.5).to(torch.float64)
    fx.put("param", weight=gamma, bias=beta, running_mean=running_mean, running_var=running_var)
    rm, rv = running_mean.clone(), running_var.clone()
    y = F.batch_norm(x, rm, rv, gamma, beta, training=train, momentum=0.1, eps=1e-5)
    fx.put("input", x=x)
    fx.put("output", running_mean=rm, running_var=rv)
    finish(fx, y, {"x": x}, {"weight": gamma, "bias": beta})
    return fx


def layernorm():
    fx = Fixture("layernorm", eps=1e-12)
    x, gamma, beta = leaf(3, 5, 7, scale=3.0), leaf(7), leaf(7)
    y = F.layer_norm(x, (7,), gamma, beta, eps=1e-12)
    fx.put("input", x=x)
    fx.put("param", weight=gamma, bias=beta)
    finish(fx, y, {"x": x}, {"weight": gamma, "bias": beta})
    return fx


def gelu():
    fx = Fixture("gelu")
    x = leaf(4, 9, scale=3.0)
    fx.put("input", x=x)
    finish(fx, F.gelu(x), {"x": x}, {})
    return fx


def attention():
    # Hugging Face BertSelfAttention's computation: additive dtype-minimum bias on masked keys.
    batch, tokens, heads, head = 2, 5, 2, 4
    fx = Fixture("attention", heads=heads)
    q, k, v = leaf(batch, tokens, heads * head), leaf(batch, tokens, heads * head), leaf(batch, tokens, heads * head)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int64)

    def split(t):
        return t.view(batch, tokens, heads, head).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / head ** 0.5
    bias = (1.0 - mask[:, None, None, :].to(torch.float64)) * torch.finfo(torch.float64).min
    probs = torch.softmax(scores + bias, dim=-1)
    y = (probs @ split(v)).transpose(1, 2).reshape(batch, tokens, heads * head)
    fx.put("input", q=q, k=k, v=v, mask=mask)
    finish(fx, y, {"q": q, "k": k, "v": v}, {})
    return fx


def embedding():
    fx = Fixture("embedding")
    table = leaf(10, 6)
    ids = torch.tensor([[1, 3, 3, 9], [0, 1, 7, 3]], dtype=torch.int64)
    fx.put("input", ids=ids)
    fx.put("param", weight=table)
    finish(fx, F.embedding(ids, table), {}, {"weight": table})
    return fx


def cross_entropy():
    fx = Fixture("cross_entropy")
    logits = leaf(5, 7, scale=2.0)
    targets = torch.tensor([0, 6, 3, 3, 1], dtype=torch.int64)
    fx.put("input", logits=logits, targets=targets)
    finish(fx, F.cross_entropy(logits, targets, reduction="none"), {"logits": logits}, {})
    return fx


def maxpool():
    fx = Fixture("maxpool", kernel=3, stride=2, padding=1)
    x = leaf(2, 3, 9, 8)
    fx.put("input", x=x)
    finish(fx, F.max_pool2d(x, 3, 2, 1), {"x": x}, {})
    return fx


def linear():
    fx = Fixture("linear")
    x, w, b = leaf(4, 3, 6), leaf(5, 6), leaf(5)
    fx.put("input", x=x)
    fx.put("param", weight=w, bias=b)
    finish(fx, F.linear(x, w, b), {"x": x}, {"weight": w, "bias": b})
    return fx


def small_ops():
    fixtures = []
    fx = Fixture("softmax")
    x = leaf(3, 8, scale=3.0)
    fx.put("input", x=x)
    finish(fx, torch.softmax(x, -1), {"x": x}, {})
    fixtures.append(fx)

    fx = Fixture("l2_normalize")
    x = leaf(4, 9)
    fx.put("input", x=x)
    finish(fx, F.normalize(x, dim=-1), {"x": x}, {})
    fixtures.append(fx)

    fx = Fixture("masked_max_pool")
    x = leaf(2, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.int64)
    masked = x.masked_fill(mask[:, :, None] == 0, float("-inf"))
    fx.put("input", x=x, mask=mask)
    finish(fx, masked.max(dim=1).values, {"x": x}, {})
    fixtures.append(fx)

    fx = Fixture("relu")
    x = leaf(3, 7)
    fx.put("input", x=x)
    finish(fx, F.relu(x), {"x": x}, {})
    fixtures.append(fx)

    fx = Fixture("global_avg_pool")
    x = leaf(2, 3, 5, 4)
    fx.put("input", x=x)
    finish(fx, F.adaptive_avg_pool2d(x, 1).flatten(1), {"x": x}, {})
    fixtures.append(fx)
    return fixtures


def adam(decoupled):
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.05
    fx = Fixture("adamw" if decoupled else "adam", lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd, steps=3)
    p = torch.nn.Parameter(torch.randn(13))
    fx.put("param", initial=p)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for step in range(3):
        g = torch.randn(13)
        fx.put("input", **{f"grad{step}": g})
        p.grad = g.clone()
        opt.step()
        fx.put("output", **{f"param{step}": p})
    state = opt.state[p]
    fx.put("output", exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"])
    return fx


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "Tests", "ConvirtCoreTests", "Fixtures", "layers"))
    parser.add_argument("--seed", type=int, default=20201001)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    fixtures = [
        conv("conv2d_3x3_s2_p1", 2, 3, 9, 11, 5, 3, 2, 1, True),
        conv("conv2d_7x7_s2_p3", 1, 3, 20, 17, 4, 7, 2, 3, False),
        conv("conv2d_1x1", 2, 6, 5, 5, 4, 1, 1, 0, False),
        conv("conv2d_1x1_s2", 2, 6, 7, 6, 4, 1, 2, 0, False),
        batchnorm(True), batchnorm(False), layernorm(), gelu(), attention(), embedding(),
        cross_entropy(), maxpool(), linear(), *small_ops(), adam(False), adam(True),
    ]
    for fx in fixtures:
        fx.save(args.out)


if __name__ == "__main__":
    main()
