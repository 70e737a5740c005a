"""Fuzzed agreement on the GPU (issue 15 item 2): Triton vs the PyTorch reference, both on CUDA.

    python benches/fuzz_gpu.py [--cases 10000] [--seed 0] [--time-limit 170] [--out DIR]
    python benches/fuzz_gpu.py --device cpu --backend cpp --cases 300   # a dry run of the script

Draws the problems of tests/fuzz_problems.py (the CI fuzz tests' strategies, bigger shapes)
from a fixed seed, without hypothesis (the device image has none): dsl_assign (60 %),
quality_focal_loss (20 %) and giou_loss (20 %) values and gradients. A failing case is
shrunk greedily to a locally minimal spec. Prints the count, the time, and each failure's
minimal spec and message; writes the same to DIR/fuzz_gpu.log; exit status 1 on any failure
or when fewer than --cases cases ran within --time-limit seconds.
"""
import argparse
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rtmdet import ops  # noqa: E402
from tests import fuzz_problems as fp  # noqa: E402

# C and topk from a few values: each new value compiles kernels (the rest are runtime ints).
DSLA = dict(max_b=4, max_side=256, max_n=1024, max_g=16, cs=(1, 13, 80), topks=(1, 7, 20))
QFL = dict(max_m=2048, cs=(1, 13, 80))
GIOU = dict(max_m=4096)
SHARE = (("dsla", 0.6), ("qfl", 0.2), ("giou", 0.2))
RUN = dict(device="cuda", backend="triton")


def run_dsla(spec):
    problem = fp.build_dsla(spec, device=RUN["device"])
    want = ops.dsl_assign(*problem.args, **problem.kwargs, backend="torch")
    got = ops.dsl_assign(*problem.args, **problem.kwargs, backend=RUN["backend"])
    fp.check_assignment(problem, want, got, f"{RUN['backend']} on {RUN['device']}")


def run_qfl(spec):
    problem = fp.build_qfl(spec, device=RUN["device"])
    fp.compare_losses(ops.quality_focal_loss, problem, RUN["backend"], problem)


def run_giou(spec):
    problem = fp.build_giou(spec, device=RUN["device"])
    fp.compare_losses(ops.giou_loss, problem, RUN["backend"], fp.upcast(problem))


OPS = {"dsla": (lambda d: fp.dsla_spec(d, **DSLA), run_dsla),
       "qfl": (lambda d: fp.qfl_spec(d, **QFL), run_qfl),
       "giou": (lambda d: fp.giou_spec(d, **GIOU), run_giou)}


def fails(run, spec):
    try:
        run(spec)
        return None
    except Exception as exc:  # an assertion or an error in the op: both are failures
        return f"{type(exc).__name__}: {exc}"[:3000] + "\n" + traceback.format_exc(limit=-3)[-1500:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=170.0)
    parser.add_argument("--max-failures", type=int, default=3, help="per op, shrunk and printed")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton", help="compared with backend='torch'")
    args = parser.parse_args()
    RUN.update(device=args.device, backend=args.backend)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("fuzz_gpu.py needs a CUDA device (or --device cpu --backend cpp for a dry run)")
    warnings.filterwarnings("ignore")
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "fuzz_gpu.log")
    log_file = open(log_path, "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    log(f"fuzz_gpu: {args.backend} vs torch on {where}, torch {torch.__version__}, seed "
        f"{args.seed}, {args.cases} cases, time limit {args.time_limit:.0f} s")
    start = time.monotonic()
    counts = {name: 0 for name in OPS}
    failures = {name: [] for name in OPS}
    # Interleaved (3 dsla, 1 qfl, 1 giou), so that kernel compilation, which dominates the
    # first seconds, is spread over all ops and a time limit cuts every op alike.
    schedule = [name for name, share in SHARE for _ in range(round(share * 5))]
    for i in range(args.cases):
        if time.monotonic() - start > args.time_limit:
            log(f"time limit reached after {i} cases")
            break
        name = schedule[i % len(schedule)]
        make, run = OPS[name]
        spec = make(fp.Draw.seeded(args.seed * 1_000_003 + i))
        message = fails(run, spec)
        counts[name] += 1
        if message is not None:
            failures[name].append(spec)
            if len(failures[name]) <= args.max_failures:
                small, tries = fp.shrink(spec, lambda s: fails(run, s) is not None, budget_s=20)
                log(f"FAIL {name} case {i}: {spec!r}\n  minimal ({tries} tries): {small!r}\n"
                    f"  {fails(run, small) or message}")
        if (i + 1) % 1000 == 0:
            log(f"{i + 1} cases, {sum(len(f) for f in failures.values())} failed, "
                f"{time.monotonic() - start:.1f} s")
    if args.device == "cuda":
        torch.cuda.synchronize()
    total, failed = sum(counts.values()), sum(len(f) for f in failures.values())
    elapsed = time.monotonic() - start
    log(f"fuzz_gpu: {total} cases ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"{failed} failed, {elapsed:.1f} s")
    ok = failed == 0 and total >= args.cases
    log("fuzz_gpu: PASS" if ok else "fuzz_gpu: FAIL")
    log_file.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
