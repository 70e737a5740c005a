"""A stand-in for mmcv's compiled extension `mmcv._ext`, for tests against real mmdet/mmyolo.

mmcv-lite ships no compiled ops, but `import mmdet.models` imports `mmcv.ops`, which loads
`mmcv._ext` and checks that each op name exists. Nothing on the code paths our tests run
(RTMDet heads, assigners, losses, DETR matching) calls a compiled mmcv op, so every name
resolves to a function that raises if it is ever called.
"""
import sys
import types


class _MissingOp:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"mmcv._ext.{self.name} was called, but tests run with mmcv-lite, "
                           "which has no compiled ops (tests/mmcv_stub.py)")


def install_mmcv_ext_stub():
    """Register the stand-in as `mmcv._ext` unless a real extension is importable."""
    if "mmcv._ext" in sys.modules:
        return sys.modules["mmcv._ext"]
    try:
        import mmcv._ext as real  # noqa: F401  (a full mmcv build: use it)
        return real
    except ImportError:
        pass
    mod = types.ModuleType("mmcv._ext")
    mod.__getattr__ = lambda name: _MissingOp(name)  # module-level __getattr__ (PEP 562)
    mod.__file__ = __file__
    sys.modules["mmcv._ext"] = mod
    return mod
