"""Input checks shared by the ops: clear errors naming the argument and what was expected.

Shape, dtype and device checks are free. Value checks (NaN/Inf, label range) need one
host synchronisation per call; they are skipped while torch.compile traces or a CUDA
graph captures, and can be switched off with `set_value_checks(False)` or the
environment variable RTMDET_CHECK_VALUES=0 for the last microseconds in training loops.
"""
import os
from contextlib import contextmanager

import torch

_value_checks = os.environ.get("RTMDET_CHECK_VALUES", "1") != "0"


def set_value_checks(enabled: bool) -> bool:
    """Turn the NaN/Inf and label-range checks on or off; returns the previous setting."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


@contextmanager
def value_checks(enabled: bool):
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def value_checks_active(*tensors) -> bool:
    if not _value_checks:
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name, t, *, ndim=None, last=None, floating=None, integer=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got {describe(t)}")
    if last is not None and (t.dim() == 0 or t.shape[-1] != last):
        raise ValueError(f"{name} must have last dimension {last}, got {describe(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {describe(t)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def check_dim(name, t, dim, expected, what):
    if t.shape[dim] != expected:
        raise ValueError(f"{name} dimension {dim} must be {expected} ({what}), got {describe(t)}")


def check_values(finite=(), labels=None):
    """Raise ValueError for non-finite entries or labels outside their range.

    finite: (name, tensor) pairs that must be free of NaN and Inf.
    labels: (name, tensor, low, high, mask) with low <= t < high where mask (or everywhere).
    One host synchronisation for all of it; details are computed only on failure.
    """
    finite = [(n, t) for n, t in finite if t is not None and t.numel() > 0]
    tensors = [t for _, t in finite] + ([labels[1]] if labels is not None else [])
    if not tensors or not value_checks_active(*tensors):
        return
    flags = [torch.isfinite(t).all() for _, t in finite]
    if labels is not None and labels[1].numel() > 0:
        name, lab, low, high, mask = labels
        ok = (lab >= low) & (lab < high)
        if mask is not None:
            ok = ok | ~mask
        flags.append(ok.all())
    if not flags or bool(torch.stack(flags).all()):
        return
    for (name, t), flag in zip(finite, flags):
        if not bool(flag):
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise ValueError(f"{name} must be finite, found {t[tuple(bad)].item()} at index "
                             f"{tuple(bad)} ({describe(t)})")
    name, lab, low, high, mask = labels
    ok = (lab >= low) & (lab < high)
    if mask is not None:
        ok = ok | ~mask
    bad = (~ok).nonzero()[0].tolist()
    raise ValueError(f"{name} must lie in [{low}, {high}), found {lab[tuple(bad)].item()} at "
                     f"index {tuple(bad)} ({describe(lab)})")
