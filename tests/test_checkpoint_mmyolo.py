"""load_mmyolo_state_dict against the real mmyolo 0.6 RTMDet, built from mmyolo's own configs:
its state dict loaded into our RTMDet gives the same head outputs on the same input.

mmcv-lite ships no compiled ops, but `import mmyolo.models` imports `mmcv.ops`, which loads
`mmcv._ext`; tests/mmcv_stub.py registers a stand-in for it first (building and running the
RTMDet network calls no compiled op; any call would raise).
"""
import os

import pytest
import torch

import rtmdet
from tests.mmcv_stub import install_mmcv_ext_stub

pytest.importorskip("mmyolo", reason="mmyolo 0.6 is not installed (scripts/test.sh installs it)")
install_mmcv_ext_stub()
import mmyolo  # noqa: E402
import mmyolo.models  # noqa: E402,F401  (registers the stock classes)
from mmengine.config import Config  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmyolo.registry import MODELS  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(mmyolo.__file__), ".mim", "configs", "rtmdet")
STRIDES = (8, 16, 32)


def stock_model(size, seed):
    """mmyolo's RTMDet from its COCO config with random weights and BN statistics, in eval mode."""
    cfg = Config.fromfile(os.path.join(CONFIGS, f"rtmdet_{size}_syncbn_fast_8xb32-300e_coco.py"))
    torch.manual_seed(seed)
    # the detector builds its data preprocessor by bare name: resolve it in mmyolo's scope
    with DefaultScope.overwrite_default_scope("mmyolo"):
        model = MODELS.build(cfg.model)
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None          # running statistics = the average over the batches below
        model.train()
        for _ in range(2):             # statistics of real activations keep the outputs finite
            model.bbox_head.head_module(model.neck(model.backbone(
                torch.randn(2, 3, 64, 64, generator=g))))
    return model.eval()


def stock_outputs(model, x):
    """cls logits per level and ltrb distances in pixels (mmyolo's head outputs stride units)."""
    with torch.no_grad():
        cls, reg = model.bbox_head.head_module(model.neck(model.backbone(x)))
    return list(cls), [r * s for r, s in zip(reg, STRIDES)]


def assert_outputs_close(ours, stock, x, **tol):
    with torch.no_grad():
        cls, reg = ours.eval()(x)
    for a, b in zip(cls + reg, stock[0] + stock[1]):
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture(scope="module")
def tiny():
    model = stock_model("tiny", 0)
    return model, model.state_dict()


def test_tiny_outputs_equal_stock_from_a_pth_file(tiny, tmp_path):
    stock, sd = tiny
    # an mmengine-style checkpoint: meta, the weights, the data preprocessor's buffers
    path = tmp_path / "rtmdet_tiny_mmyolo.pth"
    torch.save({"meta": {"epoch": 300, "mmengine_version": "0.10.7"}, "state_dict": sd}, path)
    assert any(k.startswith("bbox_head.head_module.") for k in sd)
    ours = rtmdet.RTMDet.from_name("tiny", num_classes=80)
    assert rtmdet.load_mmyolo_state_dict(ours, str(path)) is ours
    assert all(m.eps == 1e-5 for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    ref = stock_outputs(stock, x)
    assert_outputs_close(ours, ref, x, rtol=1e-4, atol=1e-4)
    # the BN eps matters for these weights: mmyolo's SPEC-style 1e-3 would not reproduce them
    other = rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), sd, bn_eps=1e-3)
    with pytest.raises(AssertionError):
        assert_outputs_close(other, ref, x, rtol=1e-4, atol=1e-4)


def test_m_outputs_equal_stock_without_exp_on_reg():
    """m: two CSP blocks per neck layer, and mmyolo's head has no exp() (mmdetection's m has)."""
    stock = stock_model("m", 2)
    sd = stock.state_dict()
    with pytest.raises(ValueError, match="exp_on_reg=False"), torch.device("meta"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("m"), sd)     # refused before loading
    ours = rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("m", exp_on_reg=False), sd)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert_outputs_close(ours, stock_outputs(stock, x), x, rtol=1e-4, atol=1e-4)


def test_ema_weights_of_an_mmengine_checkpoint(tiny):
    _, sd = tiny
    # mmengine's EMAHook stores the averaged model as `module.<key>` plus a step counter
    ema = {"module." + k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    ema["steps"] = torch.tensor(1000)
    ckpt = {"state_dict": sd, "ema_state_dict": ema}
    ours = rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), ckpt, use_ema=True)
    torch.testing.assert_close(ours.bbox_head.rtm_cls[1].bias,
                               sd["bbox_head.head_module.rtm_cls.1.bias"] + 1)
    raw = rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), ckpt)
    torch.testing.assert_close(raw.bbox_head.rtm_cls[1].bias,
                               sd["bbox_head.head_module.rtm_cls.1.bias"])
    with pytest.raises(ValueError, match=r"load_mmyolo_state_dict\(use_ema=True\)"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), sd, use_ema=True)


def test_refuses_to_unpickle_objects(tiny, tmp_path):
    _, sd = tiny
    path = tmp_path / "full.pth"
    # a training checkpoint: mmengine's message hub holds HistoryBuffer objects
    hub = {"log_scalars": {"loss": HistoryBuffer([1.0], [1])}}
    torch.save({"state_dict": sd, "message_hub": hub}, path)
    with pytest.raises(ValueError,
                       match=r"load_mmyolo_state_dict: .*weights_only=True.*ckpt\['state_dict'\]"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), path)


def test_errors(tiny):
    _, sd = tiny
    with pytest.raises(ValueError,
                       match=r"load_mmyolo_state_dict: shape mismatch \(num_classes differs\?\)"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny", num_classes=3), sd)
    with pytest.raises(KeyError,
                       match="load_mmyolo_state_dict: .*missing keys: .*bbox_head.rtm_reg.0.weight"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"),
                                      {k: v for k, v in sd.items() if "rtm_reg.0" not in k})
    with pytest.raises(KeyError, match=r"missing keys: \[backbone.stage2.1.blocks.1.conv1"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("s"), sd)      # tiny weights, s model
    bad = dict(sd)
    bad["bbox_head.head_module.cls_convs.2.0.conv.weight"] = bad[
        "bbox_head.head_module.cls_convs.2.0.conv.weight"] + 1
    with pytest.raises(ValueError, match="differs from its level-0 copy"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), bad)
    with pytest.raises(TypeError, match="mapping or a path"):
        rtmdet.load_mmyolo_state_dict(rtmdet.RTMDet.from_name("tiny"), [1, 2])
