#!/usr/bin/env python3
"""Writes a parity fixture (DESIGN.md, Files) for convirt's ResNet, BERT or whole ConVIRT model.

The fixture holds the parameters (torchvision / Hugging Face names), the inputs, PyTorch's outputs and
the gradient of every trainable parameter; `convirt parity FIXTURE` compares our model with it.

    pip install torch torchvision transformers safetensors     # CPU wheels are enough
    python3 tools/make_parity_fixture.py --model resnet --config tiny --train --out resnet_tiny.safetensors
    python3 tools/make_parity_fixture.py --model resnet --config resnet50 --batch 2 --out resnet50.safetensors
    python3 tools/make_parity_fixture.py --model bert --config base --batch 2 --tokens 128 --out bert_base.safetensors
    python3 tools/make_parity_fixture.py --model bert --weights DIR --out real.safetensors   # a Hugging Face directory
    python3 tools/make_parity_fixture.py --model convirt --config tiny --train --out convirt_tiny.safetensors
    python3 tools/make_parity_fixture.py --model resnet --config tiny --train --bf16 --out resnet_tiny_bf16.safetensors

--bf16 computes the reference under torch.autocast("cpu", dtype=torch.bfloat16) (PyTorch's CPU mixed
precision: convolutions and matmuls in bf16, their outputs bf16 too) and records `precision: "bf16"` in the
metadata; outputs and gradients are stored as float32, and beside them PyTorch's own float32 results on the same
parameters and inputs as `fp32.output.*` and `fp32.grad.*` (how far autocast itself moves each tensor). The
ConVIRT loss (normalisation, logits, cross entropy) is computed in float32 outside autocast, as convirt's bf16
mode does.

--config is a preset name below or a JSON object in the fixture's config format. Weights are random
(seeded) unless --weights names a torchvision checkpoint (.pth or .safetensors) or a Hugging Face BERT
directory. Dropout is always 0 in fixtures; --train makes BatchNorm use batch statistics.
"""
import argparse
import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import torch_compat  # noqa: F401  (before torchvision and transformers)
import torchvision.models.resnet as tv_resnet

RESNETS = {
    "tiny": {"layers": [1, 1, 1, 1], "width": 4, "block": "bottleneck", "image_size": 32},
    "basic-tiny": {"layers": [2, 1, 1, 1], "width": 4, "block": "basic", "image_size": 40},
    "resnet18": {"layers": [2, 2, 2, 2], "width": 64, "block": "basic", "image_size": 224},
    "resnet50": {"layers": [3, 4, 6, 3], "width": 64, "block": "bottleneck", "image_size": 224},
}
BERTS = {
    "tiny": {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
             "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"},
    "base": {"vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"},
}
CONVIRTS = {
    "tiny": {"image": RESNETS["tiny"], "text": BERTS["tiny"], "proj_hidden": 12, "proj_dim": 6, "tau": 0.1, "lambda": 0.75, "frozen_layers": 1},
    "paper": {"image": RESNETS["resnet50"], "text": BERTS["base"], "proj_hidden": 512, "proj_dim": 512, "tau": 0.1, "lambda": 0.75, "frozen_layers": 6},
}


class ResNetEncoder(tv_resnet.ResNet):
    """torchvision's ResNet (its blocks, _make_layer and forward) with a configurable base width and the
    classifier replaced by the identity, so the output is the pooled feature vector. At width 64 its
    state_dict equals torchvision.models.resnet50()'s without fc."""

    def __init__(self, cfg):
        nn.Module.__init__(self)
        block = tv_resnet.Bottleneck if cfg["block"] == "bottleneck" else tv_resnet.BasicBlock
        w = cfg["width"]
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, w, 1, 1, 64
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, w, cfg["layers"][0])
        self.layer2 = self._make_layer(block, 2 * w, cfg["layers"][1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, cfg["layers"][2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, cfg["layers"][3], stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def randomize_norms(model, generator):
    """Non-trivial BatchNorm and LayerNorm parameters and statistics, so that every path is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))


def make_bert(cfg, weights=None):
    from transformers import BertConfig, BertModel
    if weights:
        config = BertConfig.from_pretrained(weights)
    else:
        config = BertConfig(**cfg)
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    if weights:
        model = BertModel.from_pretrained(weights, config=config, add_pooling_layer=False, attn_implementation="eager")
    else:
        model = BertModel(config, add_pooling_layer=False)
        model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act"]
    return model, {k: getattr(config, k) for k in keys}


def load_resnet_weights(model, path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=True)


def round_to_float32(*modules):
    """Makes float64 parameters exactly representable in float32, so both sides start from the same values."""
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    t.copy_(t.float().to(t.dtype))


def weights_like(out, generator):
    return torch.randn(out.shape, generator=generator).float().to(out.dtype)


def params(module, prefix=""):
    skip = ("num_batches_tracked", "position_ids", "token_type_ids")
    return {f"param.{prefix}{k}": v.detach().clone().float().contiguous()
            for k, v in module.state_dict().items() if not k.endswith(skip)}


def grads(module, prefix=""):
    return {f"grad.{prefix}{k}": p.grad.detach().clone().contiguous() for k, p in module.named_parameters() if p.grad is not None}


def text_inputs(batch, tokens, vocab, generator):
    ids = torch.randint(1, vocab, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    for b in range(1, batch):  # later rows carry padding
        valid = max(1, tokens - (b * tokens) // (batch + 1))
        mask[b, valid:] = 0
        ids[b, valid:] = 0
    return ids, mask


def build(args, bf16):
    """Parameters, inputs, outputs and gradients of one fixture (under autocast when bf16), and its config."""
    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    table = {"resnet": RESNETS, "bert": BERTS, "convirt": CONVIRTS}[args.model]
    cfg = json.loads(args.config) if args.config.strip().startswith("{") else table[args.config]
    cfg = json.loads(json.dumps(cfg))
    tensors = {}
    if args.float64:
        torch.set_default_dtype(torch.float64)

    if args.model == "resnet":
        if args.image_size:
            cfg["image_size"] = args.image_size
        model = ResNetEncoder(cfg)
        if args.weights:
            load_resnet_weights(model, args.weights)
        elif not args.default_init:
            randomize_norms(model, gen)
        model.train(args.train)
        round_to_float32(model)
        tensors.update(params(model))
        images = torch.randn(args.batch, 3, cfg["image_size"], cfg["image_size"], generator=gen).float().to(torch.get_default_dtype())
        with amp():
            out = model(images)
        out = out.to(torch.get_default_dtype())
        w = weights_like(out, gen)
        (out * w).sum().backward()
        tensors.update({"input.images": images, "output.features": out.detach(), "input.output_weights": w})
        tensors.update(grads(model))

    elif args.model == "bert":
        model, cfg = make_bert(cfg, args.weights)
        if not args.weights:
            randomize_norms(model, gen)
        model.train(args.train)
        round_to_float32(model)
        tensors.update(params(model))
        ids, mask = text_inputs(args.batch, args.tokens, cfg["vocab_size"], gen)
        with amp():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = out.to(torch.get_default_dtype())
        w = weights_like(out, gen)
        (out * w).sum().backward()
        tensors.update({"input.input_ids": ids, "input.attention_mask": mask, "output.last_hidden_state": out.detach(), "input.output_weights": w})
        tensors.update(grads(model))

    else:
        if args.image_size:
            cfg["image"]["image_size"] = args.image_size
        image = ResNetEncoder(cfg["image"])
        text, cfg["text"] = make_bert(cfg["text"])
        randomize_norms(image, gen)
        randomize_norms(text, gen)
        feat = cfg["image"]["width"] * 8 * (4 if cfg["image"]["block"] == "bottleneck" else 1)
        image_head = nn.Sequential(nn.Linear(feat, cfg["proj_hidden"]), nn.ReLU(), nn.Linear(cfg["proj_hidden"], cfg["proj_dim"]))
        text_head = nn.Sequential(nn.Linear(cfg["text"]["hidden_size"], cfg["proj_hidden"]), nn.ReLU(), nn.Linear(cfg["proj_hidden"], cfg["proj_dim"]))
        k = cfg["frozen_layers"]
        if k > 0:
            for p in text.embeddings.parameters():
                p.requires_grad_(False)
            for layer in text.encoder.layer[:k]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        for m in (image, text, image_head, text_head):
            m.train(args.train)
        round_to_float32(image, text, image_head, text_head)
        for prefix, m in (("image.", image), ("text.", text), ("image_head.", image_head), ("text_head.", text_head)):
            tensors.update(params(m, prefix))
        images = torch.randn(args.batch, 3, cfg["image"]["image_size"], cfg["image"]["image_size"], generator=gen).float().to(torch.get_default_dtype())
        ids, mask = text_inputs(args.batch, args.tokens, cfg["text"]["vocab_size"], gen)
        with amp():
            zv = image_head(image(images))
            hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = hidden.masked_fill(mask[:, :, None] == 0, float("-inf")).max(dim=1).values
            zu = text_head(pooled)
        dtype = torch.get_default_dtype()
        v, u = F.normalize(zv.to(dtype), dim=-1), F.normalize(zu.to(dtype), dim=-1)
        logits = v @ u.t() / cfg["tau"]
        targets = torch.arange(args.batch)
        loss = cfg["lambda"] * F.cross_entropy(logits, targets) + (1 - cfg["lambda"]) * F.cross_entropy(logits.t(), targets)
        loss.backward()
        tensors.update({"input.images": images, "input.input_ids": ids, "input.attention_mask": mask,
                        "output.image_embeddings": v.detach(), "output.text_embeddings": u.detach(), "output.loss": loss.detach().reshape(())})
        for prefix, m in (("image.", image), ("text.", text), ("image_head.", image_head), ("text_head.", text_head)):
            tensors.update(grads(m, prefix))

    tensors = {k: (v.contiguous() if v.dtype == torch.int64 else v.float().contiguous()) for k, v in tensors.items()}
    return tensors, cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["resnet", "bert", "convirt"], required=True)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=0, help="overrides the config's image size")
    ap.add_argument("--train", action="store_true", help="BatchNorm uses batch statistics")
    ap.add_argument("--weights", help="torchvision checkpoint (resnet) or Hugging Face directory (bert)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--default-init", action="store_true",
                    help="keep torchvision's BatchNorm initialisation (weight 1, bias 0) instead of random norms; deep training-mode "
                         "ResNets with random norms are so ill-conditioned that even PyTorch's float32 gradients differ from float64 by 20%%")
    ap.add_argument("--float64", action="store_true",
                    help="compute the reference in float64 (stored as float32): the exact answer, so the fixture measures our rounding alone")
    ap.add_argument("--bf16", action="store_true", help="the reference under torch.autocast('cpu', dtype=torch.bfloat16)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.bf16 and args.float64:
        ap.error("--bf16 and --float64 exclude each other")

    tensors, cfg = build(args, args.bf16)
    if args.bf16:
        # PyTorch's own fp32 results on the same parameters and inputs: how far autocast itself moves each
        # tensor, which `convirt parity` uses to widen the limit of tensors that bf16 determines only loosely.
        reference, _ = build(args, False)
        for k, v in reference.items():
            if k.startswith(("param.", "input.")):
                assert torch.equal(v, tensors[k]), f"{k} differs between the two passes"
            else:
                tensors[f"fp32.{k}"] = v
    meta = {"model": args.model, "train": "true" if args.train else "false", "config": json.dumps(cfg, sort_keys=True)}
    if args.bf16:
        meta["precision"] = "bf16"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: {args.model}, {len(tensors)} tensors, {os.path.getsize(args.out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
