"""Benchmark the fused Triton QFL and GIoU losses against the PyTorch reference, eager and compiled.

    python benches/bench_losses.py --out DIR [--sweep] [--reps-ms 200]
    TRITON_INTERPRET=1 python benches/bench_losses.py --smoke   (CPU check of this script only)

Times (triton.testing.do_bench p20/p50/p80, ms) forward, backward and forward+backward of
  triton   ops.*(backend="triton")  (the fused kernels)
  eager    ops.*(backend="torch")   (the dense reference, mmdet-like eager PyTorch)
  compile  torch.compile of the same dense reference
for QFL at M = 64 x 8400, C = 80 (fp32 and bf16 logits, ~1% positives with IoU targets in (0, 1])
and GIoU at 6,400 pairs; the peak memory beyond inputs and logits.grad; and the floor, from a
device-to-device copy bandwidth measured here. Inputs rotate among a few sets. Value checks are
off (rtmdet.ops.set_value_checks(False)), so no host synchronisation is timed.
Writes bench_losses.json and bench_losses.md under --out.
"""
import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from rtmdet import ops
from rtmdet.kernels import qfl as qfl_mod
from rtmdet.ops.losses import reduce_loss

QUANTILES = [0.2, 0.5, 0.8]
B, N, C = 64, 8400, 80
N_GIOU = 6400
N_SETS = 3
DEVICE = "cuda"


def bench(fn, reps_ms, grad_to_none=None):
    if DEVICE != "cuda":  # --smoke: a few timed calls, only to exercise the script
        times = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        p20, p50, p80 = sorted(times)
    else:
        p20, p50, p80 = do_bench(fn, warmup=25, rep=reps_ms, quantiles=QUANTILES,
                                 grad_to_none=grad_to_none)
    return {"p20": p20, "p50": p50, "p80": p80}


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def memory_allocated():
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def max_memory_allocated():
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def copy_bandwidth(reps_ms):
    """Device-to-device copy GB/s (bytes read + bytes written per second) on 1 GiB."""
    src = torch.empty(1 << (28 if DEVICE == "cuda" else 20), device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), reps_ms)["p50"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def qfl_sets(dtype):
    sets = []
    for seed in range(N_SETS):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        x = (torch.randn(B, N, C, device=DEVICE, generator=g) * 3 - 4).to(dtype)
        labels = torch.full((B * N,), C, device=DEVICE, dtype=torch.long)
        pos = torch.rand(B * N, device=DEVICE, generator=g) < 0.01
        labels[pos] = torch.randint(0, C, (int(pos.sum()),), device=DEVICE, generator=g)
        scores = torch.where(pos, 1 - torch.rand(B * N, device=DEVICE, generator=g), 0.0)
        avg = float(scores.sum().clamp(min=1))
        sets.append((x.view(-1, C).requires_grad_(), labels, scores, avg))
    return sets


def giou_sets():
    M = N_GIOU
    sets = []
    for seed in range(N_SETS):
        g = torch.Generator(device=DEVICE).manual_seed(100 + seed)
        xy = torch.rand(M, 2, device=DEVICE, generator=g) * 600
        wh = torch.rand(M, 2, device=DEVICE, generator=g) * 200 + 4
        target = torch.cat([xy, xy + wh], 1)
        pred = target + torch.randn(M, 4, device=DEVICE, generator=g) * wh.repeat(1, 2) * 0.2
        weight = torch.rand(M, device=DEVICE, generator=g)
        sets.append((pred.requires_grad_(), target, weight, float(weight.sum())))
    return sets


def qfl_fn(backend):
    def f(x, labels, scores, avg):
        return ops.quality_focal_loss(x, labels, scores, avg_factor=avg, backend=backend)
    return f


def giou_fn(backend):
    def f(pred, target, weight, avg):
        return ops.giou_loss(pred, target, weight=weight, avg_factor=avg, backend=backend)
    return f


def measure(fn, sets, reps_ms, grad_bytes):
    """fwd, bwd, fwd+bwd timings and the peak memory beyond the inputs and their .grad."""
    cycle = itertools.cycle(range(len(sets)))
    leaves = [s[0] for s in sets]
    out = {}
    for leaf in leaves:
        leaf.grad = None
    fn(*sets[0]).backward()  # compile / warm up
    synchronize()

    def fwd():
        return fn(*sets[next(cycle)])
    out["forward"] = bench(fwd, reps_ms)
    losses = [fn(*s) for s in sets]

    def bwd():
        losses[next(cycle)].backward(retain_graph=True)
    out["backward"] = bench(bwd, reps_ms, grad_to_none=leaves)
    del losses

    def both():
        fn(*sets[next(cycle)]).backward()
    out["forward+backward"] = bench(both, reps_ms, grad_to_none=leaves)

    if DEVICE == "cuda":
        try:
            out["forward+backward (CUDA graph)"] = graph_time(fn, sets[0], reps_ms)
        except Exception as exc:  # e.g. an implementation that cannot be captured
            out["forward+backward (CUDA graph)"] = {"p50": float("nan"), "error": str(exc)[:200]}
    for leaf in leaves:
        leaf.grad = None
    synchronize()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = memory_allocated()
    fn(*sets[0]).backward()
    synchronize()
    out["peak_extra_MB"] = (max_memory_allocated() - base - grad_bytes) / 2 ** 20
    for leaf in leaves:
        leaf.grad = None
    return out


def graph_time(fn, args, reps_ms):
    """fwd+bwd captured once in a CUDA graph, timed by its replays: the GPU time without the
    per-call Python and launch overhead (what a captured training step pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            args[0].grad = None
            fn(*args).backward()
    torch.cuda.current_stream().wait_stream(side)
    args[0].grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args).backward()
    return bench(graph.replay, reps_ms)


def qfl_dense(x, labels, scores, avg):
    return reduce_loss(ops.quality_focal_loss_ref(x, labels, scores), None, "mean", avg)


def giou_dense(pred, target, weight, avg):
    return reduce_loss(ops.giou_loss_ref(pred, target), weight, "mean", avg)


def run_impls(name, make_fn, dense, sets, reps_ms, grad_bytes):
    results = {}
    # compile: the dense reference itself (no argument checks, so no graph breaks)
    impls = {"triton": make_fn("triton"), "eager": make_fn("torch")}
    if DEVICE == "cuda":
        impls["compile"] = torch.compile(dense, fullgraph=True)
    for impl, fn in impls.items():
        try:
            results[impl] = measure(fn, sets, reps_ms, grad_bytes)
        except Exception as exc:  # record and go on: one failing variant must not hide the rest
            results[impl] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"  {name} {impl}: {fmt(results[impl])}", flush=True)
    return results


def fmt(r):
    if "error" in r:
        return r["error"]
    times = ", ".join(f"{k} {r[k]['p50']:.4f} ms" for k in ("forward", "backward",
                                                          "forward+backward",
                                                          "forward+backward (CUDA graph)")
                      if k in r)
    return f"{times}, peak extra {r['peak_extra_MB']:.1f} MB"


def sweep_qfl(reps_ms):
    """The Triton QFL's two kernels alone over their tunables (elements per program, warps),
    fp32 at the benchmark size: forward (loss + saved gradient) and backward (scaling)."""
    x, labels, scores, _ = qfl_sets(torch.float32)[0]
    x = x.detach()
    saved_grad = torch.empty_like(x)
    grad_loss = torch.rand(x.shape[0], device=DEVICE)
    rows = []
    saved = (qfl_mod.QFL_ELEMENTS, qfl_mod.QFL_NUM_WARPS, qfl_mod.QFL_SCALE_ELEMENTS,
             qfl_mod.QFL_SCALE_NUM_WARPS)
    fwd = lambda: torch.ops.rtmdet.qfl_triton_fwd(x, labels, scores, 2.0, True)  # noqa: E731
    bwd = lambda: torch.ops.rtmdet.qfl_triton_scale_rows(grad_loss, saved_grad)  # noqa: E731
    for elements, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
        qfl_mod.QFL_ELEMENTS = qfl_mod.QFL_SCALE_ELEMENTS = elements
        qfl_mod.QFL_NUM_WARPS = qfl_mod.QFL_SCALE_NUM_WARPS = warps
        t_f, t_b = bench(fwd, reps_ms)["p50"], bench(bwd, reps_ms)["p50"]
        rows.append({"elements": elements, "num_warps": warps, "forward": t_f, "backward": t_b})
        print(f"  sweep elements={elements} num_warps={warps}: forward {t_f:.4f} ms, "
              f"backward {t_b:.4f} ms", flush=True)
    (qfl_mod.QFL_ELEMENTS, qfl_mod.QFL_NUM_WARPS, qfl_mod.QFL_SCALE_ELEMENTS,
     qfl_mod.QFL_SCALE_NUM_WARPS) = saved
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--reps-ms", type=int, default=200, help="do_bench rep time per measurement")
    ap.add_argument("--sweep", action="store_true", help="also sweep the QFL tunables")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU interpreter: checks this script, times nothing")
    args = ap.parse_args()
    global DEVICE, B, N, N_GIOU
    if args.smoke:
        DEVICE, B, N, N_GIOU = "cpu", 2, 64, 64
    elif not torch.cuda.is_available():
        sys.exit("bench_losses.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    os.makedirs(args.out, exist_ok=True)
    ops.set_value_checks(False)
    torch._functorch.config.donated_buffer = False  # lets the compiled backward run retain_graph
    env = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "value_checks": False, "input_sets": N_SETS,
           "qfl_tunables": {"QFL_ELEMENTS": qfl_mod.QFL_ELEMENTS,
                            "QFL_NUM_WARPS": qfl_mod.QFL_NUM_WARPS}}
    print(json.dumps(env), flush=True)
    bw = copy_bandwidth(args.reps_ms)
    print(f"device-to-device copy: {bw:.0f} GB/s", flush=True)
    report = {"env": env, "copy_GBps": bw, "qfl": {}, "giou": {}}

    for dtype in (torch.float32, torch.bfloat16):
        sets = qfl_sets(dtype)
        esize = torch.finfo(dtype).bits // 8
        nbytes = B * N * C * esize
        name = f"QFL M={B * N} C={C} {str(dtype).split('.')[-1]}"
        print(name, flush=True)
        res = run_impls(name, qfl_fn, qfl_dense, sets, args.reps_ms, nbytes)
        res["floor_ms"] = 2 * nbytes / (bw * 1e9) * 1e3  # read logits + write the gradient once
        res["saved_grad_floor_ms"] = 2 * res["floor_ms"]  # + write, read the saved gradient
        res["logits_MB"] = nbytes / 2 ** 20
        report["qfl"][str(dtype)] = res
        del sets
        torch.cuda.empty_cache()

    sets = giou_sets()
    report["giou"]["torch.float32"] = run_impls(f"GIoU M={N_GIOU} float32", giou_fn, giou_dense,
                                                sets, args.reps_ms, N_GIOU * 16)
    if args.sweep and DEVICE == "cuda":
        report["qfl_sweep_fp32"] = sweep_qfl(args.reps_ms)

    with open(os.path.join(args.out, "bench_losses.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "bench_losses.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(report):
    env = report["env"]
    lines = [f"# Loss kernels: {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"value checks off; {env['input_sets']} rotating input sets; "
             f"copy bandwidth {report['copy_GBps']:.0f} GB/s. Times: p50 ms [p20, p80].", "",
             "| case | impl | forward | backward | fwd+bwd | peak extra MB | fwd+bwd vs floor |",
             "|---|---|---|---|---|---|---|"]
    cases = [(f"QFL {k.split('.')[-1]}", v) for k, v in report["qfl"].items()]
    cases += [(f"GIoU {N_GIOU} {k.split('.')[-1]}", v) for k, v in report["giou"].items()]
    for case, res in cases:
        for impl in ("triton", "eager", "compile"):
            if impl not in res:
                continue
            r = res[impl]
            if "error" in r:
                lines.append(f"| {case} | {impl} | error: {r['error'][:80]} | | | | |")
                continue
            cell = lambda k: f"{r[k]['p50']:.4f} [{r[k]['p20']:.4f}, {r[k]['p80']:.4f}]"  # noqa
            floor = res.get("floor_ms")
            ratio = f"{r['forward+backward']['p50'] / floor:.2f}x" if floor else "-"
            lines.append(f"| {case} | {impl} | {cell('forward')} | {cell('backward')} | "
                         f"{cell('forward+backward')} | {r['peak_extra_MB']:.1f} | {ratio} |")
    for k, v in report["qfl"].items():
        lines.append(f"\nQFL {k}: logits {v['logits_MB']:.0f} MB; floor (read logits + write "
                     f"gradient once) {v['floor_ms']:.4f} ms; saved-gradient design minimum "
                     f"{v['saved_grad_floor_ms']:.4f} ms.")
    if "qfl_sweep_fp32" in report:
        lines += ["", "| elements | num_warps | forward kernel p50 ms | backward kernel p50 ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['elements']} | {r['num_warps']} | {r['forward']:.4f} | {r['backward']:.4f} |"
                  for r in report["qfl_sweep_fp32"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
