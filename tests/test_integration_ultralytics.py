"""rtmdet.integrations.ultralytics against the real ultralytics 8.4: DSLAssigner beside stock
TaskAlignedAssigner (call, return conventions), DSLADetectionLoss on a real YOLOv8 model, and
a short YOLO(...).train(trainer=DSLADetectionTrainer) run on a tiny dataset written here.

torchvision: PyPI's torchvision 0.28 wheel cannot load its compiled ops with the CPU torch
2.13 build, and then `import torchvision` (done by ultralytics' validator) fails;
tests/torchvision_stub.py defines the two operator schemas it needs first, with `nms` from
rtmdet.ops (only where torchvision's own ops do not load). Network: YOLO_OFFLINE=1, and the
training test fails if anything opens a socket.
"""
import math
import os
import socket

import numpy as np
import pytest
import torch

from tests.torchvision_stub import install_torchvision_ops_stub

pytest.importorskip("ultralytics",
                    reason="ultralytics 8.x is not installed (scripts/test.sh installs it)")
os.environ.setdefault("YOLO_OFFLINE", "1")   # read when ultralytics is imported
install_torchvision_ops_stub()
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors  # noqa: E402

from rtmdet import ops  # noqa: E402
from rtmdet.integrations.ultralytics import (DSLADetectionLoss, DSLADetectionModel,  # noqa: E402
                                             DSLADetectionTrainer, DSLAssigner)

STRIDES = torch.tensor([8.0, 16.0, 32.0])


def anchors(size, strides=STRIDES):
    """ultralytics' anchors for a size x size input: cell centres in pixels, (A, 1) strides."""
    feats = [torch.zeros(1, 1, size // int(s), size // int(s)) for s in strides]
    points, stride_tensor = make_anchors(feats, strides, 0.5)
    return points * stride_tensor, stride_tensor


def random_batch(seed, B=2, M=5, C=3, size=128):
    """Inputs of the assigner's call as v8DetectionLoss makes them (gts zero-padded at the end,
    mask_gt = box sum > 0), plus the raw logits behind the scores."""
    g = torch.Generator().manual_seed(seed)
    points, stride_tensor = anchors(size)
    A = points.shape[0]
    n = torch.randint(1, M + 1, (B,), generator=g)
    real = torch.arange(M)[None] < n[:, None]
    wh = torch.rand(B, M, 2, generator=g) * 60 + 16
    xy = torch.rand(B, M, 2, generator=g) * (size - wh)
    gt_bboxes = torch.cat([xy, xy + wh], -1) * real[..., None]
    gt_labels = torch.randint(0, C, (B, M, 1), generator=g).float() * real[..., None]
    mask_gt = gt_bboxes.sum(2, keepdim=True).gt(0).float()
    pwh = torch.rand(B, A, 2, generator=g) * 60 + 8
    pd_bboxes = torch.cat([points - pwh / 2, points + pwh / 2], -1)
    logits = torch.randn(B, A, C, generator=g) * 2
    return dict(pd_scores=logits.sigmoid(), pd_bboxes=pd_bboxes, anc_points=points,
                gt_labels=gt_labels, gt_bboxes=gt_bboxes, mask_gt=mask_gt), logits, stride_tensor


def call(assigner, inputs, **kw):
    keys = ("pd_scores", "pd_bboxes", "anc_points", "gt_labels", "gt_bboxes", "mask_gt")
    return assigner(*(inputs[k] for k in keys), **kw)


@pytest.mark.parametrize("seed", range(3))
def test_outputs_follow_stock_conventions_and_equal_the_op(seed):
    inputs, logits, stride_tensor = random_batch(seed)
    stock = TaskAlignedAssigner(topk=10, num_classes=3, alpha=0.5, beta=6.0)
    ref = call(stock, inputs)
    out = call(DSLAssigner(num_classes=3), inputs, stride_tensor=stride_tensor, pd_logits=logits)
    for a, b in zip(ref, out):
        assert a.shape == b.shape and a.dtype == b.dtype
    labels, boxes, scores, fg, gt_idx = out
    # the assignment is dsl_assign's on priors (anchor point, stride, stride)
    priors = torch.cat([inputs["anc_points"], stride_tensor, stride_tensor], 1)
    mask = inputs["mask_gt"][..., 0] > 0
    a = ops.dsl_assign(priors, inputs["pd_bboxes"], logits, inputs["gt_bboxes"],
                       inputs["gt_labels"][..., 0].long(), mask)
    assert torch.equal(fg, a.gt_index >= 0) and fg.sum() > 10
    assert torch.equal(gt_idx, a.gt_index.clamp(min=0))
    assert torch.equal(labels[fg], a.labels[fg])
    gathered = torch.gather(inputs["gt_bboxes"], 1, gt_idx[..., None].expand(-1, -1, 4))
    assert torch.equal(boxes, gathered)
    # soft labels: the matched IoU at the assigned class, nothing else
    expected = torch.zeros_like(scores)
    expected.scatter_(2, labels[..., None], a.ious[..., None])
    assert torch.equal(scores, expected) and (scores[fg].amax(-1) > 0).all()
    # background: stock's conventions (gt 0's index, label and box; zero scores)
    bg = ~fg
    assert (gt_idx[bg] == 0).all() and (scores[bg] == 0).all()
    first_label = inputs["gt_labels"][:, :1, 0].long().expand_as(labels)
    assert torch.equal(labels[bg], first_label[bg])
    # the same from the scores alone (logits recovered from the sigmoid) and inferred strides
    again = call(DSLAssigner(num_classes=3), inputs)
    assert torch.equal(again[3], fg) and torch.equal(again[4], gt_idx)
    torch.testing.assert_close(again[2], scores)


def test_stride_inference():
    points, stride_tensor = anchors(128)
    assigner = DSLAssigner(stride=[8, 16, 32])
    assert torch.equal(assigner._infer_strides(points), stride_tensor[:, 0])
    p6 = torch.tensor([8.0, 16.0, 32.0, 64.0])
    points, stride_tensor = anchors(256, p6)
    assert torch.equal(DSLAssigner(stride=p6.tolist())._infer_strides(points), stride_tensor[:, 0])
    inputs, _, _ = random_batch(0)
    inputs["anc_points"] = inputs["anc_points"] - 0.5 * anchors(128)[1]   # corners, not centres
    with pytest.raises(ValueError, match="pass stride_tensor"):
        call(DSLAssigner(num_classes=3), inputs)


def test_no_gts_matches_stock():
    inputs, _, _ = random_batch(1)
    for k in ("gt_labels", "gt_bboxes", "mask_gt"):
        inputs[k] = inputs[k][:, :0]
    ref = call(TaskAlignedAssigner(num_classes=3), inputs)
    out = call(DSLAssigner(num_classes=3), inputs)
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_saturated_scores_and_bad_shapes():
    inputs, logits, _ = random_batch(2)
    inputs["pd_scores"] = (logits * 100).sigmoid()              # exactly 0 and 1 in float32
    assert (inputs["pd_scores"] == 1).any() and (inputs["pd_scores"] == 0).any()
    labels, boxes, scores, fg, gt_idx = call(DSLAssigner(num_classes=3), inputs)
    assert fg.any() and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match=r"mask_gt must be \(B, M, 1\)"):
        call(DSLAssigner(num_classes=3), dict(inputs, mask_gt=inputs["mask_gt"][..., 0]))
    with pytest.raises(ValueError, match=r"anc_points must be \(A, 2\)"):
        call(DSLAssigner(num_classes=3), dict(inputs, anc_points=inputs["anc_points"][:-1]))


def test_crowded_batch_in_one_pass(monkeypatch):
    """Thousands of gts per image (where stock TaskAlignedAssigner's (B, M, A) tensors push it
    into its per-image retry on a GPU): one dsl_assign call for the batch, equal to per-image."""
    g = torch.Generator().manual_seed(5)
    size, B, M = 256, 2, 3000
    points, stride_tensor = anchors(size)
    A = points.shape[0]
    wh = torch.rand(B, M, 2, generator=g) * 24 + 4
    xy = torch.rand(B, M, 2, generator=g) * (size - wh)
    gt_bboxes = torch.cat([xy, xy + wh], -1)
    gt_bboxes[1, 2500:] = 0                                       # image 1: 2500 gts
    inputs = dict(pd_scores=torch.rand(B, A, 4, generator=g),
                  pd_bboxes=torch.cat([points - 8, points + 8], -1).expand(B, A, 4).contiguous(),
                  anc_points=points, gt_labels=torch.randint(0, 4, (B, M, 1), generator=g).float(),
                  gt_bboxes=gt_bboxes, mask_gt=gt_bboxes.sum(2, keepdim=True).gt(0).float())
    calls = []
    real_assign = ops.dsl_assign
    monkeypatch.setattr(ops, "dsl_assign",
                        lambda *a, **k: calls.append(a[1].shape) or real_assign(*a, **k))
    assigner = DSLAssigner(num_classes=4)
    out = call(assigner, inputs, stride_tensor=stride_tensor)
    assert calls == [torch.Size([B, A, 4])]                      # one pass over the batch
    assert out[3].sum() > 500
    for i, m in enumerate((3000, 2500)):                          # equal to each image alone
        one = {k: (v if k == "anc_points" else v[i:i + 1]) for k, v in inputs.items()}
        for k in ("gt_labels", "gt_bboxes", "mask_gt"):
            one[k] = one[k][:, :m]
        alone = call(assigner, one, stride_tensor=stride_tensor)
        for a, b in zip(out, alone):
            assert torch.equal(a[i], b[0])


def test_detection_loss_on_a_real_yolov8(monkeypatch):
    torch.manual_seed(0)
    model = DSLADetectionModel("yolov8n.yaml", nc=2, verbose=False)
    model.args = get_cfg()                     # the hyper-parameters (box, cls, dfl gains)
    model.train()
    seen = []
    real_forward = DSLAssigner.forward
    monkeypatch.setattr(DSLAssigner, "forward",
                        lambda self, *a, **k: seen.append(k) or real_forward(self, *a, **k))
    images = torch.rand(2, 3, 64, 64)
    batch = dict(img=images, batch_idx=torch.tensor([0.0, 0.0, 1.0]),
                 cls=torch.tensor([[0.0], [1.0], [1.0]]),                       # normalised xywh:
                 bboxes=torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.7, 0.6, 0.3, 0.5],
                                      [0.5, 0.5, 0.6, 0.6]]))
    loss, items = model.loss(batch)
    assert isinstance(model.criterion, DSLADetectionLoss)
    assert isinstance(model.criterion.assigner, DSLAssigner) and model.criterion.assigner.topk == 13
    assert len(seen) == 1 and seen[0]["stride_tensor"].shape == (84, 1)
    assert seen[0]["pd_logits"].shape == (2, 84, 2)
    assert torch.isfinite(loss).all() and loss.sum() > 0
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_end_to_end_heads_are_refused():
    model = DSLADetectionModel("yolov10n.yaml", nc=2, verbose=False)
    model.args = get_cfg()
    with pytest.raises(ValueError, match="E2ELoss"):
        model.init_criterion()


def write_dataset(root, n=8, size=64):
    """n images with 1-3 red/blue rectangles, YOLO txt labels, a data yaml (train = val)."""
    import cv2
    rng = np.random.default_rng(0)
    for d in ("images/train", "labels/train"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        img = np.full((size, size, 3), 114, np.uint8)
        lines = []
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(12, 32, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            c = int(rng.integers(0, 2))
            img[y:y + h, x:x + w] = (0, 0, 255) if c == 0 else (255, 0, 0)
            xywh = np.array([x + w / 2, y + h / 2, w, h]) / size
            lines.append(f"{c} " + " ".join(f"{v:.6f}" for v in xywh))
        cv2.imwrite(str(root / "images/train" / f"{i}.png"), img)
        (root / "labels/train" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/train\n"
                    "names:\n  0: red\n  1: blue\n")
    return yaml


@pytest.mark.parametrize("device", ["cpu", pytest.param("0", marks=pytest.mark.gpu)])
def test_yolo_trains_with_the_dsla_trainer(tmp_path, monkeypatch, device):
    from ultralytics import YOLO
    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test_yolo_trains_with_the_dsla_trainer: network access to {address} "
                      "blocked")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    calls = []
    real_forward = DSLAssigner.forward
    def counted(self, *args, **kwargs):
        calls.append(args[0].shape)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(DSLAssigner, "forward", counted)
    data = write_dataset(tmp_path / "data")
    yolo = YOLO("yolov8n.yaml")
    # amp=False: on CUDA, ultralytics' AMP check would fetch yolov8n.pt; plots=False: a font
    yolo.train(data=str(data), trainer=DSLADetectionTrainer, epochs=1, imgsz=64, batch=4,
               workers=0, device=device, val=False, plots=False, amp=False, exist_ok=True,
               project=str(tmp_path / "runs"), name="dsla", verbose=False)
    assert attempts == [], f"training tried to reach the network: {attempts}"
    trainer = yolo.trainer
    assert isinstance(trainer, DSLADetectionTrainer)
    assert isinstance(trainer.model, DSLADetectionModel)
    assert isinstance(trainer.model.criterion, DSLADetectionLoss)
    assert isinstance(trainer.ema.ema, DSLADetectionModel)       # the EMA deep copy keeps it
    assert sum(1 for s in calls if s[0] == 4) >= 2                # both training batches of 4
    losses = [float(v) for v in trainer.tloss.values()]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (tmp_path / "runs" / "dsla" / "weights" / "last.pt").exists()


@pytest.mark.gpu
def test_cuda_tensors_with_backend_auto():
    inputs, logits, stride_tensor = random_batch(7, B=4)
    assigner = DSLAssigner(num_classes=3)
    cpu = call(assigner, inputs, stride_tensor=stride_tensor, pd_logits=logits)
    gpu = call(assigner, {k: v.cuda() for k, v in inputs.items()},
               stride_tensor=stride_tensor.cuda(), pd_logits=logits.cuda())
    for a, b in zip(cpu, gpu):
        assert b.is_cuda
        # IoUs (target_scores) from the GPU kernel may differ in the last bits; the rest exactly
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=1e-6 if a.is_floating_point() else 0)
