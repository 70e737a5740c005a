"""Read and write mmdetection 3.x RTMDet checkpoints.

Our modules carry mmdet's names, so keys map one to one (`backbone.stem.0.conv.weight`,
`neck.reduce_layers.0.bn.running_mean`, `bbox_head.rtm_cls.2.bias`, ...). The head's shared
convs appear once per level in mmdet's state dict (`bbox_head.cls_convs.{level}.{i}.conv.
weight`): the copies must be equal, level 0 is loaded.

BatchNorm settings: mmdetection's own RTMDet configs train with SyncBN at its defaults
(momentum 0.1, eps 1e-5), mmyolo's (and SPEC's) with momentum 0.03, eps 1e-3. eps is not
stored in a checkpoint, so `load_mmdet_state_dict` sets every BatchNorm's eps to `bn_eps`
(default 1e-5, mmdetection's) so that a loaded model reproduces mmdetection's outputs; pass
bn_eps=None to keep the model's own (1e-3 for mmyolo-trained weights).
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping

import torch
from torch import nn

_SHARED = re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(\d+)\.conv\.(weight|bias)$")
_IGNORED_PREFIXES = ("data_preprocessor.",)


def to_mmdet_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's weights in mmdet's key layout (shared head convs repeated per level)."""
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def _unwrap(state_dict, use_ema):
    """Accept a bare state dict or a checkpoint dict; pick the raw or the EMA weights."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        if use_ema and isinstance(state_dict.get("ema_state_dict"), Mapping):
            # mmengine's EMAHook: ema_state_dict holds the averaged model as `module.<key>`
            ema = state_dict["ema_state_dict"]
            return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
        state_dict = state_dict["state_dict"]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in state_dict.items()}
    if use_ema and any(k.startswith("ema_") for k in state_dict):
        # mmdet 2.x EMA hook: buffers named "ema_" + key with dots replaced by underscores
        # (parameters only: buffers such as BN statistics keep their raw values)
        out = {k: v for k, v in state_dict.items() if not k.startswith("ema_")}
        for k in list(out):
            ema_key = "ema_" + k.replace(".", "_")
            if ema_key in state_dict:
                out[k] = state_dict[ema_key]
        return out
    if use_ema:
        raise ValueError("load_mmdet_state_dict(use_ema=True): the checkpoint holds no EMA "
                         "weights (no 'ema_state_dict' entry and no 'ema_' keys)")
    return state_dict


def load_mmdet_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                          use_ema: bool = False, bn_eps: float = 1e-5) -> nn.Module:
    """Load an mmdetection RTMDet state dict (or whole checkpoint dict) into `model`, strictly.

    Ignored: `data_preprocessor.*` and the `ema_*` buffers of mmdet 2.x EMA hooks (with
    use_ema=True those, or a checkpoint's `ema_state_dict`, are loaded instead). The per-level
    copies of each shared head conv must be equal. Raises KeyError listing missing and
    unexpected keys, ValueError for shape mismatches. BatchNorm eps is set to `bn_eps`
    (mmdetection trains RTMDet with eps 1e-5; None keeps the model's). Returns the model.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_mmdet_state_dict: state_dict must be a mapping, got "
                        f"{type(state_dict).__name__}")
    sd = _unwrap(state_dict, use_ema)
    sd = {k: v for k, v in sd.items()
          if not k.startswith(_IGNORED_PREFIXES) and not k.startswith("ema_")}

    shared: Dict[tuple, torch.Tensor] = {}
    for k, v in sd.items():
        m = _SHARED.match(k)
        if m and m.group(2) == "0":
            shared[(m.group(1), m.group(3), m.group(4))] = v
    for k, v in sd.items():
        m = _SHARED.match(k)
        if m and m.group(2) != "0":
            first = shared.get((m.group(1), m.group(3), m.group(4)))
            if first is not None and not torch.equal(first, v):
                raise ValueError(f"load_mmdet_state_dict: {k} differs from its level-0 copy; "
                                 "the SepBN head shares conv weights across levels")
            if first is not None:
                sd[k] = first

    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise KeyError(f"load_mmdet_state_dict: the checkpoint does not fit this model; "
                       f"missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]")
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        hint = " (num_classes differs?)" if any(w.startswith("bbox_head.rtm_cls") for w in wrong) else ""
        raise ValueError(f"load_mmdet_state_dict: shape mismatch{hint}: " + "; ".join(wrong[:10]))
    model.load_state_dict(sd, strict=True)
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = bn_eps
    return model
