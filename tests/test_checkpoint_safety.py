"""Checkpoints: a format `torch.load(weights_only=True)` reads, no code run from a foreign file,
atomic writes keeping the previous one, clear errors naming the file."""
import os
import random

import numpy as np
import pytest
import torch

from rtmdet.train import (CheckpointError, TrainConfig, config_from_dict, config_to_dict,
                          find_resume, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from rtmdet.training.checkpoints import CheckpointWriter


class _Evil:
    """Unpickling this runs code (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rng_state_round_trip_is_plain_tensors_and_exact(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()        # a cached gaussian in numpy's state
    state = rng_state()
    save_checkpoint(tmp_path / "ck.pth", {"rng": [state]})
    loaded = load_checkpoint(tmp_path / "ck.pth")["rng"][0]    # weights_only=True inside
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(loaded)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_config_saved_as_plain_dict():
    cfg = TrainConfig(ratio_range=(0.5, 1.5), synthetic={"lines": (2, 6), "num_classes": 4})
    d = config_to_dict(cfg)
    assert d["ratio_range"] == [0.5, 1.5] and d["synthetic"]["lines"] == [2, 6]
    back = config_from_dict(dict(d, unknown_future_key=1))
    assert back == cfg


def test_foreign_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "arbitrary code" in str(e.value)
    assert not marker.exists()
    # the old format (numpy RNG states, tuples of Python ints) is refused the same way
    old = tmp_path / "old.pth"
    torch.save({"rng": [{"numpy": np.random.get_state()}], "epoch": 1}, old)
    with pytest.raises(CheckpointError, match="old-format or foreign"):
        load_checkpoint(old)


def test_corrupt_and_non_rtmdet_files_are_named(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"step": 1, "w": torch.ones(1000)})
    data = good.read_bytes()
    torn = tmp_path / "torn.pth"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(torn)
    assert str(torn) in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, plain)       # e.g. an mmdet checkpoint
    with pytest.raises(CheckpointError, match="not an rtmdet training checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_checkpoint(tmp_path / "nothing.pth")


def test_atomic_save_keeps_previous_and_auto_falls_back(tmp_path, capsys):
    last = tmp_path / "last.pth"
    save_checkpoint(last, {"step": 1})
    save_checkpoint(last, {"step": 2})
    assert load_checkpoint(last)["step"] == 2
    assert load_checkpoint(tmp_path / "prev.pth")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "prev.pth"]   # no temporaries
    path, ck = find_resume("auto", tmp_path)
    assert path == last and ck["step"] == 2
    last.write_bytes(last.read_bytes()[:100])
    messages = []
    path, ck = find_resume("auto", tmp_path, log=messages.append)
    assert path == tmp_path / "prev.pth" and ck["step"] == 1
    assert "last.pth" in messages[0] and "corrupt" in messages[0]
    (tmp_path / "prev.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        find_resume("auto", tmp_path, log=messages.append)
    assert find_resume("auto", tmp_path / "empty") == (None, None)   # fresh start
    with pytest.raises(CheckpointError):
        find_resume(str(last), tmp_path)             # an explicit path must load


def test_background_writer_snapshots_the_state(tmp_path):
    w = torch.zeros(4)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pth", {"w": w, "step": 1})
    w += 1                                # training goes on while the file is written
    writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["w"], torch.zeros(4))


def test_saved_file_loads_with_plain_weights_only(tmp_path):
    save_checkpoint(tmp_path / "a.pth", {"x": torch.arange(3), "names": ["a"], "n": 1.5, "none": None})
    with open(tmp_path / "a.pth", "rb") as f:
        d = torch.load(f, weights_only=True)
    assert d["format"] == "rtmdet-train-v2" and d["names"] == ["a"]
    assert not os.path.exists(tmp_path / "a.pth.tmp")
