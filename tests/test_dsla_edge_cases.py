"""dsl_assign edge cases of issue 15 (integer-like topk, non-differentiable outputs, meta
tensors with the value checks on) and the S0 pass layouts of the Triton kernels (issue 14)."""
import warnings

import pytest
import torch

from rtmdet import ops
from rtmdet.kernels import dsla
from rtmdet.ops import _backend
from tests.assign_compare import assert_matches_reference
from tests.cases import case_args, make_case

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp2")]

SMALL = [(8, 8), (4, 4), (2, 2)]
BACKENDS = ["torch"] + (["cpp"] if "dsl_assign" in _backend.native_ops() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_like_topk(backend):
    np = pytest.importorskip("numpy")
    case = make_case(2, B=2, featmaps=SMALL, G=5, C=4, kind="random", pad="anywhere")
    want = ops.dsl_assign(*case_args(case), topk=7, backend=backend)
    for topk in (np.int64(7), np.int32(7), torch.tensor(7)):
        got = ops.dsl_assign(*case_args(case), topk=topk, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_never_differentiable(backend):
    case = make_case(3, B=2, featmaps=SMALL, G=5, C=4, kind="random")
    args = list(case_args(case))
    args[1] = args[1].clone().requires_grad_()
    args[2] = args[2].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "autograd kernel was not registered"
        out = ops.dsl_assign(*args, backend=backend)
    assert not any(t.requires_grad for t in out)
    assert (out.gt_index >= 0).any()


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_meta_tensors_with_value_checks_on(backend):
    case = make_case(4, B=2, featmaps=SMALL, G=5, C=4, kind="random")
    meta = [t.to("meta") for t in case_args(case)]
    with ops.value_checks(True):
        out = ops.dsl_assign(*meta, backend=backend)
    assert out.gt_index.shape == (2, 84) and out.gt_index.device.type == "meta"
    assert out.ious.dtype == torch.float32


def test_s0_pass_layouts_agree(monkeypatch):
    """The dense S0 pass and the S0 tiles claimed inside the gt pass give the same results,
    on the early-training scene (most priors valid) and the standard one."""
    monkeypatch.setitem(dsla.TUNING, "block_n", 16)
    for kind in ("early", "random"):
        case = make_case(5, B=2, featmaps=SMALL, G=6, C=5, kind=kind, pad="anywhere")
        outs = []
        for mode in ("dense", "claim"):
            monkeypatch.setitem(dsla.TUNING, "s0_mode", mode)
            out = ops.DSLAssignment(*dsla.dsl_assign_triton(*case_args(case)))
            assert_matches_reference(case, out, "mmdet", context=f"{kind} {mode}")
            outs.append(out)
        assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_early_scene_makes_most_priors_valid():
    case = make_case(6, B=2, G=32, C=80, kind="early")
    valid, _, _ = ops.dsl_cost_ref(*case_args(case))
    assert valid.float().mean() > 0.5
    assert abs(float(case["pred_logits"].mean()) + 4.595) < 0.01
