"""End-to-end training throughput: the real trainer (data loading, logging, checkpoints on)
next to the step alone, for the same model, batch and precision.

    python benches/bench_e2e.py --out DIR [--quick] [--configs tiny@320:128,s@640:64,...]
                                [--epochs 6,3,6,2] [--workers 12] [--compile] [--device cuda]

For each config MODEL@SIZE:BATCH it runs
  1. step only: forward + head loss + backward + AdamW (+ EMA, reported apart) on one batch
     from the built-in dataset, already on the GPU, with the trainer's own settings (bf16
     autocast, channels_last, fused AdamW on CUDA); median of CUDA-event timings;
  2. end to end: `rtmdet.train.train(...)` in this process on the built-in synthetic set
     (2000 images, generated once into $RTMDET_CACHE), evaluation off, a checkpoint every
     epoch, log records every few steps. Steady-state images/s = median over log windows
     inside an epoch (not an epoch's first window, not the first --skip steps); time lost
     per epoch boundary = (wall time - steps x steady step time) / boundaries crossed;
     peak GPU memory of the run.
Writes e2e.json and e2e.md under --out and prints the table. Expected wall time on one H200
with the default configs: about 3-4 minutes (--quick: about 2), including the dataset
generation on a fresh machine (~30-60 s).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rtmdet import data as D  # noqa: E402
from rtmdet import ops  # noqa: E402
from rtmdet.model import RTMDet, normalize_images  # noqa: E402
from rtmdet.train import TrainConfig, read_log, train  # noqa: E402
from rtmdet.training.ema import ModelEMA  # noqa: E402
from rtmdet.training.inputs import augment_config, load_data, train_loader  # noqa: E402
from rtmdet.training.distributed import DistInfo  # noqa: E402
from rtmdet.training.loop import LossModule  # noqa: E402
from rtmdet.training.optim import build_adamw  # noqa: E402
from rtmdet.training.precision import autocast, resolve_amp, resolve_channels_last  # noqa: E402

DEFAULT_CONFIGS = "tiny@320:128,s@640:64,s@640:256,l@640:64"
DEFAULT_EPOCHS = "6,3,6,2"        # per config: ~40-100 steps each


def parse_config(text):
    model, rest = text.split("@")
    size, batch = rest.split(":")
    return model, int(size), int(batch)


def base_config(args, model, size, batch, out):
    return TrainConfig(model=model, data="synthetic", img_size=size, batch_size=batch,
                       num_train_images=args.num_train_images, num_val_images=args.num_val_images,
                       workers=args.workers, eval_interval=0, save_predictions=0, out=str(out),
                       device=args.device, amp=args.amp, compile=args.compile, backend="auto",
                       warmup_iters=50, progress=not args.no_progress)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_only(args, cfg):
    """Median ms of one training step (and of the EMA update) on a real batch on the device."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    amp, cl = resolve_amp(cfg.amp, device), resolve_channels_last(cfg.channels_last, device)
    splits = load_data(cfg)
    train_set = D.TrainDataset(splits.train, cfg.img_size, augment_config(cfg, device), seed=0)
    loader = train_loader(train_set, cfg, DistInfo(), device)
    batch = next(iter(loader.epoch(0, True)))
    loader.close()
    torch.manual_seed(0)
    model = RTMDet.from_name(cfg.model, num_classes=len(splits.train.classes)).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model)
    opt = build_adamw(model, 0.004 * cfg.batch_size / 256, 0.05, device, cfg.adamw)
    net = LossModule(model, cfg.backend, cfg.compile)
    images = normalize_images(batch["images"].to(device))
    if cl:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [batch[k].to(device) for k in ("boxes", "labels", "mask")]

    def step():
        with autocast(amp, device):
            losses = net(images, *targets)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, iters):
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with ops.value_checks(False):
        for _ in range(args.step_warmup):
            step()
        sync(device)
        ms = timed(step, args.step_iters)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    ema_ms = timed(lambda: ema.update(model), max(5, args.step_iters // 2))
    del model, ema, opt, net, images, targets
    return ms, ema_ms, peak


def end_to_end(args, cfg, epochs):
    """Run the trainer; steady-state ms per step, time lost per epoch boundary, peak memory."""
    device_is_cuda = args.device != "cpu" and torch.cuda.is_available()
    if device_is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg.epochs, cfg.stage2_epochs = epochs, 0
    cfg.log_interval = args.log_interval
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device_is_cuda else float("nan")
    recs = read_log(Path(cfg.out) / "log.jsonl")
    ipe = recs[0]["iters_per_epoch"]
    flushes = [r for r in recs if r["type"] == "train"]
    windows, waits = [], []
    for a, b in zip(flushes, flushes[1:]):
        same_epoch = a["epoch"] == b["epoch"] and a["iter"] < ipe
        if same_epoch and a["step"] >= args.skip:
            windows.append((b["time"] - a["time"]) / (b["step"] - a["step"]))
            waits.append(b["data_time"])
    first = next((r for r in flushes if r["step"] >= args.skip), flushes[0])
    last = flushes[-1]
    steady = statistics.median(windows) if windows else float("nan")
    boundaries = last["epoch"] - first["epoch"]
    lost = ((last["time"] - first["time"]) - (last["step"] - first["step"]) * steady) / boundaries \
        if boundaries else float("nan")
    logged = [r["boundary_time"] for r in recs if r["type"] == "epoch" and r.get("boundary_time") is not None]
    return {"steady_ms": 1000 * steady, "windows": len(windows),
            "data_wait_ms": 1000 * statistics.median(waits) if waits else float("nan"), "lost_per_boundary_s": lost,
            "boundary_time_logged_s": statistics.median(logged) if logged else None,
            "boundaries": boundaries, "steps": last["step"], "iters_per_epoch": ipe,
            "wall_s": wall, "peak_gib": peak}


def profile(args, model, size, batch, out):
    """torch.profiler over a short whole-trainer run (host and GPU); tables into profile.txt."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory(dir=out) as run_dir:
        cfg = base_config(args, model, size, batch, run_dir)
        cfg.epochs, cfg.max_iters, cfg.log_interval = 100, args.profile_steps, args.log_interval
        with torch_profile(activities=activities) as prof:
            train(cfg)
    text = [f"# profile: RTMDet-{model} {size}x{size} B={batch}, {args.profile_steps} steps of the "
            "whole trainer (start-up included)"]
    for key in (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]:
        text += ["", f"## by {key}", prof.key_averages().table(sort_by=key, row_limit=30)]
    (out / "profile.txt").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'profile.txt'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"MODEL@SIZE:BATCH,... (default {DEFAULT_CONFIGS})")
    p.add_argument("--epochs", default=DEFAULT_EPOCHS, help="end-to-end epochs per config (comma list)")
    p.add_argument("--quick", action="store_true", help="half the epochs (at least 2) and fewer step timings")
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 4) - 2)))
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-val-images", type=int, default=200)
    p.add_argument("--log-interval", type=int, default=5, help="steps per log record (a host sync each)")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the steady state")
    p.add_argument("--step-iters", type=int, default=20)
    p.add_argument("--step-warmup", type=int, default=5)
    p.add_argument("--amp", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both measurements")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also profile a short run (--profile-steps) of the first config: top ops by "
                        "self CUDA and CPU time into profile.txt (where the remaining time goes)")
    p.add_argument("--profile-steps", type=int, default=20)
    args = p.parse_args()
    configs = [parse_config(c) for c in args.configs.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    epochs = (epochs + [epochs[-1]] * len(configs))[:len(configs)]
    if args.quick:
        epochs = [max(2, e // 2) for e in epochs]
        args.step_iters, args.step_warmup = 10, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(), "workers": args.workers,
            "cpus": os.cpu_count()}
    rows = []
    t_all = time.time()
    for (model, size, batch), n_epochs in zip(configs, epochs):
        with tempfile.TemporaryDirectory(dir=out) as run_dir:
            cfg = base_config(args, model, size, batch, run_dir)
            ms, ema_ms, step_peak = step_only(args, cfg)
            e2e = end_to_end(args, base_config(args, model, size, batch, run_dir), n_epochs)
        row = {"config": f"RTMDet-{model} {size}x{size} B={batch}", "step_ms": ms,
               "step_img_s": batch / ms * 1000, "ema_ms": ema_ms, "step_peak_gib": step_peak,
               "e2e_img_s": batch / e2e["steady_ms"] * 1000, **e2e}
        row["e2e_over_step"] = row["e2e_img_s"] / row["step_img_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.profile:
        profile(args, *configs[0], out)
    info["total_wall_s"] = time.time() - t_all
    (out / "e2e.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    lines = [f"# bench_e2e ({info['date']}, {info['device']}, torch {info['torch']}, "
             f"{info['workers']} loader workers, {info['cpus']} CPUs)", "", f"`{info['command']}`", "",
             "| config | step only ms | step img/s | e2e steady ms | e2e img/s | e2e / step | data wait ms "
             "| EMA ms | lost per epoch boundary s (logged stall) | peak GiB e2e (step) | steps / epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        logged = "-" if r["boundary_time_logged_s"] is None else f"{r['boundary_time_logged_s']:.2f}"
        lines.append(f"| {r['config']} | {r['step_ms']:.1f} | {r['step_img_s']:.0f} | {r['steady_ms']:.1f} | "
                     f"{r['e2e_img_s']:.0f} | {r['e2e_over_step']:.2f} | {r['data_wait_ms']:.1f} | "
                     f"{r['ema_ms']:.2f} | "
                     f"{r['lost_per_boundary_s']:.2f} ({logged}) | {r['peak_gib']:.1f} ({r['step_peak_gib']:.1f}) | "
                     f"{r['steps']} / {r['boundaries'] + 1} |")
    lines.append("")
    lines.append(f"total wall time {info['total_wall_s']:.0f} s")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
