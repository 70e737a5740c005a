"""Soak test of a long training run: kill it mid-way, resume, compare with a straight run.

    python benches/soak_train.py --out DIR [--model s] [--img-size 640] [--batch-size 64]
                                 [--steps 300] [--checkpoint-iters 50] [--kill-at 0.6]
                                 [--signal KILL|INT] [--workers 12]

Runs `python -m rtmdet train` twice on the built-in dataset for --steps optimizer steps
(--max-iters, evaluation off, --checkpoint-iters): once straight, once killed (SIGKILL: a
crash, or SIGINT: Ctrl-C) when its log reaches kill-at x steps, then `--resume auto` to the
end. Compares the two loss curves (log.jsonl) step by step and the final weights, and writes
soak.json / soak.md. On the CPU the curves must be identical; on a GPU, non-deterministic
kernels (atomics in cuDNN's backward) let them drift apart slowly, so the report gives the
differences before and after the kill. An hour of RTMDet-s steps is ~36000 at 0.1 s; the
default 300 is what fits the GPU time we have: say so when quoting it.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(args, out, resume=False):
    epochs = 300   # the recipe's schedule; --max-iters ends the run
    cmd = [sys.executable, "-m", "rtmdet", "train", "--model", args.model, "--data", "synthetic",
           "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", str(epochs),
           "--max-iters", str(args.steps), "--checkpoint-iters", str(args.checkpoint_iters),
           "--eval-interval", "0", "--save-predictions", "0", "--log-interval", str(args.log_interval),
           "--workers", str(args.workers), "--device", args.device, "--no-progress", "--out", str(out),
           "--num-train-images", str(args.num_train_images), "--num-val-images", str(args.num_val_images)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--resume", "auto"] if resume else [])


def losses(out):
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r["type"] == "train"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="s")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-iters", type=int, default=50)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--kill-at", type=float, default=0.6, help="fraction of --steps at which to kill")
    p.add_argument("--signal", choices=("KILL", "INT"), default="KILL")
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 4) - 2)))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-val-images", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=str(ROOT))
    log = open(out / "soak.log", "w")

    t0 = time.time()
    straight = subprocess.run(train_cmd(args, out / "straight"), cwd=ROOT, env=env, stdout=log, stderr=log)
    t_straight = time.time() - t0
    assert straight.returncode == 0, f"straight run failed (see {out / 'soak.log'})"

    kill_step = int(args.kill_at * args.steps)
    killed_dir = out / "killed"
    t0 = time.time()
    proc = subprocess.Popen(train_cmd(args, killed_dir), cwd=ROOT, env=env, stdout=log, stderr=log)
    while proc.poll() is None:
        if (killed_dir / "log.jsonl").is_file() and max(losses(killed_dir) or [0]) >= kill_step:
            proc.send_signal(getattr(signal, "SIG" + args.signal))
            break
        time.sleep(0.2)
    rc_killed = proc.wait()
    ck = torch.load(killed_dir / "last.pth", weights_only=True)
    resumed_from = ck["step"]
    resumed = subprocess.run(train_cmd(args, killed_dir, resume=True), cwd=ROOT, env=env, stdout=log, stderr=log)
    t_killed = time.time() - t0
    assert resumed.returncode == 0, f"resumed run failed (see {out / 'soak.log'})"

    a, b = losses(out / "straight"), losses(killed_dir)
    common = sorted(set(a) & set(b))
    before = [abs(a[s] - b[s]) for s in common if s <= resumed_from]
    after = [abs(a[s] - b[s]) for s in common if s > resumed_from]
    wa = torch.load(out / "straight/last.pth", weights_only=True)["model"]
    wb = torch.load(killed_dir / "last.pth", weights_only=True)["model"]
    floats = [k for k in wa if wa[k].is_floating_point()]
    equal = sum(torch.equal(wa[k], wb[k]) for k in wa)
    max_w = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in floats)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": args.steps, "signal": args.signal, "killed_rc": rc_killed, "kill_step": kill_step,
        "resumed_from_step": resumed_from, "log_steps_straight": len(a), "log_steps_killed": len(b),
        "same_logged_steps": sorted(a) == sorted(b),
        "max_abs_loss_diff_before_resume": max(before, default=0.0),
        "max_abs_loss_diff_after_resume": max(after, default=0.0),
        "final_loss_straight": a[max(a)], "final_loss_resumed": b[max(b)],
        "tensors_bitwise_equal": f"{equal}/{len(wa)}", "max_abs_weight_diff": max_w,
        "wall_straight_s": t_straight, "wall_killed_plus_resume_s": t_killed}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    md = ["# soak_train", "", f"`{report['command']}` on {report['device']} ({report['date']})", ""]
    md += [f"- {k}: {v:.4g}" if isinstance(v, float) and not math.isnan(v) else f"- {k}: {v}"
           for k, v in report.items() if k not in ("command", "date", "device")]
    (out / "soak.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
