"""Exact batched one-to-one matching (SPEC section 4): public `hungarian_match`, its scipy reference.

Each image b is a linear sum assignment problem on cost[b][:, real gts]: min(Q, G_b) pairs,
each query and each gt used at most once, minimal total cost (the optimum scipy's
`linear_sum_assignment` finds; where several are optimal, the fast paths pick one
deterministically, not necessarily scipy's).

Backends: "torch" wraps scipy per image (a host loop: the reference, scipy is only a test
dependency); "cpp" (csrc/cpu/hungarian_cpu.cpp) and "triton" (kernels/hungarian.py) run the
same shortest-augmenting-path algorithm with dual potentials in float64 over the whole batch,
without host synchronisation (the Triton kernel is one launch, CUDA-graph capturable).

Values: +inf means "forbidden pair"; NaN and -inf are errors (as scipy). A problem with no
complete matching over finite entries is infeasible: ValueError naming the image. Both value
checks cost one host synchronisation after the solve; they are skipped under torch.compile,
CUDA graph capture and `ops.set_value_checks(False)`, and then an infeasible image comes back
all -1 (and NaN entries act as forbidden pairs).
"""
import numpy as np
import torch

from . import _backend
from ._checks import check_dim, check_same_device, check_tensor, describe, value_checks_active

OP = "hungarian_match"


def hungarian_match(cost, gt_mask=None, *, backend="auto"):
    """Optimal one-to-one matching of queries to gts, per image.

    cost (B, Q, G) or (Q, G) float; gt_mask (B, G) (or (G,)) bool, True = real gt, padding
    anywhere, never matched (None = all real). Returns (B, Q) (or (Q,)) int64: the gt index
    matched to each query, -1 = unmatched; exactly min(Q, G_b) queries of image b are matched.
    Ties (several optimal matchings) are broken deterministically.
    """
    unbatched, cost, gt_mask = _prepare(cost, gt_mask)
    impls = _implementations()
    impl = _backend.resolve_backend(OP, backend, cost.device, impls)
    if impl == "torch":
        out = hungarian_match_ref(cost, gt_mask)
    else:
        if cost.dtype not in (torch.float32, torch.float64):
            cost = cost.float()  # the solvers read fp32/fp64 costs, potentials are fp64
        out, status = impls[impl](cost, gt_mask)
        _check_solution(cost, gt_mask, status)
    return out[0] if unbatched else out


def _implementations():
    """Fast implementations by backend name: fn(cost (B,Q,G), gt_mask (B,G)) -> (match, status)."""
    impls = {}
    try:
        from rtmdet.kernels.hungarian import hungarian_match_triton
        impls["triton"] = hungarian_match_triton
    except ImportError:
        pass
    if OP in _backend.native_ops():
        impls["cpp"] = torch.ops.rtmdet.hungarian_match
    return impls


def _register_native_fake():
    """Shapes of torch.ops.rtmdet.hungarian_match for torch.compile and opcheck."""
    @torch.library.register_fake("rtmdet::" + OP)
    def _(cost, gt_mask):
        B, Q, _ = cost.shape
        return (cost.new_empty((B, Q), dtype=torch.long), cost.new_empty((B,), dtype=torch.int32))


if OP in _backend.native_ops():
    _register_native_fake()


def _prepare(cost, gt_mask):
    """Check the inputs and bring them to the batched form; returns (unbatched, cost, gt_mask)."""
    check_tensor("cost", cost, ndim=(2, 3), floating=True)
    cost = cost.detach()  # a matching input: integer outputs, no gradient
    unbatched = cost.dim() == 2
    if unbatched:
        cost = cost[None]
    B, Q, G = cost.shape
    if gt_mask is None:
        gt_mask = torch.ones((B, G), dtype=torch.bool, device=cost.device)
    else:
        check_tensor("gt_mask", gt_mask, ndim=1 if unbatched else 2)
        if gt_mask.dtype != torch.bool:
            raise TypeError(f"gt_mask must be a bool tensor, got {describe(gt_mask)}")
        check_same_device(cost=cost, gt_mask=gt_mask)
        if unbatched:
            gt_mask = gt_mask[None]
        form = "(G,) for an unbatched (Q, G) cost" if unbatched else "(B, G) for a (B, Q, G) cost"
        check_dim("gt_mask", gt_mask, 0, B, f"B, the batch size of cost; gt_mask is {form}")
        check_dim("gt_mask", gt_mask, 1, G, f"G, the last dimension of cost; gt_mask is {form}")
    return unbatched, cost, gt_mask


def _check_solution(cost, gt_mask, status):
    """One host synchronisation: NaN/-inf among real gts' costs, then infeasible images."""
    if not value_checks_active(cost) or cost.numel() == 0:
        return
    # One pass over the cost: a column's minimum is NaN or -inf iff it holds one (amin keeps NaN).
    colmin = cost.amin(dim=1)                                   # (B, G)
    flags = torch.stack([(~(colmin > -torch.inf) & gt_mask).any(), (status != 0).any()])
    if not bool(flags.any()):
        return
    if bool(flags[0]):
        bad = ~(cost > -torch.inf) & gt_mask[:, None, :]
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"cost must not contain NaN or -inf (use +inf for forbidden pairs), "
                         f"found {cost[idx].item()} at index {idx} ({describe(cost)})")
    b = int((status != 0).nonzero()[0, 0])
    raise ValueError(_infeasible_message(b, cost, gt_mask))


def _infeasible_message(b, cost, gt_mask):
    return (f"cost is infeasible for image {b}: no matching of min(Q, G_b) = "
            f"{min(cost.shape[1], int(gt_mask[b].sum()))} pairs uses only finite costs "
            f"(+inf marks a forbidden pair; {describe(cost)})")


# ----------------------------------------------------------------------------------------
# Reference: scipy per image
# ----------------------------------------------------------------------------------------

def hungarian_match_ref(cost, gt_mask=None):
    """scipy.optimize.linear_sum_assignment on each image's real gts (a host loop).

    cost (B, Q, G) float; gt_mask (B, G) bool or None -> (B, Q) int64, -1 = unmatched.
    Raises ValueError for NaN/-inf entries among real gts and for infeasible images.
    """
    from scipy.optimize import linear_sum_assignment  # a test dependency, imported on use

    B, Q, G = cost.shape
    if gt_mask is None:
        gt_mask = torch.ones((B, G), dtype=torch.bool, device=cost.device)
    out = torch.full((B, Q), -1, dtype=torch.long)
    costs = cost.detach().cpu().double().numpy()
    masks = gt_mask.cpu().numpy()
    for b in range(B):
        real = np.flatnonzero(masks[b])
        c = costs[b][:, real]
        if c.size == 0:
            continue
        if np.isnan(c).any() or np.isneginf(c).any():
            idx = np.argwhere(np.isnan(c) | np.isneginf(c))[0]
            raise ValueError(f"cost must not contain NaN or -inf (use +inf for forbidden pairs), "
                             f"found {c[tuple(idx)]} at index {(b, int(idx[0]), int(real[idx[1]]))} "
                             f"({describe(cost)})")
        try:
            rows, cols = linear_sum_assignment(c)
        except ValueError as exc:  # scipy: "cost matrix is infeasible"
            raise ValueError(_infeasible_message(b, cost, gt_mask)) from exc
        out[b, torch.from_numpy(rows)] = torch.from_numpy(real[cols])
    return out.to(cost.device)
