"""Hypothesis fuzzing of ops.hungarian_match: the total cost equals scipy's optimum (1e-5
relative), on small problems with ties, +inf entries, padding and either orientation."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from rtmdet import ops
from rtmdet.ops import _backend

HAS_CPP = "hungarian_match" in _backend.native_ops()
pytestmark = pytest.mark.filterwarnings("ignore:.*fast path.*")


@st.composite
def problems(draw, max_side=8):
    B = draw(st.integers(1, 3))
    Q = draw(st.integers(0, max_side))
    G = draw(st.integers(0, max_side))
    n = B * Q * G
    kind = draw(st.sampled_from(["ints", "floats", "scaled"]))
    if kind == "ints":  # few distinct values: many optimal matchings
        vals = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    elif kind == "floats":
        vals = draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=n, max_size=n))
    else:
        scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]))
        vals = [v * scale for v in draw(st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n))]
    cost = torch.tensor(vals, dtype=torch.float32).reshape(B, Q, G)
    forbid = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if draw(st.booleans()) else [False] * n
    cost = cost.masked_fill(torch.tensor(forbid, dtype=torch.bool).reshape(B, Q, G), float("inf"))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * G, max_size=B * G)),
                        dtype=torch.bool).reshape(B, G)
    return cost, mask


def scipy_or_infeasible(cost, mask):
    """Per image (optimal total, scale, pairs), or None if some image is infeasible."""
    out = []
    for b in range(cost.shape[0]):
        c = cost[b].double().numpy()[:, np.flatnonzero(mask[b].numpy())]
        if c.size == 0:
            out.append((0.0, 0.0, 0))
            continue
        try:
            r, k = linear_sum_assignment(c)
        except ValueError:
            return None
        out.append((c[r, k].sum(), np.abs(c[r, k]).sum(), len(r)))
    return out


def check(cost, mask, backend):
    expect = scipy_or_infeasible(cost, mask)
    if expect is None:
        with pytest.raises(ValueError, match="infeasible"):
            ops.hungarian_match(cost, mask, backend=backend)
        return None
    out = ops.hungarian_match(cost, mask, backend=backend)
    for b, (opt, scale, pairs) in enumerate(expect):
        q = (out[b] >= 0).nonzero()[:, 0]
        g = out[b, q]
        assert len(q) == pairs and len(torch.unique(g)) == len(g) and mask[b, g].all()
        total = cost[b].double()[q, g].sum().item()
        assert abs(total - opt) <= 1e-5 * scale, (backend, b, total, opt)
    return out


@pytest.mark.skipif(not HAS_CPP, reason="rtmdet._C without hungarian_match")
@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_cpp(problem):
    check(*problem, "cpp")


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_side=6))
def test_fuzz_triton_interpreter(problem):
    out = check(*problem, "triton")
    if out is not None and HAS_CPP:
        assert torch.equal(out, ops.hungarian_match(*problem, backend="cpp"))
