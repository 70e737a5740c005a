"""Input checks shared by the ops: clear errors naming the argument and what was expected.

Shape, dtype and device checks are free. Value checks (NaN/Inf, label range) need one
host synchronisation per call; they are skipped while torch.compile traces or a CUDA
graph captures, and can be switched off with `set_value_checks(False)` or the
environment variable RTMDET_CHECK_VALUES=0 for the last microseconds in training loops.
"""
import math
import numbers
import operator
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


def _is_fake(t):
    # Meta and fake tensors (torch.compile tracing, FakeTensorMode, opcheck) have no values.
    return t.is_meta or isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def value_checks_active(*tensors) -> bool:
    if not _value_checks:
        return False
    if torch.compiler.is_compiling():
        return False
    if any(_is_fake(t) for t in tensors):
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


def check_values(finite=(), labels=None, positive=()):
    """Raise ValueError for non-finite entries or labels outside their range.

    finite: (name, tensor) pairs that must be free of NaN and Inf.
    labels: (name, tensor, low, high, mask) with low <= t < high where mask (or everywhere).
    positive: (name, tensor) pairs that must be finite and > 0 everywhere.
    One host synchronisation for all of it; details are computed only on failure.
    """
    finite = [(n, t) for n, t in finite if t is not None and t.numel() > 0]
    positive = [(n, t) for n, t in positive if t is not None and t.numel() > 0]
    tensors = ([t for _, t in finite] + [t for _, t in positive]
               + ([labels[1]] if labels is not None else []))
    if not tensors or not value_checks_active(*tensors):
        return
    flags = [torch.isfinite(t).all() for _, t in finite]
    flags += [(torch.isfinite(t) & (t > 0)).all() for _, t in positive]
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
    for (name, t), flag in zip(positive, flags[len(finite):]):
        if not bool(flag):
            raise ValueError(f"{name} must be finite and > 0, found {t.reshape(-1)[0].item()} "
                             f"({describe(t)})")
    name, lab, low, high, mask = labels
    ok = (lab >= low) & (lab < high)
    if mask is not None:
        ok = ok | ~mask
    bad = (~ok).nonzero()[0].tolist()
    raise ValueError(f"{name} must lie in [{low}, {high}), found {lab[tuple(bad)].item()} at "
                     f"index {tuple(bad)} ({describe(lab)})")


def check_int(op, name, value, *, low):
    """An integer-like hyper-parameter (int, numpy integer, 0-d integer tensor) >= low -> int."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be an integer >= {low}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: {name} must be an integer >= {low}, got {value!r} "
                         f"({type(value).__name__})") from None
    if number < low:
        raise ValueError(f"{op}: {name} must be an integer >= {low}, got {number}")
    return number


def is_finite_number(x):
    """math.isfinite by comparisons only: torch.compile traces these for a symbolic float,
    while math.isfinite of one is a graph break."""
    return x == x and -math.inf < x < math.inf


def check_real(op, name, value, *, low=None, positive=False):
    """A float hyper-parameter: a real number (int, float, numpy scalar, 0-d tensor), finite,
    >= low (or > 0 with positive=True) -> float. NaN and +-inf are refused."""
    bound = "> 0" if positive else (f">= {low}" if low is not None else "finite")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{op}: {name} must be a real number, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a finite real number {bound}, got {value!r}")
    number = float(value)
    if not is_finite_number(number):
        raise ValueError(f"{op}: {name} must be a finite real number {bound}, got {number}")
    if positive and not number > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {number}")
    if low is not None and number < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {number}")
    return number
