#!/usr/bin/env python3
"""Reference values for the optimizers and losses, recorded from a real PyTorch run.

    /usr/bin/python3 tests/data/recorded/gen_training_fixtures.py tests/data/recorded/training.safetensors

Needs torch (Debian's python3-torch is enough); writes the safetensors file with the standard
library. float64 throughout. Deterministic.
"""
import json
import struct
import sys

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
g = torch.Generator().manual_seed(1234)
t = {}


def randn(*shape):
    return torch.randn(*shape, generator=g)


STEPS = 5
p0 = randn(3, 5)
grads = [randn(3, 5) for _ in range(STEPS)]
t["param0"] = p0
for i, gr in enumerate(grads):
    t[f"grad{i}"] = gr


def run(opt_cls, name, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for i, gr in enumerate(grads):
        p.grad = gr.clone()
        opt.step()
        t[f"{name}.step{i}"] = p.detach().clone()


cases = {
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_defaults": (torch.optim.AdamW, dict()),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_plain": (torch.optim.SGD, dict(lr=0.05)),
}
for name, (cls, kw) in cases.items():
    run(cls, name, **kw)

# clip_grad_norm_ over two parameters
a = torch.nn.Parameter(randn(2, 3))
b = torch.nn.Parameter(randn(4, 1))
a.grad, b.grad = randn(2, 3), randn(4, 1)
t["clip.grad_a"], t["clip.grad_b"] = a.grad.clone(), b.grad.clone()
norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=0.5)
t["clip.norm"] = norm.reshape(1)
t["clip.clipped_a"], t["clip.clipped_b"] = a.grad.clone(), b.grad.clone()

# losses
logits = (randn(6, 4) * 3).requires_grad_(True)
labels = torch.tensor([0, 3, 1, 1, 2, 0])
t["ce.logits"], t["ce.labels"] = logits.detach().clone(), labels
for eps in (0.0, 0.1):
    logits.grad = None
    loss = F.cross_entropy(logits, labels, label_smoothing=eps)
    loss.backward()
    t[f"ce{eps}.loss"], t[f"ce{eps}.grad"] = loss.detach().reshape(1), logits.grad.clone()
y = randn(4, 3).requires_grad_(True)
target = randn(4, 3)
loss = F.mse_loss(y, target)
loss.backward()
t["mse.y"], t["mse.target"], t["mse.loss"], t["mse.grad"] = y.detach().clone(), target, loss.detach().reshape(1), y.grad.clone()

meta = {"kind": "training", "torch_version": torch.__version__, "steps": STEPS,
        "optimizers": {k: v[1] for k, v in cases.items()}, "clip_max_norm": 0.5, "label_smoothing": [0.0, 0.1]}

# safetensors, written by hand: 8-byte header length, JSON header, data
DT = {torch.float64: ("F64", "d"), torch.int64: ("I64", "q")}
header, blobs, off = {"__metadata__": {"case": json.dumps(meta)}}, [], 0
for name in sorted(t):
    x = t[name].contiguous()
    dt, fmt = DT[x.dtype]
    raw = struct.pack("<%d%s" % (x.numel(), fmt), *x.flatten().tolist())
    header[name] = {"dtype": dt, "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
    off += len(raw)
    blobs.append(raw)
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
print("wrote", sys.argv[1], len(t), "tensors, torch", torch.__version__)
