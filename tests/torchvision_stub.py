"""A stand-in for torchvision's compiled ops, for tests against real ultralytics on CPU torch.

PyPI's torchvision 0.28.0 wheel links against CUDA torch libraries, so with the CPU build of
torch 2.13 its `_C.so` fails to load (`libc10_cuda.so` is missing). torchvision then still
registers fake kernels for `torchvision::nms` / `qnms` at import, which fails with "operator
torchvision::nms does not exist", so `import torchvision` (which ultralytics' validator does)
fails. When, and only when, `_C` cannot load, `install_torchvision_ops_stub()` defines those two
operator schemas before torchvision is imported, with a CPU kernel for `nms` (the only compiled
op that ultralytics' detection training and validation call) from `rtmdet.ops.nms`, which keeps
torchvision's contract (drop IoU > threshold, kept indices by decreasing score). Every other
torchvision op stays missing and fails if called. Where torchvision's `_C` loads (a matching
CUDA torch), nothing is changed.
"""
import importlib.util
import os
import sys

import torch

_LIB = None  # the torch.library fragment; kept alive for the process


def _compiled_ops_load(package_dir):
    """Whether torchvision's own `_C` extension loads here (then no stand-in is needed)."""
    for name in os.listdir(package_dir):
        if not (name.startswith("_C") and name.endswith((".so", ".pyd"))):
            continue
        try:
            torch.ops.load_library(os.path.join(package_dir, name))
            return True
        except OSError:
            return False
    return False


def _nms_cpu(dets, scores, iou_threshold):
    from rtmdet import ops
    return ops.nms(dets, scores, iou_threshold)


def install_torchvision_ops_stub():
    """Make `import torchvision` work without its compiled ops. Returns True if installed."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return _LIB is not None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _compiled_ops_load(spec.submodule_search_locations[0]):
        return False
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.impl("nms", _nms_cpu, "CPU")
    import torchvision.extension
    # torchvision.ops.nms asks `_has_ops()` before calling the op; nms now exists
    torchvision.extension._has_ops = lambda: True
    return True
