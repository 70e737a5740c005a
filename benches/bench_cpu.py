"""CPU benchmark of the compiled ops (csrc/) against the PyTorch references.

    python -m pytest benches/bench_cpu.py --benchmark-enable --benchmark-columns=min,median,max
    python benches/bench_cpu.py          # speed + peak memory table for dsl_assign

Workload of the issue: B=8 images at 640x640 (N=8400 priors), C=80 classes, G=32 gt slots
(about a quarter padded), realistic predictions from tests/cases.py.

Peak memory: torch has no allocation statistics for the CPU, so each measurement runs in a
fresh process that resets the kernel's resident-set high-water mark (/proc/self/clear_refs,
"5") after building the inputs and one warm-up call on them, then reads VmHWM - VmRSS after
one more call: the extra resident memory of the call, every allocator included (ATen,
std::vector, OpenMP stacks). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so
that big blocks freed by the warm-up do not stay resident and hide the second call's peak.
Value checks are off in both (`ops.value_checks(False)`): they cost the same for both.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rtmdet import ops  # noqa: E402
from rtmdet.ops import _backend  # noqa: E402
from tests.cases import case_args, make_case  # noqa: E402

B, G, C = 8, 32, 80
needs_cpp = pytest.mark.skipif(_backend.native_module() is None, reason="rtmdet._C is not built")


def workload(seed=0, dtype=torch.float32):
    return case_args(make_case(seed, B=B, G=G, C=C, kind="mixed", pad="anywhere", dtype=dtype))


def run(args, semantics, backend):
    # Value checks off (as in a training loop): they cost the same for both backends.
    with ops.value_checks(False):
        return ops.dsl_assign(*args, semantics=semantics, backend=backend)


@pytest.fixture(scope="module")
def args():
    return workload()


@pytest.mark.parametrize("semantics", ["mmdet", "mmyolo"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_dsl_assign(benchmark, args, semantics, backend):
    benchmark.group = f"dsl_assign {semantics} B={B} N=8400 C={C} G={G}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    out = benchmark(run, args, semantics, backend)
    assert out.gt_index.shape == (B, 8400)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_losses_fwd_bwd(benchmark, backend):
    """QFL over every prior (B*N, C) plus GIoU over ~2% positives, forward + backward."""
    g = torch.Generator().manual_seed(0)
    M = B * 8400
    logits = torch.randn(M, C, generator=g).requires_grad_()
    labels = torch.randint(0, C + 1, (M,), generator=g)
    scores = torch.rand(M, generator=g)
    P = M // 50
    xy = torch.rand(P, 2, generator=g) * 600
    pred = torch.cat([xy, xy + torch.rand(P, 2, generator=g) * 80 + 1], 1).requires_grad_()
    target = pred.detach() + torch.randn(P, 4, generator=g) * 5

    def step():
        loss = ops.quality_focal_loss(logits, labels, scores, reduction="sum", backend=backend) + \
            ops.giou_loss(pred, target, reduction="sum", backend=backend)
        loss.backward()
        return loss

    benchmark.group = f"QFL ({M}x{C}) + GIoU ({P}) fwd+bwd"
    benchmark(step)


# ---- peak memory, one fresh process per measurement --------------------------------------------

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from benches.bench_cpu import workload, run
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
args = workload()
run(args, {semantics!r}, {backend!r})            # warm-up: thread pools, lazy init
open("/proc/self/clear_refs", "w").write("5")     # reset the resident high-water mark
base = status("VmRSS")
run(args, {semantics!r}, {backend!r})
print(json.dumps(status("VmHWM") - base))
"""


def peak_extra_bytes(semantics, backend):
    code = _CHILD.format(root=ROOT, semantics=semantics, backend=backend)
    # A fixed glibc mmap threshold stops the dynamic one from keeping freed big blocks
    # resident, so that the second call's peak counts its own allocations.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_cpp
@pytest.mark.parametrize("semantics", ["mmdet", "mmyolo"])
def test_dsl_assign_peak_memory(semantics):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs")
    ref, cpp = peak_extra_bytes(semantics, "torch"), peak_extra_bytes(semantics, "cpp")
    print(f"\ndsl_assign {semantics}: peak extra RSS torch {ref / 2**20:.1f} MiB, "
          f"cpp {cpp / 2**20:.2f} MiB")
    assert cpp * 10 <= ref


def main():
    import time
    args = workload()
    print(f"dsl_assign B={B} N=8400 C={C} G={G}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for semantics in ("mmdet", "mmyolo"):
        times = {}
        for backend in ("torch", "cpp"):
            run(args, semantics, backend)
            best = []
            for _ in range(7):
                t0 = time.perf_counter()
                run(args, semantics, backend)
                best.append(time.perf_counter() - t0)
            times[backend] = sorted(best)[len(best) // 2]
        mem = {b: peak_extra_bytes(semantics, b) for b in ("torch", "cpp")}
        print(f"{semantics}: torch {times['torch'] * 1e3:.1f} ms, cpp {times['cpp'] * 1e3:.1f} ms "
              f"({times['torch'] / times['cpp']:.1f}x); peak extra RSS torch "
              f"{mem['torch'] / 2**20:.1f} MiB, cpp {mem['cpp'] / 2**20:.2f} MiB "
              f"({mem['torch'] / max(mem['cpp'], 1):.0f}x less)")


if __name__ == "__main__":
    main()
