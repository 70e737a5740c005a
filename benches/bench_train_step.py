"""One RTMDet training step on the GPU: forward + head loss + backward + AdamW step.

    python benches/bench_train_step.py --out DIR [--model s] [--batch 64] [--size 640] [--gts 32]

For every backend (auto = fused ops, torch = reference) and variant (fp32, bf16 autocast,
each also channels_last) it reports the median step time over --iters steps after
--warmup (CUDA events), images/s, peak memory, and the time of `head_loss` forward +
backward alone on the same head outputs (assignment + losses) with its share of the step.
Writes train_step.json and train_step.md under --out.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rtmdet  # noqa: E402
from rtmdet import ops  # noqa: E402

VARIANTS = {"fp32": (None, False), "bf16": (torch.bfloat16, False),
            "fp32+channels_last": (None, True), "bf16+channels_last": (torch.bfloat16, True)}


def random_batch(B, size, G, num_classes, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(B, 3, size, size, generator=g)
    xy = torch.rand(B, G, 2, generator=g) * size * 0.8
    wh = torch.rand(B, G, 2, generator=g) * size * 0.45 + 16
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
    labels = torch.randint(0, num_classes, (B, G), generator=g)
    mask = torch.ones(B, G, dtype=torch.bool)
    return (images.to(device), {"boxes": boxes.to(device), "labels": labels.to(device),
                                "mask": mask.to(device)})


def time_cuda(fn, iters, warmup, device):
    """Median and p20/p80 milliseconds of fn() over `iters` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if not cuda:  # --device cpu: a smoke test of this script, not a benchmark
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
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3]


def bench_one(args, backend, variant, adamw="default"):
    dtype, channels_last = VARIANTS[variant]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = rtmdet.RTMDet.from_name(args.model).to(device).train()
    images, targets = random_batch(args.batch, args.size, args.gts, 80, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if adamw == "default":   # torch's own choice (foreach on CUDA)
        opt = torch.optim.AdamW(model.parameters(), lr=0.004 * args.batch / 256, weight_decay=0.05)
    else:                    # the trainer's optimizer: recipe groups, fused / foreach / for-loop
        from rtmdet.training.optim import build_adamw
        opt = build_adamw(model, 0.004 * args.batch / 256, 0.05, device, adamw)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            losses = model.loss(images, targets, backend=backend)
        (losses["loss_cls"] + losses["loss_bbox"]).backward()
        opt.step()

    def network_step():  # the same step with a trivial loss on the head outputs
        opt.zero_grad(set_to_none=True)
        with autocast():
            cls, reg = model(images)
        (sum(c.float().mean() for c in cls) + sum(r.float().mean() for r in reg)).backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms, step_p20, step_p80 = time_cuda(step, args.iters, args.warmup, device)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    net_ms, _, _ = time_cuda(network_step, args.iters, args.warmup, device)

    with torch.no_grad(), autocast():
        cls, reg = model(images)
    cls = [c.detach().requires_grad_() for c in cls]
    reg = [r.detach().requires_grad_() for r in reg]

    def loss_only():
        with autocast():
            losses = rtmdet.head_loss(cls, reg, targets["boxes"], targets["labels"],
                                      targets["mask"], strides=model.strides, backend=backend)
        torch.autograd.backward(losses["loss_cls"] + losses["loss_bbox"], inputs=cls + reg)

    loss_ms, _, _ = time_cuda(loss_only, args.iters, args.warmup, device)
    with autocast():
        losses = rtmdet.head_loss(cls, reg, targets["boxes"], targets["labels"], targets["mask"],
                                  strides=model.strides, backend=backend)
    ema_ms = ema_loop_ms = float("nan")
    if args.ema:   # the trainer's foreach EMA update against the per-tensor loop it replaced
        from rtmdet.training.ema import ModelEMA
        ema = ModelEMA(model)
        ema.update(model)
        avg = dict(ema.module.state_dict())
        src = model.state_dict()

        def loop_update():
            with torch.no_grad():
                for k, a in avg.items():
                    if a.dtype.is_floating_point:
                        a.mul_(0.9998).add_(src[k], alpha=0.0002)
                    else:
                        a.copy_(src[k])
        ema_ms, _, _ = time_cuda(lambda: ema.update(model), args.iters, args.warmup, device)
        ema_loop_ms, _, _ = time_cuda(loop_update, args.iters, args.warmup, device)
    return {
        "backend": backend, "variant": variant, "adamw": adamw, "ema_ms": ema_ms,
        "ema_loop_ms": ema_loop_ms, "batch": args.batch, "size": args.size,
        "gts": args.gts, "step_ms": step_ms, "step_p20_ms": step_p20, "step_p80_ms": step_p80,
        "images_per_s": args.batch * 1000 / step_ms, "network_step_ms": net_ms,
        "head_loss_fwd_bwd_ms": loss_ms, "head_loss_share": loss_ms / step_ms,
        "peak_mem_gib": peak_gib,
        "loss_cls": float(losses["loss_cls"].detach()), "loss_bbox": float(losses["loss_bbox"].detach()),
    }


def environment(device):
    info = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "rtmdet": rtmdet.__version__, "backends": ops.backend_info()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for train_step.json / .md")
    p.add_argument("--model", default="s", choices=["tiny", "s", "m", "l", "x"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--gts", type=int, default=32, help="random gts per image")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backends", default="auto,torch")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--adamw", default="default", help="comma list of AdamW implementations: default "
                   "(torch.optim.AdamW as is), fused, foreach, for-loop (the trainer's build_adamw)")
    p.add_argument("--ema", action="store_true", help="also time the EMA update (foreach vs per-tensor loop)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    p.add_argument("--value-checks", action="store_true",
                   help="keep the ops' NaN/label checks on (each one synchronises the host)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_step.py needs a CUDA GPU (--device cpu only smoke-tests it)")
    ops.set_value_checks(args.value_checks)
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    env = environment(args.device)
    print(f"# RTMDet-{args.model} train step, B={args.batch}, {args.size}x{args.size}, "
          f"G={args.gts} | {env['gpu']} | torch {env['torch']} CUDA {env['cuda']} "
          f"triton {env['triton']}")
    rows = []
    header = (f"{'backend':8} {'variant':20} {'adamw':9} {'step ms':>9} {'img/s':>8} {'net ms':>8} "
              f"{'loss ms':>8} {'loss %':>7} {'peak GiB':>9} {'EMA ms':>7} {'EMA loop':>8}")
    print(header)
    for backend in args.backends.split(","):
        for variant in args.variants.split(","):
            for adamw in args.adamw.split(","):
                r = bench_one(args, backend, variant, adamw)
                rows.append(r)
                print(f"{backend:8} {variant:20} {adamw:9} {r['step_ms']:9.1f} {r['images_per_s']:8.1f} "
                      f"{r['network_step_ms']:8.1f} {r['head_loss_fwd_bwd_ms']:8.2f} "
                      f"{100 * r['head_loss_share']:6.1f}% {r['peak_mem_gib']:9.2f} "
                      f"{r['ema_ms']:7.2f} {r['ema_loop_ms']:8.2f}", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump({"env": env, "args": vars(args), "results": rows}, f, indent=2)
    md = [f"# RTMDet-{args.model} training step", "",
          f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; "
          f"B={args.batch}, {args.size}x{args.size}, G={args.gts} random gts/image, AdamW; "
          f"median of {args.iters} steps after {args.warmup} warm-up (CUDA events). "
          "`loss` = head_loss forward + backward alone (assignment + QFL + GIoU); "
          "`net` = the step with a trivial loss.", "",
          "| backend | variant | AdamW | step ms (p20-p80) | img/s | net ms | loss ms | loss share | peak GiB "
          "| EMA foreach ms | EMA loop ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['backend']} | {r['variant']} | {r['adamw']} | {r['step_ms']:.1f} "
                  f"({r['step_p20_ms']:.1f}-{r['step_p80_ms']:.1f}) | {r['images_per_s']:.1f} | "
                  f"{r['network_step_ms']:.1f} | {r['head_loss_fwd_bwd_ms']:.2f} | "
                  f"{100 * r['head_loss_share']:.1f}% | {r['peak_mem_gib']:.2f} | {r['ema_ms']:.2f} | "
                  f"{r['ema_loop_ms']:.2f} |")
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}/train_step.json and train_step.md")


if __name__ == "__main__":
    main()
