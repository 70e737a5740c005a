"""The framework drop-ins on the GPU (issue 11): mmdetection RTMDet-s training steps, mmyolo's
batched assigner.

    python benches/bench_integrations.py --log PATH [--batch 64] [--size 640] [--gts 32]

1. An mmdetection 3.x RTMDet-s training step (backbone, neck, head, loss, backward, AdamW),
   fp32, built from configs/mmdet/rtmdet_s_fused.py (mmdet's RTMDet-s config with the head
   swapped), B images of size x size with --gts gts each, one process, same weights and batch:
     network only  (forward + a trivial loss on the head outputs + backward + AdamW)
     stock         (RTMDetSepBNHead + DynamicSoftLabelAssigner)
     stock head + FusedDynamicSoftLabelAssigner (per-image assign calls)
     FusedRTMDetSepBNHead (one batched assignment, fused QFL/GIoU)
   p20/p50/p80 step times over --iters steps after --warmup (CUDA events), peak memory, the
   step / network-only ratio (target: fused <= 1.1x), and the first step's losses of every
   variant (they must agree).
2. mmyolo 0.6's BatchDynamicSoftLabelAssigner vs rtmdet.integrations.mmyolo's
   FusedBatchDynamicSoftLabelAssigner at B x 8400 priors x G gts, 80 classes.
Writes one readable log (--log) and prints it. Needs mmdet 3.3, mmengine, mmcv(-lite), mmyolo;
with mmcv-lite, tests/mmcv_stub.py stands in for the missing mmcv._ext (no compiled mmcv op is
called: no inference, no NMS). --device cpu --batch 2 --size 128 is a smoke test of the script.
"""
import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from tests.mmcv_stub import install_mmcv_ext_stub  # noqa: E402

install_mmcv_ext_stub()
import rtmdet  # noqa: E402
import rtmdet.integrations.mmdet  # noqa: E402,F401  (registers the Fused* classes)
from rtmdet import ops  # noqa: E402

LINES = []


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def load_config(path):
    """mmengine.Config.fromfile; mmengine 0.10.7 resolves `mmdet::` bases through pkg_resources,
    which setuptools >= 81 dropped: answer the same lookup through importlib where it is missing."""
    import mmengine.config.config as mc
    if importlib.util.find_spec("pkg_resources") is None:
        mc.is_installed = lambda p: importlib.util.find_spec(p) is not None
        mc.get_installed_path = lambda p: os.path.dirname(importlib.util.find_spec(p).origin)
    return mc.Config.fromfile(path)


def timed(fn, iters, warmup, device):
    """p20/p50/p80 milliseconds of fn() (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"p20": pick(0.2), "p50": pick(0.5), "p80": pick(0.8)}


def random_gts(B, G, size, C, gen):
    xy = torch.rand(B, G, 2, generator=gen) * size * 0.8
    wh = torch.rand(B, G, 2, generator=gen) * size * 0.45 + 16
    return (torch.cat([xy, (xy + wh).clamp(max=size)], -1),
            torch.randint(0, C, (B, G), generator=gen))


def mmdet_batch(B, size, G, device):
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(B, 3, size, size, generator=gen).to(device)  # already normalised
    boxes, labels = random_gts(B, G, size, 80, gen)
    samples = []
    for b in range(B):
        s = DetDataSample(metainfo=dict(img_shape=(size, size), pad_shape=(size, size),
                                        batch_input_shape=(size, size), scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=boxes[b].to(device), labels=labels[b].to(device))
        samples.append(s)
    return inputs, samples


def bench_mmdet(args, device):
    from mmdet.registry import MODELS  # builds from mmdet.models only (no datasets/evaluation)
    cfg = load_config(os.path.join(ROOT, "configs/mmdet/rtmdet_s_fused.py"))
    variants = {
        "network only": ("RTMDetSepBNHead", "DynamicSoftLabelAssigner"),
        "stock": ("RTMDetSepBNHead", "DynamicSoftLabelAssigner"),
        "stock head + FusedDynamicSoftLabelAssigner": ("RTMDetSepBNHead", "FusedDynamicSoftLabelAssigner"),
        "FusedRTMDetSepBNHead": ("FusedRTMDetSepBNHead", "DynamicSoftLabelAssigner"),
    }
    inputs, samples = mmdet_batch(args.batch, args.size, args.gts, device)
    log(f"## mmdetection RTMDet-s training step: B={args.batch}, {args.size}x{args.size}, "
        f"{args.gts} gts/image, fp32, AdamW, warmup {args.warmup}, {args.iters} timed steps")
    state, results = None, {}
    for name, (head, assigner) in variants.items():
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.bbox_head.type = head
        model_cfg.train_cfg.assigner.type = assigner
        model_cfg.backbone.init_cfg = None  # no checkpoint download
        torch.manual_seed(0)
        model = MODELS.build(model_cfg)
        if state is None:
            model.init_weights()  # what mmengine's Runner does (the backbone without a checkpoint)
            state = copy.deepcopy(model.state_dict())
        model.load_state_dict(state)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.004 * args.batch / 256, weight_decay=0.05)
        first = {}

        def step():
            opt.zero_grad(set_to_none=True)
            if name == "network only":
                cls, reg = model.bbox_head(model.extract_feat(inputs))
                loss = sum(c.float().mean() for c in cls) + sum(r.float().mean() for r in reg)
            else:
                losses = model.loss(inputs, samples)
                if not first:
                    first.update({k: float(sum(v).detach() if isinstance(v, list) else v.detach())
                                  for k, v in losses.items()})
                loss = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, args.iters, args.warmup, device)
        t["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        t["first_step_losses"] = first
        results[name] = t
        del model, opt
    net = results["network only"]["p50"]
    log(f"{'variant':46s} {'p20':>8s} {'p50':>8s} {'p80':>8s}  {'x network':>9s}  peak GB  first-step losses")
    for name, t in results.items():
        mem = "-" if t["peak_mem_gb"] is None else f"{t['peak_mem_gb']:.1f}"
        losses = " ".join(f"{k}={v:.6f}" for k, v in t["first_step_losses"].items())
        log(f"{name:46s} {t['p20']:8.1f} {t['p50']:8.1f} {t['p80']:8.1f}  {t['p50'] / net:8.2f}x  "
            f"{mem:>7s}  {losses}")
    fused, stock = results["FusedRTMDetSepBNHead"]["p50"], results["stock"]["p50"]
    log(f"fused step / network-only = {fused / net:.3f} (target <= 1.1); "
        f"stock / fused = {stock / fused:.2f}x; head + loss share of the fused step "
        f"{100 * (fused - net) / fused:.1f}% (stock {100 * (stock - net) / stock:.1f}%)")
    return results


def bench_mmyolo(args, device):
    log("")
    try:
        from mmyolo.models.task_modules.assigners import BatchDynamicSoftLabelAssigner
    except ImportError as exc:
        log(f"## mmyolo batched assigner: skipped, mmyolo not importable ({exc})")
        return None
    try:
        from rtmdet.integrations.mmyolo import FusedBatchDynamicSoftLabelAssigner
    except ImportError as exc:
        log(f"## mmyolo batched assigner: skipped, rtmdet.integrations.mmyolo not importable ({exc})")
        return None
    B, G, C = args.batch, args.gts, 80
    sizes = [(args.size // s, args.size // s) for s in (8, 16, 32)]
    priors = ops.grid_priors(sizes, device=device)
    gen = torch.Generator().manual_seed(1)
    boxes, labels = random_gts(B, G, args.size, C, gen)
    N = priors.shape[0]
    dist = (torch.rand(B, N, 4, generator=gen) * 4 + 0.5).to(device) * priors[None, :, 2:3]
    pred_bboxes = ops.distance2bbox(priors[None, :, :2], dist)
    pred_scores = (torch.randn(B, N, C, generator=gen) * 2 - 4).to(device)
    gt_labels = labels[..., None].float().to(device)
    gt_bboxes = boxes.to(device)
    flag = torch.ones(B, G, 1, device=device)
    call = (pred_bboxes, pred_scores, priors, gt_labels, gt_bboxes, flag)
    stock = BatchDynamicSoftLabelAssigner(num_classes=C)
    ours = FusedBatchDynamicSoftLabelAssigner(num_classes=C)
    a, b = stock(*call), ours(*call)
    same = {k: bool(torch.equal(a[k], b[k])) if a[k].dtype == torch.long
            else bool(torch.allclose(a[k].float(), b[k].float(), atol=1e-5)) for k in a}
    log(f"## mmyolo batched assigner: B={B}, N={N}, G={G}, C={C} (all gts real); outputs "
        f"equal: {same}")
    res = {}
    for name, fn in (("BatchDynamicSoftLabelAssigner (mmyolo)", lambda: stock(*call)),
                     ("FusedBatchDynamicSoftLabelAssigner (ours)", lambda: ours(*call))):
        res[name] = timed(fn, max(args.iters, 20), 3, device)
        t = res[name]
        log(f"{name:46s} p20 {t['p20']:8.3f}  p50 {t['p50']:8.3f}  p80 {t['p80']:8.3f} ms")
    s, o = (res[k]["p50"] for k in res)
    log(f"stock / ours = {s / o:.0f}x (target: ours <= 1 ms)")
    res["outputs_equal"] = same
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="bench_integrations.log")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--gts", type=int, default=32)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    ops.set_value_checks(False)  # as the trainer does: no host syncs from the ops' checks
    import mmdet
    import mmengine
    t0 = time.time()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    log(f"# bench_integrations  {time.strftime('%Y-%m-%d %H:%M:%S')}  {gpu}")
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}, "
        f"mmdet {mmdet.__version__}, mmengine {mmengine.__version__}, rtmdet {rtmdet.__version__}; "
        f"backends {json.dumps(ops.backend_info())}")
    log(f"cudnn.benchmark={torch.backends.cudnn.benchmark} (mmdet's default), "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    log("")
    results = {"mmdet": bench_mmdet(args, device), "mmyolo": bench_mmyolo(args, device)}
    log(f"\ntotal {time.time() - t0:.0f} s")
    log("json " + json.dumps(results))
    with open(args.log, "w") as f:
        f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
