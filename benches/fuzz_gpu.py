"""Fuzzed agreement on the GPU (issue 15 item 2): Triton vs the PyTorch reference, both on CUDA.

    python benches/fuzz_gpu.py [--cases 10000] [--seed 0] [--time-limit 200] [--jobs 14] [--out DIR]
    python benches/fuzz_gpu.py --device cpu --backend cpp --cases 300 --jobs 2   # a dry run
    python benches/fuzz_gpu.py --plan-only        # how many Triton variants the run compiles

Draws the problems of tests/fuzz_problems.py (the CI fuzz tests' strategies, bigger shapes)
from a fixed seed, without hypothesis (the device image has none): dsl_assign (60 %),
quality_focal_loss (20 %) and giou_loss (20 %) values and gradients. A failing case is
shrunk greedily to a locally minimal spec. Prints the count, the time, and each failure's
minimal spec and message; writes the same to DIR/fuzz_gpu.log and one line per case run to
DIR/fuzz_gpu_cases.txt; exit status 1 on any failure or when fewer than --cases cases ran
within --time-limit seconds (counted from the start, across every phase and worker).

Where the time goes: not in the cases (milliseconds each) but in Triton's JIT compilation
of kernel variants, CPU-bound (LLVM + ptxas); a variant is each distinct combination of
constexpr arguments, dtypes, pointer alignment and integer arguments equal to 1 or
divisible by 16. Drawn freely, 10,000 cases need 2,328 variants (1,310 of the DSLA gt pass;
`--plan-only --plan-cases 0`): at the 0.7-1 CPU-s per variant measured compiling for sm_90
on a 2-core x86 machine (no GPU needed to compile), or the 1.1 s per variant and case the
device showed serially, 30-45 minutes of one core. Two measures:

1. Variant plan (bounded specialisation). The variants the first --plan-cases cases need
   (600 cases: 612 variants, 590 CPU-s on that machine) are the plan; every later
   case is redrawn from its own seeds (draw a = 1, 2, ... up to --max-draws; 1.8 draws on
   average) until its Triton calls need no variant outside the plan, and runs its first
   draw only if none fits ("beyond the plan", compiled on demand). A case's variants are
   found by running its Triton calls with every kernel launch replaced by a recorder of the
   launch's specialisation key (Triton's own binder; nothing compiles or runs). Trade-off:
   sizes, data, layouts, hyper-parameters and odd shapes are drawn as freely as before (N =
   37 and N = 41 are one variant), but the combinations of specialisation states (B == 1,
   G % 16 == 0, dtype x semantics x topk x C, ...) are only those the first 600 cases drew,
   each exercised by more cases: a bug specific to a combination first drawn later goes
   unseen. Cases past the plan are other draws than a free run's (their draw is printed
   with them); --plan-cases 0 draws freely and compiles what that takes.
2. Parallel workers (--jobs K, spawned processes; worker k runs the cases i = k mod K)
   sharing one Triton cache directory: the plan's variants are first compiled once, dealt
   out among the workers (none compiled twice), then every worker loads them from the
   cache. A case's outcome depends on its index alone, so the merged report (in case
   order) is the same for any K. A worker that dies or loses its CUDA context (a sticky
   error such as an illegal address) is restarted after the case that killed it, which is
   reported as a failure.
"""
import argparse
import contextlib
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rtmdet import ops  # noqa: E402
from rtmdet.ops import _backend  # noqa: E402
from tests import fuzz_problems as fp  # noqa: E402

# C and topk from a few values: each new value compiles kernels (the rest are runtime ints).
DSLA = dict(max_b=4, max_side=256, max_n=1024, max_g=16, cs=(1, 13, 80), topks=(1, 7, 20))
QFL = dict(max_m=2048, cs=(1, 13, 80))
GIOU = dict(max_m=4096)
# Interleaved (3 dsla, 1 qfl, 1 giou), so that a time limit cuts every op alike.
SCHEDULE = ("dsla", "dsla", "dsla", "qfl", "giou")
MAKE = {"dsla": lambda d: fp.dsla_spec(d, **DSLA), "qfl": lambda d: fp.qfl_spec(d, **QFL),
        "giou": lambda d: fp.giou_spec(d, **GIOU)}
BUILD = {"dsla": fp.build_dsla, "qfl": fp.build_qfl, "giou": fp.build_giou}
# An error after which the process's CUDA context is unusable: the worker is restarted.
STICKY = ("illegal memory access", "unspecified launch failure", "misaligned address",
          "illegal instruction", "device-side assert", "CUDA error: an illegal")


def op_name(i):
    return SCHEDULE[i % len(SCHEDULE)]


def draw_spec(seed, i, attempt):
    """Case i's spec, draw `attempt` (draw 0 is the seed that earlier runs used for case i)."""
    base = seed * 1_000_003 + i if attempt == 0 else f"{seed}:{i}:{attempt}"
    return MAKE[op_name(i)](fp.Draw.seeded(base))


def call(name, problem, backend):
    """The op of `name` on `problem` with `backend`: the assignment, or (loss, gradient)."""
    if name == "dsla":
        return ops.dsl_assign(*problem.args, **problem.kwargs, backend=backend)
    op = ops.quality_focal_loss if name == "qfl" else ops.giou_loss
    return fp.loss_and_grad(op, problem, backend)


def check(name, problem, device, backend):
    """Raise AssertionError unless `backend` agrees with backend='torch' on the problem."""
    if name == "dsla":
        want = call(name, problem, "torch")
        got = call(name, problem, backend)
        fp.check_assignment(problem, want, got, f"{backend} on {device}")
    elif name == "qfl":
        fp.compare_losses(ops.quality_focal_loss, problem, backend, problem)
    else:
        fp.compare_losses(ops.giou_loss, problem, backend, fp.upcast(problem))


def failure(name, spec, device, backend, problem=None):
    """None if the case passes, else its error message (building it is part of the case)."""
    try:
        if problem is None:
            problem = BUILD[name](spec, device=device)
        check(name, problem, device, backend)
        return None
    except Exception as exc:  # an assertion or an error in the op: both are failures
        return f"{type(exc).__name__}: {exc}"[:3000] + "\n" + traceback.format_exc(limit=-3)[-1500:]


# ------------------------------------------------------------------------------------------
# Variant keys: the Triton launches a case makes, recorded instead of compiled and run
# ------------------------------------------------------------------------------------------

_BINDERS = {}


def planning_available():
    """None if variant keys can be recorded here, else why not."""
    if not _backend.triton_importable():
        return "triton is not installed"
    if _backend.triton_interpret():
        return "TRITON_INTERPRET=1 compiles nothing"
    try:
        from triton.backends.compiler import BaseBackend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:  # another Triton's internals: plan nothing, draw freely
        return f"this Triton has no launch binder to record with ({exc})"
    return None


@contextlib.contextmanager
def launches_recorded(on_launch):
    """Every Triton launch in the block calls on_launch(fn, key, run, args, grid, kwargs)
    instead of compiling and running; key is the launch's specialisation (what decides its
    compiled variant), from the binder Triton itself uses. The Triton backend is allowed on
    CPU tensors meanwhile (nothing runs, so a dry run can plan too)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    run, can_run = JITFunction.run, _backend._can_run

    def recorded(self, *args, grid, warmup, **kwargs):
        binder = _BINDERS.get(self)
        if binder is None:  # the NVIDIA backend specialises as the base backend does
            binder = _BINDERS[self] = create_function_from_signature(self.signature, self.params,
                                                                     BaseBackend)
        _, specialization, options = binder(*args, **kwargs)
        name = f"{self.fn.__module__}.{self.fn.__qualname__}"
        # (an address in a repr would make every process's key differ: drop it)
        key = re.sub(r"0x[0-9a-fA-F]+", "0x",
                     repr((name, tuple(specialization), sorted(options.items()))))
        return on_launch(self, key, run, args, grid, kwargs)

    JITFunction.run = recorded
    _backend._can_run = lambda op, backend, device: (None if backend == "triton"
                                                     else can_run(op, backend, device))
    try:
        yield
    finally:
        JITFunction.run, _backend._can_run = run, can_run


def variant_keys(name, problem):
    """The specialisation keys of the Triton launches the case makes (a frozenset)."""
    keys = set()
    with launches_recorded(lambda fn, key, run, args, grid, kwargs: keys.add(key)):
        try:
            call(name, problem, "triton")
        except Exception:  # the real run fails the same way: it needs no more variants
            pass
    return frozenset(keys)


def kernel_of(key):
    """The kernel's name in a variant key."""
    return key[2:key.index("'", 2)].rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------
# Worker process
# ------------------------------------------------------------------------------------------

def worker_main(k, cfg, conn):
    """One worker: answers the parent's ("plan" | "compile" | "run" | "stop", ...) tasks."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # K processes on K cores; the problems are small
    parent = os.getppid()
    device, backend, seed = cfg["device"], cfg["backend"], cfg["seed"]
    where = torch.cuda.get_device_name() if device == "cuda" else device
    conn.send(("ready", where))

    def time_left():
        return cfg["deadline"] - time.time()

    while True:
        task = conn.recv()
        kind = task[0]
        if kind == "stop":
            return
        if kind == "plan":  # keys of the cases' first draws: {key: first case needing it}
            first = {}
            for i in task[1]:
                if time_left() <= 0:
                    break
                with contextlib.suppress(Exception):  # (a build error fails in the run)
                    problem = BUILD[op_name(i)](draw_spec(seed, i, 0), device=device)
                    for key in variant_keys(op_name(i), problem):
                        first.setdefault(key, i)
            conn.send(("planned", first))
        elif kind == "compile":  # {case: keys}: compile these variants into the cache
            done, error = set(), None
            for i, wanted in sorted(task[1].items()):
                if time_left() <= 0:
                    break

                def compile_wanted(fn, key, run, args, grid, kwargs):
                    nonlocal error
                    if key not in wanted or key in done:
                        return
                    try:  # warmup: compile without a launch; then load it and build its launcher
                        run(fn, *args, grid=grid, warmup=True, **kwargs)._init_handles()
                        done.add(key)
                    except Exception as exc:  # compiled on demand in the run instead
                        error = error or f"{type(exc).__name__}: {exc}"[:300]
                with contextlib.suppress(Exception), launches_recorded(compile_wanted):
                    call(op_name(i), BUILD[op_name(i)](draw_spec(seed, i, 0), device=device),
                         "triton")
            conn.send(("compiled", (len(done), error)))
        elif kind == "run":
            _run_cases(cfg, task[1], task[2], conn, time_left, parent)
            return


def _choose(cfg, i, plan):
    """(spec, problem, draw, in_plan): case i's first draw that needs no variant outside the
    plan (or its first draw, in_plan False, if none of --max-draws does)."""
    name, device, seed = op_name(i), cfg["device"], cfg["seed"]
    first = None
    for attempt in range(cfg["max_draws"] if plan is not None and i >= cfg["plan_cases"] else 1):
        spec = draw_spec(seed, i, attempt)
        try:
            problem = BUILD[name](spec, device=device)
        except Exception:  # a build error is the case's failure: keep it as drawn
            return spec, None, attempt, True
        if plan is None or i < cfg["plan_cases"] or variant_keys(name, problem) <= plan:
            return spec, problem, attempt, True
        if first is None:
            first = (spec, problem)
    return first[0], first[1], 0, False


def _run_cases(cfg, start, plan, conn, time_left, parent):
    """Cases start, start + K, ... until --cases or the deadline; one message per case."""
    device, backend, jobs = cfg["device"], cfg["backend"], cfg["jobs"]
    shrunk = {name: 0 for name in MAKE}
    for i in range(start, cfg["cases"], jobs):
        if time_left() <= 0 or os.getppid() != parent:
            break
        conn.send(("start", i))
        name = op_name(i)
        spec, problem, attempt, in_plan = _choose(cfg, i, plan)
        conn.send(("chosen", (i, attempt, repr(spec))))
        message = failure(name, spec, device, backend, problem)
        record = dict(i=i, op=name, draw=attempt, in_plan=in_plan, message=message,
                      spec=repr(spec), minimal=None, tries=0, minimal_message=None)
        sticky = message is not None and any(s in message for s in STICKY)
        if message is not None and not sticky and shrunk[name] < cfg["max_failures"]:
            shrunk[name] += 1
            small, tries = fp.shrink(
                spec, lambda s: failure(name, s, device, backend) is not None,
                budget_s=min(20.0, max(5.0, time_left())))
            record.update(minimal=repr(small), tries=tries,
                          minimal_message=failure(name, small, device, backend) or message)
        conn.send(("case", record))
        if sticky:  # this process's CUDA context is gone: the parent starts a fresh worker
            os._exit(3)
    conn.send(("done", None))


# ------------------------------------------------------------------------------------------
# Parent: phases, restarts, the merged report
# ------------------------------------------------------------------------------------------

class Pool:
    """K spawned workers, each with a pipe to the parent. Pipe messages are written at once
    (no feeder thread), so a worker that crashes has sent everything up to its crash, and
    its closed pipe says that it ended."""

    def __init__(self, cfg):
        self.cfg, self.ctx = cfg, mp.get_context("spawn")  # no fork after CUDA init
        self.procs, self.conns, self.where = {}, {}, None
        for k in range(cfg["jobs"]):
            self.start(k)

    def start(self, k):
        ours, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(k, self.cfg, theirs), daemon=True)
        proc.start()
        theirs.close()  # so that the worker's end closing reads as EOF here
        self.procs[k], self.conns[k] = proc, ours

    def send(self, k, task):
        if self.conns[k] is not None:
            with contextlib.suppress(OSError):  # a dead worker: its EOF is handled where read
                self.conns[k].send(task)

    def messages(self, timeout=0.5):
        """[(k, message)] ready now, (k, None) once when worker k has ended."""
        live = {conn: k for k, conn in self.conns.items() if conn is not None}
        out = []
        for conn in mp.connection.wait(list(live), timeout):
            k = live[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self.conns[k] = None
                self.procs[k].join(timeout=10)
                out.append((k, None))
                continue
            if msg[0] == "ready":
                self.where = self.where or msg[1]
            out.append((k, msg))
        return out

    def wait_ready(self, deadline):
        """Wait until every worker has started (imports, CUDA context)."""
        waiting = set(self.procs)
        while waiting and time.time() < deadline:
            for k, msg in self.messages():
                waiting.discard(k)
                if msg is None and not any(conn for conn in self.conns.values()):
                    raise RuntimeError("every fuzz_gpu worker ended at start")

    def gather(self, kind, deadline):
        """{k: answer} to the last task, from every worker that answers it."""
        waiting, answers = {k for k, conn in self.conns.items() if conn}, {}
        while waiting and time.time() < deadline + 25:
            for k, msg in self.messages():
                if msg is None or msg[0] == kind:
                    waiting.discard(k)
                if msg is not None and msg[0] == kind:
                    answers[k] = msg[1]
        return answers

    def close(self, grace=5.0):
        """Stop the workers: idle ones at once, busy ones after `grace` seconds in all."""
        for k in self.procs:
            self.send(k, ("stop",))
        end = time.time() + grace
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, end - time.time()))
            if proc.is_alive():
                proc.terminate()


def make_plan(pool, cfg, log):
    """The variant plan: {key: first case needing it} of the first --plan-cases cases."""
    n, jobs = min(cfg["plan_cases"], cfg["cases"]), cfg["jobs"]
    for k in range(jobs):
        pool.send(k, ("plan", list(range(k, n, jobs))))
    first = {}
    for answer in pool.gather("planned", cfg["deadline"]).values():
        for key, i in answer.items():
            first[key] = min(i, first.get(key, i))
    per_kernel = {}
    for key in first:
        per_kernel[kernel_of(key)] = per_kernel.get(kernel_of(key), 0) + 1
    log(f"variant plan: the first {n} cases need {len(first)} Triton variants "
        f"({', '.join(f'{name} {c}' for name, c in sorted(per_kernel.items()))})")
    return first


def compile_plan(pool, cfg, first, log):
    """Compile the plan's variants into the shared cache, dealt out among the workers
    (by kernel, so that each worker gets its share of the slow ones)."""
    start, jobs = time.time(), cfg["jobs"]
    work = [{} for _ in range(jobs)]
    for n, key in enumerate(sorted(first, key=lambda key: (kernel_of(key), first[key], key))):
        work[n % jobs].setdefault(first[key], set()).add(key)
    for k in range(jobs):
        pool.send(k, ("compile", work[k]))
    answers = pool.gather("compiled", cfg["deadline"]).values()
    errors = [error for _, error in answers if error]
    cfg["compiled"] = (f"compiled {sum(done for done, _ in answers)} of the plan's {len(first)} "
                       f"variants in {time.time() - start:.1f} s on {jobs} workers")
    log(cfg["compiled"] + (f"; first error: {errors[0]}" if errors else ""))


def run_all(pool, cfg, plan, log):
    """Run every case on the workers; a worker that ends before its share is done is
    restarted after its last case (at most 3 times each). Returns {case: record}."""
    jobs, records = cfg["jobs"], {}
    current, chosen, last = {}, {}, {k: k - jobs for k in range(jobs)}
    restarts, running, finished = {k: 0 for k in range(jobs)}, set(range(jobs)), set()
    for k in range(jobs):
        if pool.conns[k] is None:  # ended in an earlier phase
            pool.start(k)
        pool.send(k, ("run", k, plan))
    next_mark = 1000
    while running:
        if time.time() > cfg["deadline"] + 25:  # stuck in a case (gpu_run.sh's timeout: +40 s)
            log(f"workers {sorted(running)} still busy 25 s after the time limit: stopped")
            break
        for k, msg in pool.messages():
            if msg is None and k in finished:
                continue
            if msg is None:  # ended without "done": crashed, or lost its CUDA context
                running.discard(k)
                case = current.pop(k, None)
                if case is not None:  # it died in this case: a failure
                    draw, spec = chosen.get(case, (-1, "?"))
                    records[case] = dict(
                        i=case, op=op_name(case), draw=draw, in_plan=True, spec=spec,
                        message=f"worker died in this case (exit code {pool.procs[k].exitcode})",
                        minimal=None, tries=0, minimal_message=None)
                    last[k] = case
                if (last[k] + jobs < cfg["cases"] and restarts[k] < 3
                        and time.time() < cfg["deadline"]):
                    restarts[k] += 1
                    log(f"worker {k} restarted after case {last[k]}")
                    pool.start(k)
                    pool.send(k, ("run", last[k] + jobs, plan))
                    running.add(k)
                    finished.discard(k)
            elif msg[0] == "start":
                current[k] = msg[1]
            elif msg[0] == "chosen":
                chosen[msg[1][0]] = msg[1][1:]
            elif msg[0] == "case":
                records[msg[1]["i"]] = msg[1]
                last[k] = msg[1]["i"]
                current.pop(k, None)
                if len(records) >= next_mark:
                    failed = sum(r["message"] is not None for r in records.values())
                    elapsed = time.time() - cfg["start"]
                    log(f"{len(records)} cases, {failed} failed, {elapsed:.1f} s")
                    next_mark += 1000
            elif msg[0] == "done":
                running.discard(k)
                finished.add(k)
    return records


def compiled_variants(cache_dir):
    """Kernel variants in the Triton cache (a directory per variant holds its cubin)."""
    count = 0
    for _, _, files in os.walk(cache_dir):
        count += any(f.endswith(".cubin") for f in files)
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=200.0)
    parser.add_argument("--jobs", type=int, default=min(14, os.cpu_count() or 1),
                        help="worker processes (default min(14, CPU cores))")
    parser.add_argument("--plan-cases", type=int, default=600,
                        help="the variants of the first N cases bound the rest (0: draw freely)")
    parser.add_argument("--max-draws", type=int, default=30,
                        help="draws per later case to find one inside the plan")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the plan's variants and stop (no GPU needed)")
    parser.add_argument("--max-failures", type=int, default=3, help="per op, shrunk and printed")
    parser.add_argument("--triton-cache", default=None,
                        help="TRITON_CACHE_DIR of the workers (default: a new temporary one)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton", help="compared with backend='torch'")
    args = parser.parse_args()
    if args.device == "cuda" and not args.plan_only and not torch.cuda.is_available():
        sys.exit("fuzz_gpu.py needs a CUDA device (or --device cpu --backend cpp for a dry run)")
    if args.plan_only:
        args.device = "cpu" if not torch.cuda.is_available() else args.device
    # the parent dies by `timeout`'s SIGTERM: exit normally so the daemon workers are ended
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "fuzz_gpu.log"), "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    why_not = planning_available()
    plan_cases = 0 if why_not else (args.cases if args.plan_only and args.plan_cases == 0
                                    else args.plan_cases)
    # one cache for every worker (inherited), new unless named: its variants are this run's
    compiles = args.device == "cuda" and args.backend == "triton" and not args.plan_only
    cache_dir = args.triton_cache or (tempfile.mkdtemp(prefix="fuzz_gpu_triton_") if compiles
                                      else None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    cfg = dict(device=args.device, backend=args.backend, seed=args.seed, cases=args.cases,
               jobs=max(1, args.jobs), plan_cases=plan_cases, max_draws=max(1, args.max_draws),
               max_failures=args.max_failures, cache_dir=cache_dir, start=start,
               deadline=start + args.time_limit)
    pool = Pool(cfg)
    records = {}
    try:
        pool.wait_ready(cfg["deadline"])
        log(f"fuzz_gpu: {args.backend} vs torch on {pool.where}, torch {torch.__version__}, seed "
            f"{args.seed}, {args.cases} cases, {cfg['jobs']} workers, time limit "
            f"{args.time_limit:.0f} s" + (f", Triton cache {cache_dir}" if cache_dir else ""))
        if why_not:
            log(f"no variant plan ({why_not}): every case is its first draw")
        plan = make_plan(pool, cfg, log) if plan_cases > 0 else None
        if args.plan_only:
            return
        if plan and args.device == "cuda" and args.backend == "triton":
            compile_plan(pool, cfg, plan, log)
        records = run_all(pool, cfg, frozenset(plan) if plan else None, log)
    finally:
        pool.close()
    ok = report(args, cfg, records, log, start)
    log_file.close()
    if cache_dir and not args.triton_cache:  # ours, temporary: hundreds of variants
        shutil.rmtree(cache_dir, ignore_errors=True)
    sys.exit(0 if ok else 1)


def report(args, cfg, records, log, start):
    """The merged report, in case order (the same for any number of workers)."""
    elapsed = time.time() - start
    counts = {name: 0 for name in MAKE}
    failed = [records[i] for i in sorted(records) if records[i]["message"] is not None]
    with open(os.path.join(args.out, "fuzz_gpu_cases.txt"), "w") as f:
        for i in sorted(records):
            r = records[i]
            counts[r["op"]] += 1
            outcome = "ok" if r["message"] is None else "FAIL " + r["message"].splitlines()[0][:200]
            f.write(f"{i}\t{r['op']}\tdraw {r['draw']}{'' if r['in_plan'] else ' beyond-plan'}"
                    f"\t{outcome}\n")
    shown = {name: 0 for name in MAKE}
    for r in failed:
        shown[r["op"]] += 1
        if shown[r["op"]] > args.max_failures:
            continue
        minimal = (f"\n  minimal ({r['tries']} tries): {r['minimal']}\n  {r['minimal_message']}"
                   if r["minimal"] else f"\n  {r['message']}")
        log(f"FAIL {r['op']} case {r['i']} (draw {r['draw']}): {r['spec']}{minimal}")
    for name, n in shown.items():
        if n > args.max_failures:
            log(f"... and {n - args.max_failures} more {name} failures (DIR/fuzz_gpu_cases.txt)")
    total = sum(counts.values())
    later = [r for r in records.values() if r["i"] >= cfg["plan_cases"]]
    if cfg["plan_cases"] > 0 and later:
        draws = sum(r["draw"] + 1 if r["in_plan"] else cfg["max_draws"] for r in later
                    if r["draw"] >= 0)
        beyond = sum(not r["in_plan"] for r in later)
        log(f"cases after the plan's {cfg['plan_cases']}: {len(later)}, "
            f"{draws / max(len(later), 1):.2f} draws each, {beyond} beyond the plan"
            + (f"; {cfg['compiled']}" if cfg.get("compiled") else ""))
    if cfg["cache_dir"]:
        log(f"Triton variants in the cache: {compiled_variants(cfg['cache_dir'])}")
    log(f"fuzz_gpu: {total} cases ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"{len(failed)} failed, {elapsed:.1f} s")
    if total < args.cases:
        log(f"time limit reached: {args.cases - total} cases not run")
    ok = not failed and total >= args.cases
    log("fuzz_gpu: PASS" if ok else "fuzz_gpu: FAIL")
    return ok


if __name__ == "__main__":
    main()
