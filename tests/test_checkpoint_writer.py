"""The background checkpoint writer: a snapshot of the moment of `save()` in host buffers
reused across checkpoints, never refilled while a write reads them, errors reported by
`wait()`, files bitwise equal to the state; the epoch boundary waits for the write only
before recording a task as done."""
import time
from types import SimpleNamespace

import pytest
import torch

from rtmdet.training import checkpoints as C
from rtmdet.training.checkpoints import CheckpointWriter, load_checkpoint, save_checkpoint
from rtmdet.training.loop import Trainer


def _slow_writes(monkeypatch, seconds=0.3):
    """Make each background write sleep before it serialises (what a slow disk does)."""
    real = C.save_checkpoint

    def slow(path, state, keep_previous=True):
        time.sleep(seconds)
        real(path, state, keep_previous)
    monkeypatch.setattr(C, "save_checkpoint", slow)


def _bytes(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
        assert torch.equal(_bytes(a), _bytes(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_bitwise(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise(x, y)
    else:
        assert a == b


def _state():
    floats = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.5])
    nan_payload = torch.tensor([0x7FC00001, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    return {
        "model": {"w": torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last),
                  "b": torch.randn(5, 7).t(),                       # not contiguous
                  "n": torch.tensor(7), "empty": torch.zeros(0, 4)},
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.cat([floats, nan_payload])}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "dtypes": [torch.randn(4).half(), torch.randn(4).bfloat16(), torch.randn(4).double(),
                   torch.arange(5), torch.tensor([True, False]), torch.arange(4, dtype=torch.uint8)],
        "grad": torch.ones(3, requires_grad=True),
        "step": 12, "name": "s", "none": None, "nested": [[1, 2.5], {"k": "v"}],
    }


def test_saved_file_equals_the_state_bitwise_and_the_former_snapshot_bytewise(tmp_path):
    state = _state()
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", state)
    writer.wait()
    loaded = load_checkpoint(tmp_path / "last.pth")
    assert loaded.pop("format") == C.FORMAT
    expected = dict(state, grad=state["grad"].detach())      # saved without its autograd flag
    _assert_bitwise(loaded, expected)
    # the same bytes as the former per-tensor `.to("cpu", copy=True)` snapshot wrote
    save_checkpoint(tmp_path / "old.pth", C._map_tensors(state, lambda t: t.detach().to("cpu", copy=True)))
    assert (tmp_path / "last.pth").read_bytes() == (tmp_path / "old.pth").read_bytes()


def test_snapshot_is_the_state_at_save_even_when_modified_right_after(tmp_path, monkeypatch):
    _slow_writes(monkeypatch)
    state = _state()
    expected = C._map_tensors(state, lambda t: t.detach().clone())
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", state)
    with torch.no_grad():             # training goes on while the file is written
        C._map_tensors(state, lambda t: t.zero_() if t.numel() else t)
    writer.wait()
    loaded = load_checkpoint(tmp_path / "last.pth")
    loaded.pop("format")
    _assert_bitwise(loaded, expected)


def test_buffers_reused_for_the_same_structure_and_reallocated_when_it_changes(tmp_path):
    writer = CheckpointWriter()
    path = tmp_path / "last.pth"
    writer.save(path, {"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.int64)], "step": 1})
    writer.wait()
    first = list(writer.host.buffers)
    ptrs = [b.data_ptr() for b in first]
    # new tensors of the same shapes, strides and dtypes: refilled in place
    writer.save(path, {"a": torch.ones(3, 4), "b": [torch.full((2,), 5)], "step": 2})
    writer.wait()
    assert all(x is y for x, y in zip(writer.host.buffers, first)) and len(writer.host.buffers) == 2
    assert [b.data_ptr() for b in writer.host.buffers] == ptrs
    ck = load_checkpoint(path)
    assert torch.equal(ck["a"], torch.ones(3, 4)) and ck["b"][0].tolist() == [5, 5] and ck["step"] == 2
    # a changed shape, dtype or stride, or another tensor: new buffers, right values
    for state in ({"a": torch.ones(4, 3), "b": [torch.full((2,), 5)]},
                  {"a": torch.ones(3, 4, dtype=torch.float64), "b": [torch.full((2,), 5)]},
                  {"a": torch.ones(4, 3).t(), "b": [torch.full((2,), 5)]},
                  {"a": torch.ones(3, 4), "b": [torch.full((2,), 5), torch.ones(1)]}):
        before = list(writer.host.buffers)
        writer.save(path, dict(state, step=3))
        writer.wait()
        assert not any(x is y for x, y in zip(writer.host.buffers, before))
        ck = load_checkpoint(path)
        _assert_bitwise({k: ck[k] for k in state}, state)


def test_second_save_during_a_write_does_not_corrupt_the_first(tmp_path, monkeypatch):
    _slow_writes(monkeypatch)
    w = torch.full((1000,), 1.0)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", {"w": w, "step": 1})
    w.fill_(2.0)
    writer.save(tmp_path / "last.pth", {"w": w, "step": 2})     # while the first is written
    w.fill_(3.0)
    writer.wait()
    first, second = load_checkpoint(tmp_path / "prev.pth"), load_checkpoint(tmp_path / "last.pth")
    assert first["step"] == 1 and torch.equal(first["w"], torch.full((1000,), 1.0))
    assert second["step"] == 2 and torch.equal(second["w"], torch.full((1000,), 2.0))


def test_a_failed_write_is_raised_by_wait_and_not_lost(tmp_path, monkeypatch):
    def broken(path, state, keep_previous=True):
        raise OSError("No space left on device")
    monkeypatch.setattr(C, "save_checkpoint", broken)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", {"w": torch.ones(2)})
    with pytest.raises(RuntimeError, match="writing a checkpoint failed: No space left") as e:
        writer.wait()
    assert isinstance(e.value.__cause__, OSError)
    writer.wait()                               # reported once
    writer.save(tmp_path / "last.pth", {"w": torch.ones(2)})
    with pytest.raises(RuntimeError, match="No space left"):    # the next save reports it too
        writer.save(tmp_path / "last.pth", {"w": torch.ones(2)})
    monkeypatch.undo()
    writer.save(tmp_path / "last.pth", {"w": torch.ones(2)})
    writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["w"], torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshot_is_pinned_and_taken_at_save(tmp_path, monkeypatch):
    _slow_writes(monkeypatch, 0.1)
    w = torch.randn(2048, 1024, device="cuda")
    step = torch.tensor(4.0)                    # a CPU tensor beside it (AdamW's step)
    expected = w.cpu()
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", {"w": w, "step": step})
    w.mul_(2)                                   # queued after the copy, on the same stream
    writer.wait()
    assert writer.host.buffers[0].is_pinned() and not writer.host.buffers[1].is_pinned()
    ck = load_checkpoint(tmp_path / "last.pth")
    assert ck["w"].device.type == "cpu" and torch.equal(ck["w"], expected) and ck["step"] == 4


def _boundary(tmp_path, eval_interval, events):
    """A stand-in Trainer for `boundary_tasks` that records what it calls, in order."""
    writer = SimpleNamespace(wait=lambda: events.append("wait"))
    return SimpleNamespace(
        cfg=SimpleNamespace(eval_interval=eval_interval, epochs=10, save_predictions=0),
        dinfo=SimpleNamespace(main=False), step=30, metrics=None, out=tmp_path, writer=writer,
        log=SimpleNamespace(size=lambda: 0), read_tasks=lambda: {},
        run_eval=lambda epoch: events.append("eval"),
        write_tasks=lambda record: events.append(("tasks", record["done"])))


def test_boundary_waits_for_the_write_only_before_recording_a_task(tmp_path):
    events = []
    Trainer.boundary_tasks(_boundary(tmp_path, 0, events), 3)          # nothing due
    assert events == []
    Trainer.boundary_tasks(_boundary(tmp_path, 3, events), 3)          # evaluation due
    assert events == ["eval", "wait", ("tasks", ["eval"])]
