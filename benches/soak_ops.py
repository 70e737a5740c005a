"""Soak test of the fused ops on the GPU: many training-like head-loss calls (assignment + QFL +
GIoU, forward and backward) with B, N and G changing every call.

    python benches/soak_ops.py [--calls 20000] [--out DIR]

Warm-up first runs every combination of the batch sizes, image sizes and a few gt counts
(G = 0, 1, 7, 16, 19, 32, 33: Triton specialises integer arguments equal to 1 or divisible by
16, and G = 19 makes the resolve pass's tile count a multiple of 16, so these cover every
compiled variant); then `--calls` random calls draw B, the image size and
G in [0, 64] from the same sets. Prints a table of the allocator's current and peak memory per
window of calls and the number of Triton kernel variants compiled, and exits with status 1
(a line starting "SOAK FAILED") when anything was compiled after the warm-up, when memory in
use grows, or when a window's peak exceeds the warm-up peak. Value checks are off, as in
training. Writes DIR/soak_ops.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rtmdet  # noqa: E402
from rtmdet import kernels  # noqa: E402,F401
from rtmdet import ops  # noqa: E402

BATCHES = (1, 5, 8, 16, 32, 64)
IMAGES = (320, 480, 640)
WARM_GTS = (0, 1, 7, 16, 19, 32, 33)  # 19: 13 * 19 = 247 contested slots, 16 resolve tiles
C = 80
MB = 2 ** 20


def triton_variants():
    """Number of compiled variants over every Triton kernel of rtmdet.kernels."""
    import importlib
    import triton
    total = 0
    for name in ("dsla", "qfl", "giou"):
        mod = importlib.import_module(f"rtmdet.kernels.{name}")
        for obj in vars(mod).values():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                caches = getattr(obj, "device_caches", None)
                if caches is None:  # older layout
                    total += len(getattr(obj, "cache", {}).get(torch.cuda.current_device(), {}))
                    continue
                for entry in caches.values():
                    total += len(entry[0])
    return total


def make_inputs(B, img, G, gen, dtype):
    """Head outputs (levels of (B, C, H, W) logits and ltrb distances) and padded gts."""
    cls, reg = [], []
    for s in (8, 16, 32):
        h = w = img // s
        cls.append((torch.randn(B, C, h, w, device="cuda", generator=gen, dtype=dtype) * 2 - 4)
                   .requires_grad_())
        reg.append((torch.rand(B, 4, h, w, device="cuda", generator=gen) * 4 + 0.3).mul(s)
                   .requires_grad_())
    xy = torch.rand(B, G, 2, device="cuda", generator=gen) * img * 0.8
    wh = torch.rand(B, G, 2, device="cuda", generator=gen) * img * 0.5 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=img)], -1)
    labels = torch.randint(0, C, (B, G), device="cuda", generator=gen)
    mask = torch.rand(B, G, device="cuda", generator=gen) < 0.8
    return cls, reg, boxes, labels, mask


def one_call(B, img, G, gen, dtype):
    cls, reg, boxes, labels, mask = make_inputs(B, img, G, gen, dtype)
    losses = rtmdet.head_loss(cls, reg, boxes, labels, mask)
    total = losses["loss_cls"] + losses["loss_bbox"]
    total.backward()
    return total.detach()  # no graph kept alive: this call's tensors go before the next one's


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("soak_ops.py needs a CUDA device")
    ops.set_value_checks(False)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    pick = torch.Generator().manual_seed(args.seed)
    dtypes = (torch.float32, torch.bfloat16)

    t0 = time.time()
    for B in BATCHES:
        for img in IMAGES:
            for G in WARM_GTS:
                for dtype in dtypes:
                    one_call(B, img, G, gen, dtype)
    torch.cuda.synchronize()
    warm_variants = triton_variants()
    warm_current = torch.cuda.memory_allocated()
    warm_peak = torch.cuda.max_memory_allocated()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"warm-up: {len(BATCHES) * len(IMAGES) * len(WARM_GTS) * 2} calls in "
          f"{time.time() - t0:.1f} s, {warm_variants} Triton variants, "
          f"current {warm_current / MB:.1f} MB, peak {warm_peak / MB:.1f} MB")
    print("| calls | seconds | current MB | window peak MB | Triton variants | non-finite losses |")
    print("|---|---|---|---|---|---|")
    rows, bad_losses = [], 0
    t0 = time.time()
    torch.cuda.reset_peak_memory_stats()
    for i in range(1, args.calls + 1):
        B = BATCHES[int(torch.randint(len(BATCHES), (1,), generator=pick))]
        img = IMAGES[int(torch.randint(len(IMAGES), (1,), generator=pick))]
        G = int(torch.randint(0, 65, (1,), generator=pick))
        dtype = dtypes[int(torch.randint(2, (1,), generator=pick))]
        losses = one_call(B, img, G, gen, dtype)
        if i % args.window == 0 or i == args.calls:
            finite = bool(torch.isfinite(losses))
            bad_losses += 0 if finite else 1
            torch.cuda.synchronize()
            row = dict(calls=i, seconds=time.time() - t0,
                       current_mb=torch.cuda.memory_allocated() / MB,
                       peak_mb=torch.cuda.max_memory_allocated() / MB,
                       variants=triton_variants(), non_finite=bad_losses)
            rows.append(row)
            print(f"| {i} | {row['seconds']:.1f} | {row['current_mb']:.1f} | {row['peak_mb']:.1f} "
                  f"| {row['variants']} | {bad_losses} |", flush=True)
            torch.cuda.reset_peak_memory_stats()

    failures = []
    if rows[-1]["variants"] != warm_variants:
        failures.append(f"{rows[-1]['variants'] - warm_variants} Triton variants compiled after "
                        "the warm-up")
    if rows[-1]["current_mb"] > warm_current / MB + 16:
        failures.append(f"memory in use grew from {warm_current / MB:.1f} to "
                        f"{rows[-1]['current_mb']:.1f} MB")
    worst = max(r["peak_mb"] for r in rows)
    if worst > warm_peak / MB * 1.05 + 16:
        failures.append(f"a window's peak {worst:.1f} MB exceeds the warm-up peak "
                        f"{warm_peak / MB:.1f} MB")
    if bad_losses:
        failures.append(f"{bad_losses} sampled losses were not finite")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "soak_ops.json"), "w") as f:
            json.dump(dict(warm_variants=warm_variants, warm_current_mb=warm_current / MB,
                           warm_peak_mb=warm_peak / MB, rows=rows, failures=failures), f, indent=1)
    if failures:
        print("SOAK FAILED: " + "; ".join(failures))
        sys.exit(1)
    print(f"soak passed: {args.calls} calls, no compilation after warm-up, no memory growth")


if __name__ == "__main__":
    main()
