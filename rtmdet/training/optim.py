"""AdamW with the recipe's parameter groups; fused on CUDA, PyTorch's default on the CPU."""
import torch
from torch import nn

ADAMW_IMPLS = ("auto", "fused", "foreach", "for-loop")


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on normalisation layers and biases (mmdet's
    norm_decay_mult=0, bias_decay_mult=0)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model, lr, weight_decay, device, impl="auto"):
    """AdamW(betas 0.9/0.999). impl "auto": fused on CUDA (one kernel for all parameters);
    on the CPU PyTorch's default (per-tensor loop), which keeps CPU runs bitwise as before."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"adamw: expected one of {', '.join(ADAMW_IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "for-loop"
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True},
          "for-loop": {"foreach": False}}[impl]
    if impl == "for-loop" and device.type == "cpu":
        kw = {}   # the CPU default is the loop; leave the saved state as it always was
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), **kw)
