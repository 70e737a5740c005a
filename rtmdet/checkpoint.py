"""Read and write mmdetection 3.x RTMDet checkpoints; read mmyolo 0.6 ones.

Our modules carry mmdet's names, so keys map one to one (`backbone.stem.0.conv.weight`,
`neck.reduce_layers.0.bn.running_mean`, `bbox_head.rtm_cls.2.bias`, ...). The head's shared
convs appear once per level in mmdet's state dict (`bbox_head.cls_convs.{level}.{i}.conv.
weight`): the copies must be equal, level 0 is loaded.

BatchNorm settings: mmdetection's own RTMDet configs train with SyncBN at its defaults
(momentum 0.1, eps 1e-5), and so do mmyolo 0.6's RTMDet configs (plain BN); momentum 0.03,
eps 1e-3 (SPEC's and our model's default) is mmyolo's YOLOv5/6/8 setting. eps is not
stored in a checkpoint, so `load_mmdet_state_dict` sets every BatchNorm's eps to `bn_eps`
(default 1e-5, mmdetection's) so that a loaded model reproduces mmdetection's outputs; pass
bn_eps=None to keep the model's own.

mmyolo 0.6 RTMDet checkpoints (`load_mmyolo_state_dict`) share the backbone keys, name and
group the neck's layers differently (`neck.top_down_layers.0.1` is our `neck.reduce_layers.1`)
and nest the head one level deeper (`bbox_head.head_module.rtm_cls.0.weight`); its heads
never apply exp() to the regression output, m/l/x included.

Both loaders also take a path to a `.pth` file, read with `torch.load(weights_only=True)`:
a file that needs arbitrary objects unpickled is refused, never loaded unsafely.
"""
import os
import pickle
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


def _read(state_dict, name):
    """A mapping as given, or the contents of a checkpoint file read without unpickling code."""
    if isinstance(state_dict, (str, os.PathLike)):
        try:
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{name}: {os.fspath(state_dict)!r} holds objects other than tensors and plain "
                "containers (e.g. mmengine's message_hub or optimizer state), and it is only "
                "read with torch.load(weights_only=True). If you trust the file, load it "
                "yourself and pass ckpt['state_dict'], or re-save just the state dict. "
                f"torch says: {str(e).splitlines()[0]}") from None
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name}: state_dict must be a mapping or a path to a .pth file, got "
                        f"{type(state_dict).__name__}")
    return state_dict


def _unwrap(state_dict, use_ema, name="load_mmdet_state_dict"):
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
        raise ValueError(f"{name}(use_ema=True): the checkpoint holds no EMA "
                         "weights (no 'ema_state_dict' entry and no 'ema_' keys)")
    return state_dict


def load_mmdet_state_dict(model: nn.Module, state_dict, *,
                          use_ema: bool = False, bn_eps: float = 1e-5) -> nn.Module:
    """Load an mmdetection RTMDet state dict, checkpoint dict or `.pth` path into `model`, strictly.

    Ignored: `data_preprocessor.*` and the `ema_*` buffers of mmdet 2.x EMA hooks (with
    use_ema=True those, or a checkpoint's `ema_state_dict`, are loaded instead). The per-level
    copies of each shared head conv must be equal. Raises KeyError listing missing and
    unexpected keys, ValueError for shape mismatches. BatchNorm eps is set to `bn_eps`
    (mmdetection trains RTMDet with eps 1e-5; None keeps the model's). Returns the model.
    """
    name = "load_mmdet_state_dict"
    sd = _unwrap(_read(state_dict, name), use_ema, name)
    sd = {k: v for k, v in sd.items()
          if not k.startswith(_IGNORED_PREFIXES) and not k.startswith("ema_")}
    return _load_strict(model, sd, name, bn_eps)


def load_mmyolo_state_dict(model: nn.Module, state_dict, *, use_ema: bool = False,
                           bn_eps: float = 1e-5) -> nn.Module:
    """Load an mmyolo 0.6 RTMDet state dict, checkpoint dict or `.pth` path into `model`.

    As `load_mmdet_state_dict`, with mmyolo's neck and head keys (`bbox_head.head_module.*`)
    mapped to ours. mmyolo's heads never apply exp() to the regression output, so the model must be built
    with exp_on_reg=False (the m/l/x presets have it on, as mmdetection's). BatchNorm eps is set
    to `bn_eps` (1e-5: mmyolo's RTMDet configs use BN at its defaults). Returns the model.
    """
    name = "load_mmyolo_state_dict"
    head = getattr(model, "bbox_head", None)
    if getattr(head, "exp_on_reg", False):
        raise ValueError(f"{name}: mmyolo's RTMDet heads do not apply exp() to the regression "
                         "output, but this model does (exp_on_reg=True); build it with "
                         "RTMDet.from_name(size, num_classes=..., exp_on_reg=False)")
    sd = _unwrap(_read(state_dict, name), use_ema, name)
    levels = len(getattr(getattr(model, "neck", None), "in_channels", (0, 0, 0)))
    sd = {_from_mmyolo_key(k, levels): v for k, v in sd.items()
          if not k.startswith(_IGNORED_PREFIXES)}
    return _load_strict(model, sd, name, bn_eps)


def _from_mmyolo_key(key, levels):
    """mmyolo key -> ours. mmyolo's CSPNeXtPAFPN (BaseYOLONeck) keeps one reduce conv per
    level (identities but the last) and puts the next level's reduce conv inside the top-down
    layer (`top_down_layers.j` = Sequential(CSP, conv)); mmdet's lists them separately."""
    if key.startswith("bbox_head.head_module."):
        return "bbox_head." + key[len("bbox_head.head_module."):]
    if not key.startswith("neck."):
        return key
    rest = key[len("neck."):]
    m = re.match(r"(reduce_layers|top_down_layers)\.(\d+)\.(.*)$", rest)
    if m and m.group(1) == "reduce_layers" and int(m.group(2)) == levels - 1:
        rest = "reduce_layers.0." + m.group(3)
    elif m and m.group(1) == "top_down_layers":
        j, tail = int(m.group(2)), m.group(3)
        if tail.startswith("0."):
            rest = f"top_down_blocks.{j}.{tail[2:]}"
        elif tail.startswith("1."):
            rest = f"reduce_layers.{j + 1}.{tail[2:]}"
        else:
            rest = f"top_down_blocks.{j}.{tail}"
    else:
        for theirs, ours in (("downsample_layers.", "downsamples."),
                             ("bottom_up_layers.", "bottom_up_blocks."),
                             ("out_layers.", "out_convs.")):
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
    return "neck." + rest


def _load_strict(model, sd, name, bn_eps):
    """Check the shared head convs and the key/shape fit, load strictly, set BN eps."""
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
                raise ValueError(f"{name}: {k} differs from its level-0 copy; "
                                 "the SepBN head shares conv weights across levels")
            if first is not None:
                sd[k] = first

    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise KeyError(f"{name}: the checkpoint does not fit this model; "
                       f"missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]")
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        hint = " (num_classes differs?)" if any(w.startswith("bbox_head.rtm_cls") for w in wrong) else ""
        raise ValueError(f"{name}: shape mismatch{hint}: " + "; ".join(wrong[:10]))
    model.load_state_dict(sd, strict=True)
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = bn_eps
    return model
