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
import triton.language as tl
from triton.testing import do_bench

from rtmdet import ops
from rtmdet.kernels import qfl as qfl_mod
from rtmdet.ops.losses import reduce_loss

QUANTILES = [0.2, 0.5, 0.8]
B, N, C = 64, 8400, 80
N_GIOU = 6400
N_SETS = 3
DEVICE = "cuda"
HOST_PROFILE = False


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

    out["eager call fwd+bwd"] = eager_time(both, leaves)
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


def eager_time(fn, leaves=(), reps=100):
    """p20/p50/p80 of CUDA events around one Python call, synchronised after each, so the
    GPU starts idle: what an eager training step pays, host launch time included."""
    times = []
    for i in range(reps + 10):
        for t in leaves:
            t.grad = None
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 10:
            times.append(ms)
    times.sort()
    return {q: times[int(f * (len(times) - 1))] for q, f in (("p20", 0.2), ("p50", 0.5), ("p80", 0.8))}


def head_loss_case(backend, seed=0):
    """Head outputs of B images at 640 px (C classes) and G real gts each (tests/cases.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.cases import make_case
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    img = 640 if DEVICE == "cuda" else 64
    cls, reg = [], []
    for s in (8, 16, 32):
        h = w = img // s
        cls.append((torch.randn(B, C, h, w, device=DEVICE, generator=g) * 2 - 4).requires_grad_())
        reg.append((torch.rand(B, 4, h, w, device=DEVICE, generator=g) * 4 + 0.5).mul(s).requires_grad_())
    case = make_case(seed, B=B, img_size=(img, img), G=32, C=C, kind="random", pad="none",
                     device=DEVICE)
    return cls, reg, case["gt_bboxes"], case["gt_labels"], case["gt_mask"]


def bench_head_loss(reps_ms):
    """Eager rtmdet.head_loss forward + backward (CUDA events around the call) per backend, and
    the fused one's GPU time in a CUDA graph."""
    import rtmdet
    out = {}
    for backend in ("auto", "torch"):
        cls, reg, boxes, labels, mask = head_loss_case(backend)
        leaves = cls + reg

        def step():
            losses = rtmdet.head_loss(cls, reg, boxes, labels, mask, backend=backend)
            (losses["loss_cls"] + losses["loss_bbox"]).backward()
        step()
        out[backend] = {"eager call fwd+bwd": eager_time(step, leaves)}
        if backend == "auto" and HOST_PROFILE:
            print(f"cProfile of 100 eager head_loss fwd+bwd calls ({backend}):\n"
                  + host_profile(step), flush=True)
        if DEVICE == "cuda" and backend == "auto":
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                out[backend]["forward+backward (CUDA graph)"] = bench(graph.replay, reps_ms)
            except Exception as exc:
                out[backend]["forward+backward (CUDA graph)"] = {"p50": float("nan"),
                                                                 "error": str(exc)[:200]}
        print(f"  head_loss {backend}: " + ", ".join(f"{k} {v['p50']:.4f} ms"
                                                     for k, v in out[backend].items()), flush=True)
    return out


@triton.jit
def _one_arg_kernel(p):
    pass


@triton.jit
def _many_args_kernel(p, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
                      a17, a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28,
                      c1: tl.constexpr):
    pass


def host_floors():
    """Host-side costs on this machine (microseconds per call, no synchronisation): a Triton
    launch with 1 and with 30 arguments, an ATen op, a CUDA allocation, and the eager time of
    the smallest autograd step `(x * 2).sum().backward()` (CUDA events, GPU idle at start)."""
    one_arg, many_args = _one_arg_kernel, _many_args_kernel
    x = torch.ones(16, device=DEVICE)

    def per_call_us(fn, n=2000):
        for _ in range(50):
            fn()
        synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t0) / n * 1e6
        synchronize()
        return us
    ints = list(range(3, 31))
    out = {"triton launch, 1 arg": per_call_us(lambda: one_arg[(1,)](x)),
           "triton launch, 30 args": per_call_us(lambda: many_args[(1,)](x, *ints, c1=4)),
           "aten add": per_call_us(lambda: x + 1),
           "torch.empty": per_call_us(lambda: torch.empty(1024, device=DEVICE))}
    leaf = x.clone().requires_grad_()

    def tiny_step():
        (leaf * 2).sum().backward()
    out["eager (x * 2).sum().backward() ms"] = eager_time(tiny_step, [leaf])["p50"]
    print("host floors: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def host_profile(fn, calls=100, top=25):
    """cProfile of `calls` eager calls: the host functions that take the time."""
    import cProfile
    import io
    import pstats
    fn()
    synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


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
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the eager head_loss and measure host floors")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU interpreter: checks this script, times nothing")
    args = ap.parse_args()
    global DEVICE, B, N, N_GIOU, HOST_PROFILE
    HOST_PROFILE = args.host_profile
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
    if args.host_profile:
        report["host_floors"] = host_floors()

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
    print(f"head_loss B={B} N={N} C={C} G=32", flush=True)
    report["head_loss"] = bench_head_loss(args.reps_ms)
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
             "| case | impl | forward | backward | fwd+bwd | eager call fwd+bwd | CUDA graph "
             "fwd+bwd | peak extra MB | graph vs floor |",
             "|---|---|---|---|---|---|---|---|---|"]
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
            cell = lambda k: (f"{r[k]['p50']:.4f} [{r[k]['p20']:.4f}, {r[k]['p80']:.4f}]"  # noqa
                              if k in r else "-")
            floor = res.get("floor_ms")
            graph = r.get("forward+backward (CUDA graph)", {}).get("p50")
            ratio = f"{floor / graph:.0%}" if floor and graph else "-"
            lines.append(f"| {case} | {impl} | {cell('forward')} | {cell('backward')} | "
                         f"{cell('forward+backward')} | {cell('eager call fwd+bwd')} | "
                         f"{cell('forward+backward (CUDA graph)')} | {r['peak_extra_MB']:.1f} | "
                         f"{ratio} |")
    for backend, r in report.get("head_loss", {}).items():
        cell = lambda k: f"{r[k]['p50']:.4f}" if k in r else "-"  # noqa
        lines.append(f"| head_loss B={B} G=32 | {backend} | - | - | - | "
                     f"{cell('eager call fwd+bwd')} | {cell('forward+backward (CUDA graph)')} "
                     f"| - | - |")
    if "host_floors" in report:
        lines.append("\nHost floors (us per call unless ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["host_floors"].items()))
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
