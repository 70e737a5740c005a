"""DDP without GPUs: `torchrun --nproc-per-node 2` training on the CPU (gloo).

Both ranks end with identical weights; with BatchNorm frozen (so a batch's images do not
interact) 2 processes x batch 2 equal 1 process x batch 4 within float tolerance (the
gradient averaging, the loss normalisers averaged across processes, the data sharding
and the linear LR scaling all have to be right for that); evaluation split across ranks
gives the detections of a 1-process evaluation; the run resumes on 1 process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtmdet import data as D
from rtmdet.cli import main
from rtmdet.train import TrainConfig, train

WORKER = Path(__file__).with_name("ddp_train_worker.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_ds")
    D.write_synthetic_split(root, "train", 8, seed=11, size=96)
    D.write_synthetic_split(root, "val", 3, seed=11, size=96)
    return root


def _config(root, out, batch_size, **kw):
    base = dict(model="tiny", data=str(root), epochs=1, stage2_epochs=0, batch_size=batch_size,
                img_size=96, workers=0, eval_interval=1, save_predictions=0, warmup_iters=1,
                log_interval=1, progress=False, out=str(out), threads=1, backend="torch",
                ratio_range=(0.9, 1.1), mixup_prob=0.0)
    base.update(kw)
    return base


def _run_worker(cfg, dump, nproc, frozen_bn=True):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    cmd = launch + [str(WORKER), json.dumps(cfg), str(dump)] + (["--frozen-bn"] if frozen_bn else [])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_two_process_gloo_training_equals_one_process_same_total_batch(dataset, tmp_path):
    ddp = _run_worker(_config(dataset, tmp_path / "ddp", 2), tmp_path / "ddp_dump", nproc=2)
    one = _run_worker(_config(dataset, tmp_path / "one", 4), tmp_path / "one_dump", nproc=1)
    assert "2 process(es) x batch 2 x accumulate 1 = effective batch 4" in ddp.stdout
    run_rec = json.loads((tmp_path / "ddp/log.jsonl").read_text().splitlines()[0])
    assert run_rec["type"] == "run" and run_rec["effective_batch"] == 4 and run_rec["world"] == 2
    assert run_rec["lr"] == pytest.approx(0.004 * 4 / 256)
    r0, r1 = (torch.load(tmp_path / f"ddp_dump/rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one_dump/rank0.pt", weights_only=True)
    assert r0["step"] == r1["step"] == single["step"] == 2
    start = torch.load(tmp_path / "ddp/last.pth", weights_only=True)["model"]
    for name, t in r0["model"].items():
        assert torch.equal(t, r1["model"][name]), f"ranks differ in {name}"
        if t.is_floating_point():
            torch.testing.assert_close(t, single["model"][name], rtol=1e-4, atol=2e-5, msg=name)
    for name, t in r0["ema"].items():
        assert torch.equal(t, r1["ema"][name]), f"EMA of the ranks differs in {name}"
    # the 2-process checkpoint (rank 0) holds these weights
    assert all(torch.equal(start[k], r0["model"][k]) for k in start)
    # the training moved the weights from their initial values
    from rtmdet.model import RTMDet
    torch.manual_seed(0)
    init = RTMDet.from_name("tiny", num_classes=len(D.SYNTHETIC_CLASSES)).state_dict()
    assert not torch.equal(init["bbox_head.rtm_cls.0.weight"], r0["model"]["bbox_head.rtm_cls.0.weight"])

    # evaluation split over the 2 ranks == a 1-process evaluation of the same (EMA) weights
    assert main(["eval", str(tmp_path / "ddp/last.pth"), "--data", str(dataset), "--workers", "0",
                 "--threads", "1", "--out", str(tmp_path / "ev1")]) == 0
    split = json.loads((tmp_path / "ddp/detections.json").read_text())
    whole = json.loads((tmp_path / "ev1/detections.json").read_text())
    assert len(split) == len(whole) > 0
    key = lambda d: (d["image_id"], d["category_id"], round(d["score"], 3), [round(v, 1) for v in d["bbox"]])
    mismatched = sum(a != b for a, b in zip(sorted(map(key, split)), sorted(map(key, whole))))
    assert mismatched <= len(whole) // 50, mismatched        # float-rounding ties only
    m_split = json.loads((tmp_path / "ddp/metrics.json").read_text())
    m_whole = json.loads((tmp_path / "ev1/metrics.json").read_text())
    assert m_split["bbox_mAP"] == pytest.approx(m_whole["bbox_mAP"], abs=1e-3)

    # resume the 2-process run on 1 process for a second epoch
    cfg = TrainConfig(**_config(dataset, tmp_path / "ddp", 2, epochs=2, resume="auto", eval_interval=0))
    train(cfg)
    ck = torch.load(tmp_path / "ddp/last.pth", weights_only=True)
    assert (ck["epoch"], ck["iter"], ck["layout"]["world"]) == (2, 0, 1)
    # the schedule continues at the same point of training: epoch 1 of 2 done = step 1 x 4 on
    # the new layout (4 steps of 2 images an epoch), then 4 more steps
    assert ck["step"] == 1 * 4 + 4 and ck["ema"]["steps"] == 2 + 4
