"""Benchmark DETR matching (SPEC section 4): cost + exact one-to-one matching per training step.

    python benches/bench_hungarian.py --out DIR [--quick] [--sweep] [--lap-site DIR]
    python benches/bench_hungarian.py --out DIR --device cpu   # the CPU paths, same cases

Cases (issue 12): DETR (B=16, Q=100, G=7 / 50, softmax cost), Deformable-DETR (B=16, Q=300,
G=30 / 100, focal), DINO (7 layers x B=16, Q=900, G=20 / 100 / 300, focal). One "step" is
every layer's cost and matching, each layer with its own predictions. Inputs are realistic:
gts are random boxes in 640x800 images, a third of the queries are noisy copies of gts and
the rest random boxes; logits random. Every image has all G gts (no padding), so every
solver, including the outside ones, solves the same problems.

Methods, all timed on the same inputs in the same run (median over repeats):
  stock       mmdetection's HungarianAssigner per image (its match-cost classes on the GPU,
              then scipy), if mmdet imports; else stock-emul: the same per-image steps
              with our torch cost (a lower bound on stock's time), the reason printed
  reference   ops.detr_match_cost(backend="torch") + ops.hungarian_match(backend="torch")
              (scipy per image)
  cpp         ops.detr_match_cost (auto: Triton; C++ with --device cpu) -> host ->
              ops.hungarian_match(backend="cpp")
  triton      ops.detr_match_cost + ops.hungarian_match (Triton), value checks on (one host sync)
  triton-nochk  the same with ops.set_value_checks(False): no host sync; its GPU time is also
              measured as a CUDA-graph replay of the whole step
  triton-1call  every layer in one cost call and one matching call ((L * B, Q, G), checks
              off), as rtmdet.integrations.mmdet's DETR heads call it
  cost-only, solve-only  the two halves of triton-nochk, for reading the others
  tla         torch-linear-assignment's batch_linear_assignment on our cost (GPU)
  lap, lapx   lap.lapjv(extend_cost=True) per image on our cost copied to the host (both
              install a module `lap`: one from sys.path, the other via --lap-site DIR)
"eager ms": CUDA events around the Python call (host work, launches and syncs included);
"gpu ms": the summed kernel time from torch.profiler (graph replay for triton-nochk).
Each method's matchings are checked against scipy's optimum on the first layer.
--device cpu: every tensor on the CPU, wall-clock ms, no Triton methods: stock (mmdet's
assigner on CPU tensors), reference, cpp (the C++ cost, backend "auto", + the C++ solver),
cost-only (that cost alone), tla and lap/lapx where installed. On a machine shared with other
jobs, OMP_NUM_THREADS=1: an intra-op thread waiting on a busy core made medians swing 20x.
Writes DIR/bench_hungarian.log (the printed text) and DIR/bench_hungarian.json.
"""
import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--cpu-smoke" in sys.argv:  # before any Triton kernel is decorated
    os.environ["TRITON_INTERPRET"] = "1"
from rtmdet import ops  # noqa: E402

CASES = [  # name, layers, B, Q, G, cls_cost
    ("DETR G7", 1, 16, 100, 7, "softmax"),
    ("DETR G50", 1, 16, 100, 50, "softmax"),
    ("Deformable G30", 1, 16, 300, 30, "focal"),
    ("Deformable G100", 1, 16, 300, 100, "focal"),
    ("DINO G20", 7, 16, 900, 20, "focal"),
    ("DINO G100", 7, 16, 900, 100, "focal"),
    ("DINO G300", 7, 16, 900, 300, "focal"),
]
WEIGHTS = {"softmax": dict(cls_weight=1.0, l1_weight=5.0, giou_weight=2.0),
           "focal": dict(cls_weight=2.0, l1_weight=5.0, giou_weight=2.0)}
NUM_CLASSES = 80
LOG = []
LOG_PATH = []
DEVICE = "cuda"  # --cpu-smoke: "cpu" (a tiny case, Triton under the interpreter, no GPU times)


def say(*args):
    """Print, and append to DIR/bench_hungarian.log as we go (a timeout keeps what ran)."""
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)
    if LOG_PATH:
        with open(LOG_PATH[0], "a") as f:
            f.write(line + "\n")


# ---- inputs -----------------------------------------------------------------------------

def make_layer(B, Q, G, cls_cost, gen):
    K = NUM_CLASSES + 1 if cls_cost == "softmax" else NUM_CLASSES
    h, w = 640.0, 800.0

    def boxes(n):
        xy = torch.rand(B, n, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(B, n, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 8
        return torch.cat([xy, xy + wh], -1)
    gt = boxes(G)
    labels = torch.randint(0, NUM_CLASSES, (B, G), generator=gen)
    pred = boxes(Q)
    near = min(Q // 3, 3 * G)  # noisy copies of gts: the realistic, contested part
    if near > 0:
        src = torch.randint(0, G, (B, near), generator=gen)
        copy = torch.gather(gt, 1, src[..., None].expand(-1, -1, 4))
        pred[:, :near] = copy + torch.randn(B, near, 4, generator=gen) * 12
    x1y1 = torch.minimum(pred[..., :2], pred[..., 2:])
    x2y2 = torch.maximum(pred[..., :2], pred[..., 2:]) + 1
    pred = torch.cat([x1y1, x2y2], -1)
    logits = torch.randn(B, Q, K, generator=gen) * 2 - 2
    sizes = torch.tensor([[h, w]]).expand(B, 2).contiguous()
    return {k: v.to(DEVICE) for k, v in dict(logits=logits, pred=pred, gt=gt, labels=labels,
                                             sizes=sizes).items()}


def our_cost(layer, cls_cost, backend="auto"):
    return ops.detr_match_cost(layer["logits"], layer["pred"], layer["gt"], layer["labels"],
                               layer["sizes"], cls_cost=cls_cost, backend=backend,
                               **WEIGHTS[cls_cost])


# ---- methods: fn(layers, cls_cost) -> list of (B, Q) matches (on any device) -------------

def stock_method():
    try:
        from tests.mmcv_stub import install_mmcv_ext_stub
        install_mmcv_ext_stub()
        from mmdet.models.task_modules.assigners import HungarianAssigner
        from mmengine.structures import InstanceData
    except Exception as exc:  # noqa: BLE001  (any import failure: report and skip)
        return None, f"mmdet not importable ({type(exc).__name__}: {exc})"
    assigners = {}
    for cls_cost, wts in WEIGHTS.items():
        cls = "ClassificationCost" if cls_cost == "softmax" else "FocalLossCost"
        assigners[cls_cost] = HungarianAssigner(match_costs=[  # the stock DETR / DINO configs
            dict(type=cls, weight=wts["cls_weight"]),
            dict(type="BBoxL1Cost", weight=wts["l1_weight"], box_format="xywh"),
            dict(type="IoUCost", iou_mode="giou", weight=wts["giou_weight"])])

    def run(layers, cls_cost, extra=None):
        out = []
        for layer in layers:
            B, Q = layer["pred"].shape[:2]
            match = torch.full((B, Q), -1, dtype=torch.long)
            for b in range(B):
                h, w = layer["sizes"][b].tolist()
                res = assigners[cls_cost].assign(
                    InstanceData(scores=layer["logits"][b], bboxes=layer["pred"][b]),
                    InstanceData(bboxes=layer["gt"][b], labels=layer["labels"][b]),
                    img_meta=dict(img_shape=(int(h), int(w))))
                match[b] = res.gt_inds.cpu() - 1  # stock: 0 = background, i + 1 = gt i
            out.append(match)
        return out
    return run, None


def stock_emulated(layers, cls_cost, extra=None):
    """What mmdet's HungarianAssigner does per image, without mmdet: the image's cost on the
    GPU (torch ops, as its match-cost classes), copied to the host, scipy. A lower bound on
    stock's time (no InstanceData / AssignResult overhead): used only when mmdet is missing."""
    from scipy.optimize import linear_sum_assignment
    out = []
    for layer in layers:
        B, Q = layer["pred"].shape[:2]
        match = torch.full((B, Q), -1, dtype=torch.long)
        for b in range(B):
            one = {k: v[b] for k, v in layer.items()}
            cost = our_cost(one, cls_cost, "torch").cpu().numpy()
            rows, cols = linear_sum_assignment(cost)
            match[b, torch.from_numpy(rows)] = torch.from_numpy(cols)
        out.append(match)
    return out


def reference(layers, cls_cost, extra=None):
    return [ops.hungarian_match(our_cost(layer, cls_cost, "torch"), backend="torch")
            for layer in layers]


def cpp(layers, cls_cost, extra=None):
    return [ops.hungarian_match(our_cost(layer, cls_cost).cpu(), backend="cpp").to(DEVICE, non_blocking=True)
            for layer in layers]


def triton_checked(layers, cls_cost, extra=None):
    return [ops.hungarian_match(our_cost(layer, cls_cost), backend="triton") for layer in layers]


def triton_nochk(layers, cls_cost, extra=None):
    with ops.value_checks(False):
        return [ops.hungarian_match(our_cost(layer, cls_cost), backend="triton") for layer in layers]


def triton_one_call(layers, cls_cost, extra):
    """Every layer in one cost call and one matching call: a head holding (L, B, Q, K) outputs
    views them as (L * B, Q, K) (the stacking is done outside the timed region)."""
    s = extra["stacked"]
    with ops.value_checks(False):
        return [ops.hungarian_match(our_cost(s, cls_cost), backend="triton")]


def cost_only(layers, cls_cost, extra=None):
    with ops.value_checks(False):
        return [our_cost(layer, cls_cost) for layer in layers]


def solve_only(layers, cls_cost, extra):
    """The Triton solver alone on precomputed costs (no cost in the timed region)."""
    with ops.value_checks(False):
        return [ops.hungarian_match(c, backend="triton") for c in extra["costs"]]


def tla_method():
    try:
        from torch_linear_assignment import batch_linear_assignment
    except Exception as exc:  # noqa: BLE001
        return None, f"torch-linear-assignment not importable ({type(exc).__name__}: {exc})"

    def run(layers, cls_cost, extra=None):
        return [batch_linear_assignment(our_cost(layer, cls_cost)) for layer in layers]
    return run, None


def _lap_distribution(module):
    """'lapx' or 'lap': which distribution installed this `lap` module (both use that name)."""
    import importlib.metadata as md
    here = os.path.realpath(module.__file__)
    for dist in ("lapx", "lap"):
        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            continue
        if os.path.realpath(str(d.locate_file("lap/__init__.py"))) == here:
            return dist
    return "lap"


def lap_method(site=None):
    """lapjv per image from the `lap` module on sys.path (site None) or in folder `site`.
    Returns (fn, distribution name, version) or (None, reason, None)."""
    try:
        if site is None:
            lap = importlib.import_module("lap")
        else:
            init = os.path.join(site, "lap", "__init__.py")
            spec = importlib.util.spec_from_file_location(
                "lap_from_site", init, submodule_search_locations=[os.path.dirname(init)])
            lap = importlib.util.module_from_spec(spec)
            sys.modules["lap_from_site"] = lap
            spec.loader.exec_module(lap)
    except Exception as exc:  # noqa: BLE001
        return None, f"not importable from {site or 'sys.path'} ({type(exc).__name__}: {exc})", None

    def run(layers, cls_cost, extra=None):
        out = []
        for layer in layers:
            cost = our_cost(layer, cls_cost).double().cpu().numpy()
            match = np.full(cost.shape[:2], -1, dtype=np.int64)
            for b in range(cost.shape[0]):
                _, x, _ = lap.lapjv(cost[b], extend_cost=True)  # x[q] = gt or -1
                match[b] = x
            out.append(torch.from_numpy(match).to(DEVICE, non_blocking=True))
        return out
    if site is None:
        name = _lap_distribution(lap)
    else:  # the dist-info folder next to the package says which one it is
        import glob
        names = [os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(site, "lap*-*.dist-info"))]
        name = names[0] if len(names) == 1 else os.path.basename(os.path.normpath(site))
    return run, name, getattr(lap, "__version__", "?")


# ---- timing -----------------------------------------------------------------------------

def eager_ms(fn, budget_s, max_reps, min_reps=3):
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < budget_s):
        if DEVICE == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), len(times)


def profiled_gpu_ms(fn, reps=2):
    if DEVICE == "cpu":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                       for e in prof.key_averages())
    except Exception as exc:  # noqa: BLE001  (the profiler is a nicety: never lose the row)
        say(f"  (profiler failed: {type(exc).__name__}: {exc})")
        return float("nan")
    return total_us / 1e3 / reps


def graph_ms(fn, reps=20):
    if DEVICE == "cpu":
        return float("nan")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def check_optimal(match, layer, cls_cost):
    """Worst relative gap of the method's totals to scipy's optimum, over the first layer."""
    from scipy.optimize import linear_sum_assignment
    cost = our_cost(layer, cls_cost).double().cpu()
    match = match.cpu()
    worst = 0.0
    for b in range(cost.shape[0]):
        r, c = linear_sum_assignment(cost[b].numpy())
        opt = cost[b].numpy()[r, c].sum()
        q = (match[b] >= 0).nonzero()[:, 0]
        if len(q) != len(r) or len(torch.unique(match[b, q])) != len(q):
            return float("inf")
        worst = max(worst, abs(cost[b][q, match[b, q]].sum().item() - opt) / max(abs(opt), 1e-12))
    return worst


def bench_case(case, methods, quick):
    name, L, B, Q, G, cls_cost = case
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    layers = [make_layer(B, Q, G, cls_cost, gen) for _ in range(L)]
    say(f"\n## {name}: layers={L} B={B} Q={Q} G={G} ({cls_cost} cost), {L * B} problems per step")
    say(f"{'method':<14} {'eager ms':>10} {'gpu ms':>9} {'reps':>5} {'vs stock':>9} {'vs ref':>8}  optimal")
    extra = dict(stacked={k: torch.cat([layer[k] for layer in layers]) for k in layers[0]})
    with ops.value_checks(False):
        extra["costs"] = [our_cost(layer, cls_cost) for layer in layers]
    rows = {}
    for mname, fn in methods.items():
        call = lambda: fn(layers, cls_cost, extra)  # noqa: E731
        try:
            t0 = time.perf_counter()
            outs = call()  # warm-up: compiles kernels, checks the result
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            if mname == "cost-only":
                gap = 0.0
            else:  # the first layer's B problems (first in the stacked call too)
                gap = check_optimal(outs[0][:B], layers[0], cls_cost)
            slow = first_s > 2.0  # (lap on DINO: seconds per step) fewer repeats, no profile
            if not slow:
                call()
            ms, reps = eager_ms(call, 1.0 if quick else 4.0, 10 if quick else 30,
                                min_reps=2 if slow else 3)
            graphable = mname in ("triton-nochk", "triton-1call", "cost-only", "solve-only")
            gpu = None
            if graphable:
                try:
                    gpu = graph_ms(call)
                except Exception as exc:  # noqa: BLE001  (report, then use the profiler)
                    say(f"  ({mname}: CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:150]})")
            if gpu is None:
                gpu = float("nan") if slow else profiled_gpu_ms(call, reps=1 if ms > 50 else 3)
        except Exception as exc:  # noqa: BLE001  (one failing method must not end the run)
            say(f"{mname:<14} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        rows[mname] = dict(eager_ms=ms, gpu_ms=gpu, reps=reps, max_rel_gap=gap)
    base = rows.get("stock", rows.get("stock-emul", {})).get("eager_ms")
    ref = rows.get("reference", {}).get("eager_ms")
    for mname, r in rows.items():
        vs = f"{base / r['eager_ms']:8.1f}x" if base else "      n/a"
        vr = f"{ref / r['eager_ms']:7.1f}x" if ref else "     n/a"
        ok = "yes" if r["max_rel_gap"] <= 1e-5 else f"NO (gap {r['max_rel_gap']:.2e})"
        ok = "-" if mname == "cost-only" else ok
        say(f"{mname:<14} {r['eager_ms']:10.3f} {r['gpu_ms']:9.3f} {r['reps']:5d} {vs} {vr}  {ok}")
    return rows


SWEEP = [  # kernels/hungarian.py TUNING variants; the first is the default
    dict(elems_per_thread=8, greedy_elems_per_thread=16, transpose=True),
    dict(elems_per_thread=4, greedy_elems_per_thread=16, transpose=True),
    dict(elems_per_thread=16, greedy_elems_per_thread=16, transpose=True),
    dict(elems_per_thread=32, greedy_elems_per_thread=32, transpose=True),
    dict(elems_per_thread=8, greedy_elems_per_thread=8, transpose=True),
    dict(elems_per_thread=8, greedy_elems_per_thread=32, transpose=True),
    dict(elems_per_thread=8, greedy_elems_per_thread=16, transpose=False),
]


def _variant_name(v):
    return f"e{v['elems_per_thread']}g{v['greedy_elems_per_thread']}{'T' if v['transpose'] else 'N'}"


def sweep(cases, quick):
    """Solver-only time (all layers in one call) under the Triton tunables of SWEEP."""
    from rtmdet.kernels import hungarian as kernel
    saved = dict(kernel.TUNING)
    say("\n## sweep: solve-only, every layer in one call, eager ms (median)")
    say("(eN: cost elements per thread in a search step, gN: in a greedy step, T/N: (B, G, Q) copy or not)")
    say(f"{'case':<16} " + " ".join(f"{_variant_name(v):>9}" for v in SWEEP))
    table = {}
    for name, L, B, Q, G, cls_cost in cases:
        gen = torch.Generator().manual_seed(hash(name) % 2**31)
        layers = [make_layer(B, Q, G, cls_cost, gen) for _ in range(L)]
        stacked = {k: torch.cat([layer[k] for layer in layers]) for k in layers[0]}
        with ops.value_checks(False):
            cost = our_cost(stacked, cls_cost)
        row = []
        for variant in SWEEP:
            kernel.TUNING.update(variant)
            with ops.value_checks(False):
                call = lambda: ops.hungarian_match(cost, backend="triton")  # noqa: E731
                call()
                row.append(eager_ms(call, 0.5 if quick else 2.0, 20)[0])
        kernel.TUNING.clear()
        kernel.TUNING.update(saved)
        table[name] = row
        say(f"{name:<16} " + " ".join(f"{ms:9.3f}" for ms in row))
    return table


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown"


def cpu_summary(results):
    """One line per case: stock, reference, cpp and lapx ms (medians) and stock / cpp."""
    say("\n## CPU summary (ms per step, median; optimal = every checked matching within 1e-5)")
    say("| case | stock mmdet ms | reference ms | cpp ms | lapx ms | stock / cpp | optimal |")
    say("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        stock = rows.get("stock", rows.get("stock-emul"))
        cells = [f"{rows[m]['eager_ms']:.2f}" if m in rows else "-"
                 for m in ("stock", "reference", "cpp", "lapx")]
        if "stock" not in rows and "stock-emul" in rows:
            cells[0] = f"{rows['stock-emul']['eager_ms']:.2f} (emulated)"
        ratio = f"{stock['eager_ms'] / rows['cpp']['eager_ms']:.1f}x" if stock and "cpp" in rows else "-"
        ok = all(r["max_rel_gap"] <= 1e-5 for m, r in rows.items() if m != "cost-only")
        say(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {'yes' if ok else 'NO'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--lap-site", action="append", default=[],
                    help="a folder holding another `lap` package (lap and lapx both install a module "
                         "named `lap`: one can be on sys.path, the other in a --target folder); "
                         "timed under the folder's name; repeatable")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    ap.add_argument("--sweep", action="store_true", help="also time the Triton tunables (SWEEP)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check the script on a CPU machine: one tiny case, Triton interpreted")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the benchmark's cases with the CPU methods only (no Triton)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    LOG_PATH.append(os.path.join(args.out, "bench_hungarian.log"))
    open(LOG_PATH[0], "w").close()
    global DEVICE, CASES
    cpu_only = args.device == "cpu" and not args.cpu_smoke  # (the smoke test runs Triton too)
    if args.cpu_smoke:
        DEVICE = "cpu"
        CASES = [("smoke DINO G5", 2, 2, 12, 5, "focal"), ("smoke DETR G4", 1, 2, 8, 4, "softmax")]
    elif cpu_only:
        DEVICE = "cpu"
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA device (or --device cpu)"
    import triton
    if cpu_only:
        gpu = f"cpu: {_cpu_name()}, {os.cpu_count()} cores"
    else:
        gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu smoke test"
    backends = ops.backend_info()["cpu_backends" if DEVICE == "cpu" else "cuda_backends"]
    say(f"# bench_hungarian: {gpu}, torch {torch.__version__}, "
        f"triton {triton.__version__}, backends {backends}, "
        f"torch threads {torch.get_num_threads()}")

    methods, skipped = {}, {}
    stock, why = stock_method()
    if stock:
        methods["stock"] = stock
    else:
        skipped["stock"] = why + "; timing stock-emul (its per-image algorithm) instead"
        methods["stock-emul"] = stock_emulated
    methods["reference"] = reference
    if "hungarian_match" in ops.backend_info()["native_ops"]:
        methods["cpp"] = cpp
    else:
        skipped["cpp"] = "rtmdet._C has no hungarian_match"
    if cpu_only:
        skipped["triton"] = "no Triton on the CPU (--cpu-smoke runs it interpreted)"
    else:
        methods["triton"] = triton_checked
        methods["triton-nochk"] = triton_nochk
        methods["triton-1call"] = triton_one_call
    methods["cost-only"] = cost_only
    if not cpu_only:
        methods["solve-only"] = solve_only
    tla, why = tla_method()
    (methods.__setitem__("tla", tla) if tla else skipped.__setitem__("tla", why))
    for site in [None] + list(args.lap_site):
        fn, name, version = lap_method(site)
        if fn is None:
            skipped[f"lap ({site or 'sys.path'})"] = name
            continue
        if name in methods:
            name = f"{name}@{site}"
        methods[name] = fn
        say(f"# {name}: lap module {version} from {site or 'sys.path'}")
    for absent in ("lap", "lapx"):
        if not any(m.split("@")[0] == absent or m == absent for m in methods):
            skipped.setdefault(absent, "not installed (give its folder with --lap-site)")
    for mname, why in skipped.items():
        say(f"# skipped {mname}: {why}")

    cases = CASES
    if args.cases:
        keys = [k.strip() for k in args.cases.split(",")]
        cases = [c for c in CASES if any(k in c[0] for k in keys)]
    results = {}
    for case in cases:
        results[case[0]] = bench_case(case, methods, args.quick)

    sweep_table = sweep(cases, args.quick) if args.sweep else None

    if not cpu_only:  # (the targets are the Triton methods')
        say("\n## targets")
    outside = [m for m in methods if m == "tla" or m.startswith("lap")]
    for name, rows in results.items():
        mine = [m for m in ("triton-nochk", "triton-1call") if m in rows]
        if not mine:
            continue
        best = min(mine, key=lambda m: rows[m]["eager_ms"])
        ours = rows[best]["eager_ms"]
        beaten = [m for m in outside if m in rows and rows[m]["eager_ms"] <= ours]
        line = f"{name}: {best} {ours:.3f} ms; faster than every outside solver: " \
               f"{'yes' if not beaten else 'NO, not than ' + ', '.join(beaten)}"
        for base in ("stock", "stock-emul"):
            if base in rows:
                line += f"; {rows[base]['eager_ms'] / ours:.0f}x {base}"
        if "DINO" in name:
            line += " (target >= 100x)"
        if name.endswith("DINO G20"):
            line += f"; whole step {'<' if ours < 1.0 else '>='} 1 ms"
        say(line)
    if cpu_only:
        cpu_summary(results)
    with open(os.path.join(args.out, "bench_hungarian.json"), "w") as f:
        json.dump(dict(device=gpu, torch=torch.__version__,
                       results=results, skipped=skipped, sweep=sweep_table,
                       sweep_variants=SWEEP), f, indent=1)


if __name__ == "__main__":
    main()
