"""Which implementations of the ops exist here, and how `backend=` picks one.

Backends: "torch" (the plain-PyTorch reference, always there), "triton" (kernels/,
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpp" (csrc/ CPU ops) and
"cuda" (csrc/ CUDA ops). "auto" takes the fastest one that exists for the tensors'
device and falls back to "torch" with a one-time warning.
"""
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


def native_module():
    """The compiled extension `rtmdet._C`, or None with the reason in `native_error()`."""
    # Cached in plain globals (not functools.lru_cache) so torch.compile reads the result
    # as a constant instead of tracing into importlib; rtmdet.ops._native fills them at import.
    if not _native_cache:
        try:
            mod = importlib.import_module("rtmdet._C")
            ops = frozenset(getattr(mod, "registered_ops", lambda: [])())
            cuda = bool(getattr(mod, "with_cuda", lambda: False)())
            _native_cache.append((mod, ops, cuda))
        except Exception as exc:  # a missing or broken build must never break `import rtmdet`
            _native_error.append(f"{type(exc).__name__}: {exc}")
            _native_cache.append((None, frozenset(), False))
    return _native_cache[0][0]


_native_cache = []
_native_error = []


def native_error():
    native_module()
    return _native_error[0] if _native_error else None


def native_ops():
    """Names of the ops the compiled extension registered in torch.ops.rtmdet."""
    native_module()
    return _native_cache[0][1]


def cuda_built():
    native_module()
    return _native_cache[0][2]


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable():
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def available_backends(device="cpu"):
    """Backends that can run ops on tensors of `device` here, fastest first, "torch" last."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if triton_importable():
            found.append("triton")
        if cuda_built():
            found.append("cuda")
    elif native_module() is not None:
        found.append("cpp")  # the Triton interpreter is for tests only: never picked by "auto"
    found.append("torch")
    return found


def backend_info():
    """A dict describing what is available, for `python -m rtmdet info` and bug reports."""
    return {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "triton_importable": triton_importable(),
        "triton_interpret": triton_interpret(),
        "native_built": native_module() is not None,
        "native_error": native_error(),
        "native_ops": sorted(native_ops()),
        "native_cuda": cuda_built(),
        "cpu_backends": available_backends("cpu"),
        "cuda_backends": available_backends("cuda") if torch.cuda.is_available() else [],
    }


_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(op, backend, device, implemented):
    """Pick the backend that runs `op` on `device`.

    implemented: the backends this op has an implementation for (besides "torch").
    An explicit backend that cannot run raises RuntimeError saying why and how to get it;
    "auto" falls back to "torch" with a one-time warning when no fast path exists.
    """
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    # CUDA answers are cached: an eager training step calls this several times per step and
    # is bound by host time (CPU answers are not, so tests can monkeypatch what is built)
    key = (op, backend, device.index, tuple(implemented)) if device.type == "cuda" else None
    found = _resolved.get(key) if key is not None else None
    if found is not None:
        return found
    found = _resolve(op, backend, device, implemented)
    if key is not None:
        _resolved[key] = found
    return found


_resolved = {}


def _resolve(op, backend, device, implemented):
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in available_backends(device):
            if name == "torch" or (name in implemented and _can_run(op, name, device) is None):
                if name == "torch":
                    _warn_once((op, device.type), _fallback_message(op, device, implemented))
                return name
        return "torch"
    # Say first why the backend cannot run here at all (e.g. the extension is not built),
    # then whether this op lacks an implementation in it.
    why = _can_run(op, backend, device)
    if why is None and backend not in implemented:
        why = f"rtmdet has no {backend!r} implementation of {op} yet"
    if why is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
    return backend


def _can_run(op, backend, device):
    """None if `backend` can run `op` on `device`, else the reason it cannot."""
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "meta":
            return ("meta tensors hold no data for the Triton kernels; use backend='auto' or "
                    "'torch' for shapes (torch.compile traces the Triton ops with fake tensors)")
        if device.type != "cuda" and not triton_interpret():
            return (f"tensors are on {device.type}; Triton kernels need CUDA tensors "
                    "(or TRITON_INTERPRET=1 for the CPU interpreter)")
        return None
    if backend in ("cpp", "cuda"):
        if native_module() is None:
            return ("the rtmdet._C extension is not built "
                    f"({native_error()}); reinstall with `pip install -e . --no-build-isolation` "
                    "with RTMDET_NO_NATIVE unset")
        want = "cuda" if backend == "cuda" else "cpu"
        if device.type not in (want, "meta"):  # meta: the registered fake kernels give shapes
            return f"tensors are on {device.type} but backend {backend!r} runs on {want}"
        if backend == "cuda" and not cuda_built():
            return "the extension was built without CUDA (needs a CUDA build of torch and nvcc)"
        if op not in native_ops():
            return f"the built rtmdet._C has no {op} (rebuild the extension)"
        return None
    return None


def _fallback_message(op, device, implemented):
    fast = [b for b in implemented if b != "torch"]
    if not fast:
        return f"rtmdet.ops.{op}: no fast path on {device.type}; using the PyTorch reference"
    reasons = "; ".join(f"{b}: {_can_run(op, b, device)}" for b in fast)
    return (f"rtmdet.ops.{op}: no fast path available on {device.type} ({reasons}); "
            "falling back to the slower PyTorch reference")
