"""Trainer: LR schedule, EMA, parameter groups, exact resume, COCO evaluation."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rtmdet import data as D
from rtmdet.evaluation import coco_evaluate
from rtmdet.train import (PRESETS, ModelEMA, TrainConfig, lr_factor, param_groups, plot_curves,
                          train)


def test_lr_schedule_key_points():
    kw = dict(warmup_iters=100, epochs=10, iters_per_epoch=50)
    assert lr_factor(0, **kw) == pytest.approx(1e-5)
    assert lr_factor(50, **kw) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert lr_factor(100, **kw) == 1.0
    assert lr_factor(249, **kw) == 1.0                 # flat until epoch 5 = iteration 250
    assert lr_factor(250, **kw) == pytest.approx(1.0)
    assert lr_factor(375, **kw) == pytest.approx(0.05 + 0.95 * 0.5)   # cosine midpoint
    assert lr_factor(500, **kw) == pytest.approx(0.05)
    assert lr_factor(600, **kw) == pytest.approx(0.05)
    vals = [lr_factor(i, **kw) for i in range(250, 501)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # warm-up longer than the flat part: both factors apply
    assert lr_factor(300, warmup_iters=600, epochs=10, iters_per_epoch=50) == pytest.approx(
        (1e-5 + (1 - 1e-5) * 0.5) * (0.05 + 0.95 * (1 + math.cos(math.pi * 50 / 250)) / 2))


def test_ema_update_formula():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = ModelEMA(model, momentum=0.0002, gamma=2000)
    values = [1.0, 3.0, -2.0, 5.0]
    expected = None
    for k, v in enumerate(values):
        with torch.no_grad():
            model[0].weight.fill_(v)
            model[1].running_mean.fill_(2 * v)
            model[1].num_batches_tracked.fill_(k + 10)
        ema.update(model)
        m = (1 - 0.0002) * math.exp(-(1 + k) / 2000) + 0.0002
        expected = v if k == 0 else (1 - m) * expected + m * v
        assert ema.module[0].weight[0, 0].item() == pytest.approx(expected, rel=1e-6)
        assert ema.module[1].running_mean.item() == pytest.approx(2 * expected, rel=1e-6)
        assert ema.module[1].num_batches_tracked.item() == k + 10   # integers are copied
    assert ema.steps == 4 and not ema.module[0].weight.requires_grad
    assert ema.momentum_at(10 ** 6) == pytest.approx(0.0002)


def test_param_groups_no_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=True))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(model[0].weight), id(model[2].weight)}
    assert ids(no_decay["params"]) == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                       id(model[2].bias)}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    D.write_synthetic_split(root, "train", 4, seed=5, size=64)
    D.write_synthetic_split(root, "val", 2, seed=5, size=64)
    return root


def _cfg(root, out, **kw):
    base = dict(model="tiny", data=str(root), epochs=2, stage2_epochs=1, batch_size=2, img_size=64,
                workers=0, eval_interval=0, save_predictions=0, warmup_iters=2, lr=0.01,
                log_interval=1, progress=False, out=str(out), threads=2, backend="torch",
                ratio_range=(0.8, 1.2))
    base.update(kw)
    return TrainConfig(**base)


def test_exact_resume_matches_uninterrupted(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "full"))                   # 2 epochs x 2 iterations
    train(_cfg(tiny_data, tmp_path / "cut", max_iters=3))       # stops inside epoch 2
    mid = torch.load(tmp_path / "cut/last.pth", weights_only=False)
    assert (mid["epoch"], mid["iter"], mid["step"]) == (1, 1, 3)
    train(_cfg(tiny_data, tmp_path / "cut", resume=str(tmp_path / "cut/last.pth")))
    a = torch.load(tmp_path / "full/last.pth", weights_only=False)
    b = torch.load(tmp_path / "cut/last.pth", weights_only=False)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    for key in ("model",):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    for name, t in a["ema"]["module"].items():
        assert torch.equal(t, b["ema"]["module"][name]), name
    assert a["ema"]["steps"] == b["ema"]["steps"] == 4
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    # the weights moved, so equality is not trivial
    first = torch.load(tmp_path / "cut/last.pth", weights_only=False)["model"]
    assert not all(torch.equal(first[k], mid["model"][k]) for k in first if first[k].is_floating_point())
    log = [json.loads(x) for x in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in log if r["type"] == "train")
    plot_curves(tmp_path / "full/log.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_coco_eval_perfect_and_shifted(tiny_data, tmp_path):
    ann = tiny_data / "annotations/instances_val.json"
    gt = json.loads(ann.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    m = coco_evaluate(ann, perfect, out_dir=tmp_path, verbose=False)
    assert m["bbox_mAP"] == pytest.approx(1.0) and m["bbox_mAP_50"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) >= {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"}
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2], d["bbox"][1], d["bbox"][2], d["bbox"][3]])
               for d in perfect]
    s = coco_evaluate(ann, shifted, verbose=False)
    assert 0.0 < s["bbox_mAP"] < 0.9
    wrong = [dict(d, category_id=d["category_id"] % 6 + 1) for d in perfect]
    assert coco_evaluate(ann, wrong, verbose=False)["bbox_mAP"] == 0.0
    assert coco_evaluate(ann, [], verbose=False)["bbox_mAP"] == 0.0


def test_cpu_demo_preset_synthetic_train_and_eval(tmp_path, monkeypatch):
    """The cpu-demo preset is a valid config; its easier synthetic set goes through training
    and `rtmdet eval` (which must regenerate/find the same set from the checkpoint's config)."""
    from rtmdet.cli import main
    demo = TrainConfig(**PRESETS["cpu-demo"])
    assert demo.data == "synthetic" and demo.model == "tiny" and demo.threads == 2
    assert demo.lr > 0.004 * demo.batch_size / 256 and demo.save_predictions > 0
    params = D.SyntheticParams.of(demo.synthetic)
    assert params.num_classes >= 3 and demo.synthetic_size == demo.img_size
    monkeypatch.setenv("RTMDET_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(None, tmp_path / "run", data="synthetic", synthetic=demo.synthetic, synthetic_size=64,
               num_train_images=4, num_val_images=2, epochs=1, stage2_epochs=0, eval_interval=1)
    metrics = train(cfg)
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    ck = torch.load(tmp_path / "run/last.pth", weights_only=False)
    assert ck["classes"] == list(params.classes)
    assert (D.synthetic_root(params) / "annotations/instances_val.json").is_file()
    assert main(["eval", str(tmp_path / "run/last.pth"), "--threads", "2", "--workers", "0",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["bbox_mAP"] >= 0.0


def test_ema_updates_shared_weights_once():
    """The SepBN head shares its conv weights across levels (one tensor, several state-dict
    names): each EMA update must average it once, not once per name."""
    shared = nn.Linear(2, 2)
    model = nn.ModuleList([nn.Sequential(shared), nn.Sequential(shared)])
    ema = ModelEMA(model, momentum=0.1, gamma=1e9)
    with torch.no_grad():
        shared.weight.fill_(0.0)
    ema.update(model)                   # k = 0 copies
    with torch.no_grad():
        shared.weight.fill_(1.0)
    ema.update(model)
    m = ema.momentum_at(1)
    assert ema.module[0][0].weight[0, 0].item() == pytest.approx(m, rel=1e-6)
    assert ema.module[1][0].weight is ema.module[0][0].weight


def test_accumulate_keeps_effective_batch_and_lr(tiny_data, tmp_path, capsys):
    train(_cfg(tiny_data, tmp_path / "acc", batch_size=1, accumulate=2, lr=None, epochs=1,
               stage2_epochs=0))
    out = capsys.readouterr().out
    assert "1 process(es) x batch 1 x accumulate 2 = effective batch 2" in out
    ck = torch.load(tmp_path / "acc/last.pth", weights_only=True)
    assert ck["step"] == 2 and ck["ema"]["steps"] == 2          # 4 images = 2 optimizer steps
    assert ck["optimizer"]["state"][0]["step"].item() == 2
    log = [json.loads(x) for x in (tmp_path / "acc/log.jsonl").read_text().splitlines()]
    assert log[0]["type"] == "run" and log[0]["effective_batch"] == 2
    assert log[0]["lr"] == pytest.approx(0.004 * 2 / 256)
    steps = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    # the schedule counts optimizer steps: 2 per epoch
    assert steps[-1]["lr"] == pytest.approx(0.004 * 2 / 256 * lr_factor(1, warmup_iters=2, epochs=1,
                                                                          iters_per_epoch=2))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)


def test_non_finite_loss_stops_with_the_window_and_keeps_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import rtmdet.loss
    real = rtmdet.loss.head_loss
    calls = []

    def flaky(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            out["loss_cls"] = out["loss_cls"] * float("nan")
        return out
    monkeypatch.setattr(rtmdet.loss, "head_loss", flaky)
    with pytest.raises(FloatingPointError) as e:
        train(_cfg(tiny_data, tmp_path / "nan", log_interval=4, checkpoint_iters=2, epochs=1,
                   stage2_epochs=0, max_images=4, batch_size=1))
    msg = str(e.value)
    assert "epoch 1, iterations 3-4" in msg and "loss_cls=nan" in msg and "last.pth" in msg
    ck = torch.load(tmp_path / "nan/last.pth", weights_only=True)
    assert ck["step"] == 2          # the step-4 checkpoint was refused
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
