"""Training checkpoints: a safe format, atomic writes, the last two kept, exact RNG states.

A checkpoint holds only tensors, numbers, strings, None, lists and dicts (the RNG states as
tensors, the config as a plain dict), so it loads with `torch.load(weights_only=True)` and
a file from someone else cannot run code. Files are written to a temporary name, fsynced
and renamed; the previous `last.pth` becomes `prev.pth`, which `--resume auto` falls back
to when `last.pth` is corrupt. The training loop writes them in a background thread from
host buffers reused across checkpoints (`CheckpointWriter`).
"""
import os
import pickle
import random
import threading
from pathlib import Path

import numpy as np
import torch

FORMAT = "rtmdet-train-v2"
LAST, PREV = "last.pth", "prev.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file."""


# ------------------------------------------------------------------------------ RNG states

def rng_state():
    """This process's Python, numpy, torch (and CUDA) RNG states as tensors and numbers."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": torch.tensor(py_state, dtype=torch.int64), "python_version": py_version,
             "python_gauss": py_gauss,
             "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
             "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------- save / load

def save_checkpoint(path, state, keep_previous=True):
    """Write `state` to `path` atomically (temporary file, fsync, rename); the file it replaces
    becomes `prev.pth` beside it when keep_previous."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state, format=FORMAT), f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.is_file():
        prev = path.with_name(PREV)
        link = path.with_name(PREV + ".tmp")
        try:   # a hard link keeps last.pth in place until the new one replaces it
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, prev)
        except OSError:
            os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path):
    """The dict saved by `save_checkpoint`, read with weights_only=True. A file that needs
    unsafe unpickling, is corrupt, or is no rtmdet training checkpoint raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors, numbers, strings, "
                "lists and dicts (an old-format or foreign file); loading it could run arbitrary "
                "code, so it is refused. Re-create it with this version of `rtmdet train`, or "
                "convert it yourself if you trust its source") from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({e})") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        found = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not an rtmdet training checkpoint of format {FORMAT} "
                              f"(found {found!r})")
    return ck


def find_resume(resume, out, log=print):
    """(path, checkpoint) to resume from, or (None, None) to start fresh.

    resume "auto": OUT/last.pth, or OUT/prev.pth when last.pth is missing or corrupt (said
    on stdout); neither present: a fresh start; only broken files: CheckpointError.
    An explicit path must load."""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    out, errors = Path(out), []
    for name in (LAST, PREV):
        path = out / name
        if not path.is_file():
            continue
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        return path, ck
    if errors:
        raise CheckpointError("--resume auto: no readable checkpoint in "
                              f"{out}: {'; '.join(errors)}")
    return None, None


def model_from_checkpoint(path, device="cpu", use_ema=True):
    """(model in eval mode, TrainConfig, classes, label_to_cat) from a training checkpoint."""
    from ..model import RTMDet
    from .config import config_from_dict
    ck = load_checkpoint(path)
    cfg = config_from_dict(ck["config"])
    model = RTMDet.from_name(cfg.model, num_classes=len(ck["classes"]))
    model.load_state_dict(ck["ema"]["module"] if use_ema and ck.get("ema") else ck["model"])
    return model.to(device).eval(), cfg, list(ck["classes"]), list(ck["label_to_cat"])


# ------------------------------------------------------------- background writes

def _map_tensors(obj, fn):
    """`obj` (nested dicts, lists, tuples) rebuilt with fn(t) in place of each tensor t, in
    traversal order; other leaves are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class HostSnapshot:
    """Host copies of a state's tensors in buffers allocated once and refilled by each `fill`
    (reallocated when the tensors' shapes, strides or dtypes change).

    A per-tensor `.to("cpu")` of a GPU state is hundreds of blocking copies into pageable
    memory; here copies from a GPU go to pinned buffers without blocking, and `synchronize()`
    waits for all of them at once (one CUDA event per device). CPU tensors are copied
    synchronously, bit for bit."""

    def __init__(self):
        self.key, self.buffers, self._events = None, [], []

    def fill(self, state):
        """A copy of `state` whose tensors are the buffers, holding this moment's values once
        `synchronize()` returns. Overwrites the previous fill's values: call it only when
        nothing reads them any more."""
        tensors = []
        _map_tensors(state, tensors.append)
        key = [(t.shape, t.stride(), t.dtype, t.is_cuda) for t in tensors]
        if key != self.key:
            self.key, self.buffers = key, [
                torch.empty_like(t, device="cpu", pin_memory=t.is_cuda) for t in tensors]
        for buf, t in zip(self.buffers, tensors):
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
        self._events = []
        for device in {t.device for t in tensors if t.is_cuda}:
            event = torch.cuda.Event()     # after the copies queued on the device's current stream
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)
        buffers = iter(self.buffers)
        return _map_tensors(state, lambda t: next(buffers))

    def synchronize(self):
        """Wait until the last `fill`'s copies have arrived."""
        for event in self._events:
            event.synchronize()


class CheckpointWriter:
    """Saves in a background thread from a host snapshot of the state, so the training loop
    waits neither for the disk nor for each tensor's copy; `wait()` before reading the file
    or exiting."""

    def __init__(self):
        self._thread, self._error = None, None
        self.host = HostSnapshot()

    def save(self, path, state):
        self.wait()       # the previous write reads the host buffers until it ends
        snapshot = self.host.fill(state)
        self._thread = threading.Thread(target=self._write, args=(path, snapshot), daemon=False)
        self._thread.start()

    def _write(self, path, snapshot):
        try:
            self.host.synchronize()
            save_checkpoint(path, snapshot)
        except BaseException as e:   # reported by wait() in the training thread
            self._error = e

    def wait(self):
        """Wait for the write in progress; raise RuntimeError if a write failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {e}") from e
