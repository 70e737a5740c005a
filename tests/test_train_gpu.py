"""The trainer on a CUDA GPU: its defaults (bf16 autocast, channels_last, fused AdamW), no host
synchronisation between log steps, exact resume, and --compile."""
import json

import pytest
import torch

from rtmdet import data as D
from rtmdet.train import TrainConfig, train
from rtmdet.training import loop

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ds")
    D.write_synthetic_split(root, "train", 16, seed=2, size=128)
    D.write_synthetic_split(root, "val", 4, seed=2, size=128)
    return root


def _cfg(root, out, **kw):
    base = dict(model="tiny", data=str(root), epochs=2, stage2_epochs=1, batch_size=4, img_size=128,
                workers=2, eval_interval=2, save_predictions=0, warmup_iters=2, log_interval=100,
                progress=True, out=str(out), device="cuda")
    base.update(kw)
    return TrainConfig(**base)


def test_cuda_defaults_and_no_host_sync_between_log_steps(dataset, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") around every micro-step (data to the device,
    forward, loss, backward) and optimizer step (AdamW, EMA) after the first two (which may
    autotune kernels): any synchronising call on the hot path (an .item(), a finiteness
    check, a logged float) raises. Log flushes and checkpoints synchronise by design."""
    def checked(fn):
        def wrapper(self, *args, **kw):
            torch.cuda.set_sync_debug_mode("error" if self.step >= 2 else 0)
            try:
                return fn(self, *args, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return wrapper
    for name in ("micro_step", "optimizer_step"):
        monkeypatch.setattr(loop.Trainer, name, checked(getattr(loop.Trainer, name)))
    metrics = train(_cfg(dataset, tmp_path / "run"))
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    run = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[0])
    assert run["amp"] == "bf16" and run["channels_last"] is True
    ck = torch.load(tmp_path / "run/last.pth", weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["fused"] is True
    assert ck["step"] == 8


def test_gpu_resume_continues_the_run(dataset, tmp_path):
    train(_cfg(dataset, tmp_path / "full", eval_interval=0))
    train(_cfg(dataset, tmp_path / "cut", eval_interval=0, max_iters=5))
    train(_cfg(dataset, tmp_path / "cut", eval_interval=0, resume="auto"))
    a = torch.load(tmp_path / "full/last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut/last.pth", weights_only=True)
    assert a["step"] == b["step"] == 8
    # cuDNN's backward is not bitwise deterministic; the resumed run must stay close
    for name, t in a["model"].items():
        if t.is_floating_point():
            torch.testing.assert_close(t, b["model"][name], rtol=2e-2, atol=2e-3, msg=name)


def test_compile_trains(dataset, tmp_path):
    metrics = train(_cfg(dataset, tmp_path / "compiled", compile=True, epochs=1, stage2_epochs=0,
                         eval_interval=1))
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
