"""The training data pipeline alone: images/s at --size with Mosaic + MixUp (stage 1) and
without (stage 2), on the built-in synthetic set (320 px images, default generator settings).

    python benches/bench_data.py [--size 640] [--images 256] [--samples 96] [--workers 0 14]
                                 [--batch 64] [--batches 12] [--backends cv2 pil] [--out DIR]

For each augmentation backend, single process: --samples samples per stage, with the time of
each transform (image decode, Mosaic, random resize + crop, HSV, flip, pad, MixUp, collate)
per sample and its share, in CPU time (one thread: the rate of a worker on a core of its own).
Then for each worker count N > 0: a persistent `TrainLoader` (batch --batch), epoch after
epoch, timed over --batches batches after the first (worker start-up excluded): images/s,
per worker, and the longest wait for one batch (an epoch-boundary stall would show here).
Writes data_bench.json and data_bench.md under --out (default: print only).
"""
import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rtmdet import data as D  # noqa: E402
from rtmdet.data import datasets as pipeline  # noqa: E402

# CPU time of this process: the rate on a core of its own, even on a shared machine
CLOCK = time.process_time
STEPS = ("mosaic", "random_resize_crop", "hsv_jitter", "hflip", "pad", "mixup")


def bench_set(num_images):
    """The first `num_images` training images of the built-in set (same generator and seed)."""
    root = D.default_cache_dir() / f"bench-data-{num_images}"
    D.ensure_synthetic(root, num_train=num_images, num_val=1)
    return D.CocoDetection(*D.dataset_paths(root, "train"))


class Timed:
    """Wraps the pipeline's transforms (and the image reader) to sum their times; the
    inner times of nested calls (rescale inside mosaic) count for the outer step."""

    def __init__(self, base):
        self.totals = defaultdict(float)
        self.base = base
        self.originals = {name: getattr(pipeline, name) for name in STEPS}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(pipeline, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(pipeline, name, fn)

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = CLOCK()
            out = fn(*args, **kwargs)
            self.totals[name] += CLOCK() - t
            return out
        return timed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):   # stands in for the base dataset: decode time
        t = CLOCK()
        out = self.base[i]
        self.totals["read_image"] += CLOCK() - t
        return out


def single_process(base, size, samples, strong, backend, seed=0):
    timed = Timed(base)
    ds = D.TrainDataset(timed, size, aug=D.AugmentConfig.for_model("s", backend=backend), seed=seed)
    with timed:
        ds[(0, strong, 0)]   # warm-up (imports, first allocations)
        timed.totals.clear()
        out = []
        t0, w0 = CLOCK(), time.perf_counter()
        for pos in range(samples):
            out.append(ds[(0, strong, pos % len(ds))])
        t_aug = CLOCK() - t0
    t = CLOCK()
    for k in range(0, samples, 16):
        D.collate(out[k:k + 16])
    timed.totals["collate"] = CLOCK() - t
    wall = time.perf_counter() - w0
    total = t_aug + timed.totals["collate"]
    steps = {k: {"ms_per_image": 1e3 * v / samples, "share": v / total} for k, v in timed.totals.items()}
    return {"images_per_s": samples / total, "ms_per_image": 1e3 * total / samples,
            "wall_images_per_s": samples / wall, "steps": steps}


def with_workers(base, size, workers, batch, batches, strong, backend, seed=0):
    """`batches` batches of a persistent TrainLoader, epoch after epoch (in order, so one
    stream: epoch boundaries included), timed after the first batch (worker start-up)."""
    ds = D.TrainDataset(base, size, aug=D.AugmentConfig.for_model("s", backend=backend), seed=seed)
    with D.TrainLoader(ds, batch_size=batch, workers=workers, seed=seed,
                       pin_memory=torch.cuda.is_available(), prefetch_factor=2) as loader:
        stream = itertools.chain.from_iterable(loader.epoch(e, strong) for e in itertools.count())
        t = time.perf_counter()
        next(stream)
        startup = time.perf_counter() - t
        waits = []
        t0 = time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            next(stream)
            waits.append(time.perf_counter() - t)
        dt = time.perf_counter() - t0
        restarts = loader.restarts
    ips = batches * batch / dt
    return {"workers": workers, "images_per_s": ips, "per_worker": ips / workers, "startup_s": startup,
            "longest_wait_s": max(waits), "epochs": batches / len(loader), "restarts": restarts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--images", type=int, default=256, help="images in the bench set")
    ap.add_argument("--samples", type=int, default=96, help="single-process samples per stage")
    ap.add_argument("--workers", type=int, nargs="*", default=[0], help="worker counts (0: single process only)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=16, help="timed batches per worker count")
    ap.add_argument("--backends", nargs="+", default=["cv2", "pil"], choices=D.BACKENDS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = bench_set(args.images)
    result = {"size": args.size, "images": args.images, "host": platform.node(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "numpy": np.__version__, "stages": {}}
    try:
        import cv2
        result["cv2"] = cv2.__version__
    except ImportError:
        pass
    lines = [f"# data pipeline at {args.size} px ({os.cpu_count()} CPUs, torch {torch.__version__})", ""]
    plan = [(f"{be}: {stage}", strong, be) for be in args.backends
            for stage, strong in (("stage1 (mosaic+mixup)", True), ("stage2", False))]
    for stage, strong, backend in plan:
        res = {"single": single_process(base, args.size, args.samples, strong, backend)}
        s = res["single"]
        lines += [f"## {stage}", "", f"single process: {s['images_per_s']:.1f} img/s of CPU time "
                  f"({s['ms_per_image']:.2f} ms/img; {s['wall_images_per_s']:.1f} img/s wall)", "", "| step | ms/img | share |", "|---|---|---|"]
        for k, v in sorted(s["steps"].items(), key=lambda kv: -kv[1]["ms_per_image"]):
            lines.append(f"| {k} | {v['ms_per_image']:.2f} | {100 * v['share']:.0f}% |")
        res["loader"] = [with_workers(base, args.size, w, args.batch, args.batches, strong, backend)
                         for w in args.workers if w > 0]
        for r in res["loader"]:
            lines.append(f"\n{r['workers']} workers, batch {args.batch}: {r['images_per_s']:.0f} img/s "
                         f"({r['per_worker']:.1f} per worker) over {r['epochs']:.1f} epochs; start-up "
                         f"{r['startup_s']:.2f} s, longest wait for a batch {r['longest_wait_s']:.3f} s, "
                         f"{r['restarts']} stream start(s)")
        lines.append("")
        result["stages"][stage] = res
        print("\n".join(lines), flush=True)
        lines = []
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_bench.json").write_text(json.dumps(result, indent=1))
        md = [f"# data pipeline at {args.size} px"]
        for stage, res in result["stages"].items():
            md.append(f"{stage}: {res['single']['images_per_s']:.1f} img/s single process; " + "; ".join(
                f"{r['workers']} workers {r['images_per_s']:.0f} img/s ({r['per_worker']:.1f}/worker)"
                for r in res["loader"]))
        (args.out / "data_bench.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
