"""Crash-safe, exact resume: SIGINT at chosen points (data, forward, backward, optimizer step,
evaluation, drawing predictions) + `--resume auto` gives bitwise the same weights, EMA,
optimizer state, metrics, detections and log as one uninterrupted run.

The interrupts come from the trainer's test hook (RTMDET_TEST_INTERRUPT="PHASE:N" sends
SIGINT to the process the N-th time it enters PHASE), in `python -m rtmdet train` subprocesses.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from rtmdet import data as D

TIMING = {"time", "iter_time", "data_time", "eval_time", "epoch_time", "first_batch_wait",
          "boundary_time"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_ds")
    D.write_synthetic_split(root, "train", 6, seed=3, size=64)
    D.write_synthetic_split(root, "val", 2, seed=3, size=64)
    return root


def _train(root, out, *extra, interrupt=None):
    """One `rtmdet train` subprocess: 2 epochs x 3 steps, evaluation after each epoch, one
    drawn prediction at the end; log every 5 steps, so loss windows span the interrupts."""
    cmd = [sys.executable, "-m", "rtmdet", "train", "--model", "tiny", "--data", str(root),
           "--epochs", "2", "--stage2-epochs", "1", "--batch-size", "2", "--img-size", "64",
           "--workers", "0", "--eval-interval", "1", "--save-predictions", "1", "--warmup-iters", "2",
           "--lr", "0.01", "--log-interval", "5", "--threads", "1", "--backend", "auto",
           "--no-progress", "--out", str(out), *extra]
    env = dict(os.environ)
    env.pop("RTMDET_TEST_INTERRUPT", None)
    if interrupt:
        env["RTMDET_TEST_INTERRUPT"] = interrupt
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _log(path):
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs
            if r["type"] not in ("run", "resume")]


def _assert_same_run(a, b):
    ca = torch.load(a / "last.pth", weights_only=True)
    cb = torch.load(b / "last.pth", weights_only=True)
    assert (ca["epoch"], ca["iter"], ca["step"]) == (cb["epoch"], cb["iter"], cb["step"]) == (2, 0, 6)
    for name, t in ca["model"].items():
        assert torch.equal(t, cb["model"][name]), name
    for name, t in ca["ema"]["module"].items():
        assert torch.equal(t, cb["ema"]["module"][name]), name
    assert ca["ema"]["steps"] == cb["ema"]["steps"] == 6
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    for name in ("metrics.json", "detections.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert _log(a / "log.jsonl") == _log(b / "log.jsonl")
    pa, pb = sorted((a / "predictions").glob("*.png")), sorted((b / "predictions").glob("*.png"))
    assert [p.name for p in pa] == [p.name for p in pb] and len(pa) == 1
    assert pa[0].read_bytes() == pb[0].read_bytes()


def test_sigint_anywhere_then_resume_auto_is_bitwise_exact(dataset, tmp_path):
    ref = _train(dataset, tmp_path / "ref", "--checkpoint-iters", "1")
    assert ref.returncode == 0, ref.stderr
    cut = tmp_path / "cut"
    # each run is interrupted once (the hook counts per process), then resumed with
    # --resume auto; after the second, last.pth is torn and the resume falls back to prev.pth
    points = [("forward:2", "interrupted at epoch 1/2, iteration 2/3 (step 2)"),
              ("data:3", "interrupted at epoch 2/2, iteration 1/3 (step 4)"),    # before step 5
              ("backward:2", "interrupted at epoch 2/2, iteration 2/3 (step 5)"),  # from step 3
              ("optimizer:1", "interrupted while evaluating after epoch 2/2"),   # last step done
              ("eval:1", "interrupted while evaluating after epoch 2/2"),
              ("predictions:1", "interrupted while drawing predictions after epoch 2/2")]
    for k, (point, message) in enumerate(points):
        run = _train(dataset, cut, "--checkpoint-iters", "1", *([] if k == 0 else ["--resume", "auto"]),
                     interrupt=point)
        assert run.returncode == 130, (point, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr, (point, run.stderr)
        assert "requires_grad=True to a scalar" not in run.stderr         # issue 15 item 9
        last_line = run.stderr.strip().splitlines()[-1]
        assert message in last_line and "--resume auto" in last_line, (point, last_line)
        if point == "data:3":
            last = torch.load(cut / "last.pth", weights_only=True)
            prev = torch.load(cut / "prev.pth", weights_only=True)
            assert (last["step"], prev["step"]) == (4, 3)
            data = (cut / "last.pth").read_bytes()
            (cut / "last.pth").write_bytes(data[: len(data) // 2])          # a torn write
        if point == "backward:2":
            assert "last.pth is corrupt" in run.stdout and "resumed from" in run.stdout
            assert "prev.pth: epoch 2, iteration 0, step 3" in run.stdout
    fin = _train(dataset, cut, "--checkpoint-iters", "1", "--resume", "auto")
    assert fin.returncode == 0, fin.stderr
    assert "bbox_mAP" in fin.stdout
    _assert_same_run(tmp_path / "ref", cut)
    # a finished run resumed again does nothing more and still reports its metrics
    again = _train(dataset, cut, "--checkpoint-iters", "1", "--resume", "auto")
    assert again.returncode == 0 and "bbox_mAP" in again.stdout, again.stderr
    _assert_same_run(tmp_path / "ref", cut)
