"""Per-kernel GPU times of the Triton DSLA (torch.profiler), for tuning: python benches/profile_dsla.py"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rtmdet.kernels import dsla  # noqa: E402
from tests.cases import case_args, make_case  # noqa: E402

CONFIGS = [("B64 N8400 G32", 64, (640, 640), 32), ("B16 N8400 G500", 16, (640, 640), 500),
           ("B4 N21504 G1000", 4, (1024, 1024), 1000)]


def run(name, B, img, G, semantics="mmdet", kind="random"):
    case = make_case(7, B=B, img_size=img, G=G, C=80, kind=kind, device="cuda")
    args = case_args(case)
    fn = lambda: dsla.dsl_assign_triton(*args, semantics=semantics)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            rows[e.key] = getattr(e, "self_device_time_total", 0) / 10 / 1e3
    total = sum(rows.values())
    print(f"{name} {kind} {semantics} s0_mode={dsla.TUNING['s0_mode']}: total {total:.3f} ms/call")
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1])[:8]:
        print(f"   {v:8.3f} ms  {k[:90]}")


if __name__ == "__main__" and "--sweep" not in sys.argv:
    for name, B, img, G in CONFIGS:
        run(name, B, img, G)
    for kind in ("random", "early"):
        run(*CONFIGS[0], semantics="mmyolo", kind=kind)
    run(*CONFIGS[0], kind="early")
    dsla.TUNING.update(s0_mode="claim")
    run(*CONFIGS[0])
    run(*CONFIGS[0], kind="early")
    dsla.TUNING.update(s0_mode="dense")


def kernel_resources():
    """Registers / spills / shared memory of the most recently compiled _gt_kernel."""
    try:
        cache = dsla._gt_kernel.device_caches[torch.cuda.current_device()][0]
        k = list(cache.values())[-1]
        return f"regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared}"
    except Exception as exc:  # the cache layout differs between Triton versions
        return f"(no resource info: {exc})"


def sweep():
    """Median time of dsl_assign_triton over TUNING choices (S0 pass layout) on the standard
    and the early-training scene at B64/G32, and the default on G500 / G1000."""
    import triton.testing
    scenes = [(CONFIGS[0], "random"), (CONFIGS[0], "early"), (CONFIGS[1], "random"),
              (CONFIGS[2], "random")]
    for (name, B, img, G), kind in scenes:
        case = make_case(7, B=B, img_size=img, G=G, C=80, kind=kind, pad="none", device="cuda")
        args = case_args(case)
        ref = dsla.dsl_assign_triton(*args)
        saved = dict(dsla.TUNING)
        choices = [dict(s0_mode="claim"), dict(s0_mode="dense")]
        if G == 32:
            choices += [dict(s0_mode="dense", s0_block_n=n, s0_warps=w)
                        for n, w in [(16, 2), (32, 2), (64, 4), (64, 8), (128, 8)]]
        for choice in choices:
            dsla.TUNING.update(saved)
            dsla.TUNING.update(choice)
            out = dsla.dsl_assign_triton(*args)
            same = all(torch.equal(a, b) for a, b in zip(out, ref))
            ms = triton.testing.do_bench(lambda: dsla.dsl_assign_triton(*args), return_mode="median")
            print(f"{name} {kind} all-real: {choice}: {ms:.3f} ms {'' if same else 'DIFFERENT'}",
                  flush=True)
        dsla.TUNING.update(saved)


if __name__ == "__main__" and "--sweep" in sys.argv:
    sweep()
