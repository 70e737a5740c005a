"""Exact batched linear sum assignment (SPEC section 4) in Triton: `hungarian_match_triton`.

One program per image, one launch for the batch, no host synchronisation (CUDA-graph safe).
Program b solves its image on the real gts as an R x C problem with R <= C (every row
matched): rows = the G_b real gts, columns = the Q queries when G_b <= Q (DETR: G << Q),
else rows = the queries, columns = the gts (padded ones are +inf columns).

Algorithm (the same as csrc/cpu/hungarian_cpu.cpp, same float64 arithmetic in the same order
and the same tie rules, so both backends return the same matching): shortest augmenting
paths with dual potentials (Crouse 2016, as scipy), from a greedy start u_i = min_j c_ij,
v = 0, each row taking its cheapest column if still free; every row left over runs a
Dijkstra over the columns on reduced costs c - u - v >= 0 until it reaches a free column.
Ties: smallest distance, then a free column (ends the search), then the lowest index.

Why Triton rather than CUDA: the same kernel runs under TRITON_INTERPRET=1, so CI tests it
on CPU machines; the algorithm is latency-bound (a chain of dependent reductions), not a
place where hand-written CUDA would buy much.

Layout: the column-sized state (distances d, potentials v, row4col, visited) is one
register vector of BLOCK >= C lanes, so picking the next column is one tuple reduction
(distance, tie key and row of that column packed in one int32); each step reads one cost
row, contiguous when the launcher hands a (B, G, Q) copy (G <= Q). The greedy start reads
RB rows per step (independent loads) and resolves the claims with an integer atomic min
(order-free, so deterministic). Row-sized state (u, col4row) and the predecessor of each
column (path) live in a global scratch buffer, written through vector stores with one lane
per address and read after a barrier (scalar stores would race between warps). Sizes
(B, Q, G) are runtime arguments; BLOCK (a power of two >= the columns) is a compile-time
block size, so each new BLOCK compiles once.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# transpose: hand the kernel a (B, G, Q) copy when G <= Q, so a gt's costs are contiguous
# (coalesced row reads; one extra copy of the cost). elems_per_thread sets num_warps.
# The greedy start reads RB rows per step, greedy_elems_per_thread cost elements per thread.
MAX_BLOCK = 16384  # columns held in one program's registers (16 warps x 32 lanes x 32)
# pack: the search's tie key and row in one int32 (needs BLOCK <= 8192; off: two reductions values).
TUNING = dict(transpose=True, elems_per_thread=8, max_warps=16, greedy_elems_per_thread=16,
              pack=True)


@triton.jit
def _lex_min(d1, k1, p1, d2, k2, p2):
    """Combine of (distance, unique tie key, payload): the lexicographically smaller pair."""
    take2 = (d2 < d1) | ((d2 == d1) & (k2 < k1))
    return tl.where(take2, d2, d1), tl.where(take2, k2, k1), tl.where(take2, p2, p1)


@triton.jit
def _lex_min2(d1, k1, d2, k2):
    take2 = (d2 < d1) | ((d2 == d1) & (k2 < k1))
    return tl.where(take2, d2, d1), tl.where(take2, k2, k1)


@triton.jit
def _row_costs(cost_ptr, base, i, row_stride, col_stride, cols, colvalid, GTS_T: tl.constexpr):
    """Costs of row i over the BLOCK columns as float64, +inf outside the valid columns."""
    if GTS_T:
        ptrs = cost_ptr + base + i * row_stride + cols  # (B, G, Q) copy: contiguous rows
    else:
        ptrs = cost_ptr + base + i * row_stride + cols * col_stride
    c = tl.load(ptrs, mask=colvalid, other=float("inf")).to(tl.float64)
    return tl.where(colvalid, c, float("inf"))


@triton.jit(do_not_specialize=["Q", "G", "s_b", "s_q", "s_g", "RMAX"])  # no recompiles per size
def _hungarian_kernel(cost_ptr, mask_ptr, out_ptr, status_ptr, u_ptr, c4r_ptr, path_ptr,
                      Q, G, s_b, s_q, s_g, RMAX,
                      GTS_T: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr,
                      PACKED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    first = cols == 0  # the lane that performs "scalar" stores
    INF: tl.constexpr = float("inf")
    BIG: tl.constexpr = 0x7FFFFFFF
    gmask = tl.load(mask_ptr + b * G + cols, mask=cols < G, other=0) != 0
    n_real = tl.sum(gmask.to(tl.int32), axis=0)
    gts_rows = n_real <= Q
    if GTS_T:  # rows = gts over a (B, G, Q) copy
        R = G
        row_stride = s_g
        col_stride = s_q
        colvalid = cols < Q
    else:  # rows = gts or queries, per image
        R = Q
        row_stride = s_q
        col_stride = s_g
        colvalid = gmask
        if gts_rows:
            R = G
            row_stride = s_g
            col_stride = s_q
            colvalid = cols < Q
    base = b * s_b
    u_row = u_ptr + b * RMAX
    c4r_row = c4r_ptr + b * RMAX
    path_row = path_ptr + b * BLOCK

    v = tl.zeros((BLOCK,), dtype=tl.float64)
    row4col = tl.full((BLOCK,), -1, dtype=tl.int32)
    failed = n_real * 0  # becomes 1 when the image is infeasible

    # Greedy start, RB rows per step (independent loads, no dependent chain): u_i = min_j c_ij
    # at the lowest such j; column j goes to the lowest row whose minimum it is: an atomic min
    # over the claims, the same as taking the rows in order, each its column if still free.
    tl.store(path_row + cols, BIG + cols * 0)  # the claims live in `path` until the first search
    tl.debug_barrier()
    rr = tl.arange(0, RB)
    r0 = n_real * 0  # while loops: the interpreter cannot range() over a runtime int
    while r0 < R:
        rows = r0 + rr
        inrange = rows < R
        ract = inrange & (tl.load(mask_ptr + b * G + rows, mask=inrange & gts_rows, other=1) != 0)
        ok2 = ract[:, None] & colvalid[None, :]
        if GTS_T:
            ptrs = cost_ptr + base + rows[:, None] * row_stride + cols[None, :]
        else:
            ptrs = cost_ptr + base + rows[:, None] * row_stride + cols[None, :] * col_stride
        c = tl.where(ok2, tl.load(ptrs, mask=ok2, other=float("inf")), float("inf"))
        mn = tl.min(c, axis=1)
        j = tl.argmin(c, axis=1, tie_break_left=True)  # the lowest index among equal minima
        finite = ract & (mn < INF)
        failed = tl.maximum(failed, tl.max((ract & ~finite).to(tl.int32), axis=0))
        tl.store(u_row + rows, mn.to(tl.float64), mask=ract)
        tl.store(c4r_row + rows, rows * 0 - 1, mask=inrange)
        tl.atomic_min(path_row + j, rows, mask=finite)
        r0 += RB
    tl.debug_barrier()
    claim = tl.load(path_row + cols)
    row4col = tl.where(claim < BIG, claim, -1)
    tl.store(c4r_row + row4col, cols, mask=row4col >= 0)
    tl.debug_barrier()

    # One shortest augmenting path per row left free.
    cur = n_real * 0
    while cur < R:
        active = tl.load(mask_ptr + b * G + cur, mask=gts_rows, other=1) != 0
        if active & (failed == 0):
            if tl.load(c4r_row + cur) < 0:
                d = tl.full((BLOCK,), INF, dtype=tl.float64)
                visited = cols < 0
                i = cur
                min_val = tl.zeros((), dtype=tl.float64)
                sink = n_real * 0 - 1
                while sink < 0:
                    ui = tl.load(u_row + i)
                    c = _row_costs(cost_ptr, base, i, row_stride, col_stride, cols, colvalid,
                                   GTS_T)
                    r = min_val + c - ui - v
                    upd = (r < d) & ~visited
                    d = tl.where(upd, r, d)
                    tl.store(path_row + cols, i + cols * 0, mask=upd)
                    key = cols + tl.where(row4col >= 0, BLOCK, 0)  # free columns first on ties
                    dist = tl.where(visited, INF, d)
                    if PACKED:  # (key, row4col) in one int32: one value fewer to shuffle
                        best, bkey = tl.reduce((dist, key * 65536 + (row4col + 1)), 0, _lex_min2)
                        owner = (bkey & 0xFFFF) - 1
                        bkey = bkey >> 16
                    else:
                        best, bkey, owner = tl.reduce((dist, key, row4col), 0, _lex_min)
                    if best < INF:
                        j = bkey % BLOCK
                        min_val = best
                        visited = visited | (cols == j)
                        if owner < 0:
                            sink = j
                        else:
                            i = owner
                    else:  # no finite augmenting path: infeasible
                        failed = n_real * 0 + 1
                        sink = n_real * 0 + BLOCK
                if failed == 0:
                    # Potentials: visited rows up, visited columns down by min_val - d; the
                    # sink's lane carries the new row cur (+ min_val). One lane per address.
                    owner_row = tl.where(cols == sink, cur, row4col)
                    delta = tl.where(cols == sink, min_val, min_val - d)
                    uo = tl.load(u_row + owner_row, mask=visited, other=0.0)
                    tl.store(u_row + owner_row, uo + delta, mask=visited)
                    v = tl.where(visited & (cols != sink), v - delta, v)
                    tl.debug_barrier()
                    # Flip the path: read-only walk (old col4row), then one vector write-back.
                    j = sink
                    r_on = n_real * 0 - 1
                    while r_on != cur:
                        r_on = tl.load(path_row + j)
                        row4col = tl.where(cols == j, r_on, row4col)
                        j = tl.load(c4r_row + r_on)
                    tl.debug_barrier()
                    tl.store(c4r_row + row4col, cols, mask=row4col >= 0)
                    tl.debug_barrier()
        cur += 1

    tl.store(status_ptr + b + cols, failed + cols * 0, mask=first)
    out_row = out_ptr + b * Q
    if gts_rows | (failed != 0):
        tl.store(out_row + cols, tl.where(failed == 0, row4col, -1).to(tl.int64), mask=cols < Q)
    else:  # rows = queries: every query is matched; column j (a gt) went to query row4col[j]
        tl.store(out_row + row4col, cols.to(tl.int64), mask=row4col >= 0)


def _block(Q, G):
    n = max(Q, G) if G > Q else Q
    return max(32, triton.next_power_of_2(n))


@triton_op("rtmdet::hungarian_match_triton", mutates_args=())
def _hungarian_op(cost: torch.Tensor, gt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Q, G = cost.shape
    dev = cost.device
    out = torch.empty((B, Q), dtype=torch.int64, device=dev)
    status = torch.empty((B,), dtype=torch.int32, device=dev)
    if B == 0 or Q == 0 or G == 0:
        out.fill_(-1)
        status.zero_()
        return out, status
    t = TUNING
    gts_t = bool(t["transpose"]) and G <= Q
    if gts_t:
        cost = cost.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Q, G) view of a (B, G, Q) copy
    BLOCK = _block(Q, G)
    RMAX = max(Q, G)
    u = torch.empty((B, RMAX), dtype=torch.float64, device=dev)
    c4r = torch.empty((B, RMAX), dtype=torch.int32, device=dev)
    path = torch.empty((B, BLOCK), dtype=torch.int32, device=dev)
    mask = gt_mask.to(torch.uint8).contiguous()  # a copy: inductor (torch 2.11) cannot lower a bool->uint8 view
    warps = max(1, min(t["max_warps"], BLOCK // (32 * t["elems_per_thread"])))
    wrap_triton(_hungarian_kernel)[(B,)](
        cost, mask, out, status, u, c4r, path, Q, G,
        cost.stride(0), cost.stride(1), cost.stride(2), RMAX,
        GTS_T=gts_t, BLOCK=BLOCK, RB=max(1, t["greedy_elems_per_thread"] * 32 * warps // BLOCK),
        PACKED=bool(t["pack"]) and BLOCK <= 8192, num_warps=warps)
    return out, status


@_hungarian_op.register_fake
def _hungarian_fake(cost, gt_mask):
    # explicit, so that fake tensors never reach the kernel (the interpreter would run it)
    B, Q, _ = cost.shape
    return cost.new_empty((B, Q), dtype=torch.int64), cost.new_empty((B,), dtype=torch.int32)


def hungarian_match_triton(cost, gt_mask):
    """Batched exact matching on the GPU, one program per image.

    cost (B, Q, G) float32/float64, gt_mask (B, G) bool -> (match (B, Q) int64, -1 = unmatched;
    status (B,) int32, 1 = infeasible, its row all -1). Inputs are assumed checked
    (rtmdet.ops.hungarian_match does it and raises on status).
    """
    B, Q, G = cost.shape
    if _block(Q, G) > MAX_BLOCK:
        raise ValueError(f"hungarian_match: backend 'triton' keeps a problem's columns in registers "
                         f"and supports at most {MAX_BLOCK} queries (gts when G > Q), got cost of shape "
                         f"{tuple(cost.shape)}; use backend='cpp' on CPU tensors")
    return torch.ops.rtmdet.hungarian_match_triton(cost, gt_mask)
