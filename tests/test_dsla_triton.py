"""Fused Triton DSLA (kernels/dsla.py) against the PyTorch reference `dsl_assign_ref`.

CPU: the kernels run under TRITON_INTERPRET (set by conftest.py) on small shapes.
GPU (@pytest.mark.gpu): realistic sizes, torch.compile and CUDA-graph capture.
Differences are allowed only where a tie is decided by float rounding
(tests/assign_compare.py: the reference costs of the two alternatives agree to 1e-6
relative, or a dynamic-k sum is within 2e-5 of an integer).
"""
import pytest
import torch

from rtmdet import ops
from rtmdet.kernels import dsla
from tests.assign_compare import assert_matches_reference
from tests.cases import case_args, make_case

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp2")]

SMALL = [(8, 8), (4, 4), (2, 2)]  # 84 priors: one full and one partial tile of 64
SEMANTICS = ("mmdet", "mmyolo")


def run(case, semantics, **kw):
    return ops.DSLAssignment(*dsla.dsl_assign_triton(*case_args(case), semantics=semantics, **kw))


def check(case, semantics, topk=13):
    out = run(case, semantics, topk=topk)
    assert_matches_reference(case, out, semantics, topk=topk,
                             context=f"{case['kind']} seed {case['seed']} {semantics}")
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the test's G and N, so several tiles per scan, gt blocks in the
    resolve pass and partial tiles all occur at interpreter-sized shapes."""
    monkeypatch.setitem(dsla.TUNING, "block_g", 8)
    monkeypatch.setitem(dsla.TUNING, "block_n", 16)
    monkeypatch.setitem(dsla.TUNING, "tchunk", 2)  # several descriptor chunks
    monkeypatch.setitem(dsla.TUNING, "block_p", 4)


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("kind", ["random", "crowded", "mixed", "far", "duplicate", "tiny",
                                  "zero_width", "border"])
def test_matches_reference(kind, semantics):
    case = make_case(3, B=2, featmaps=SMALL, G=9, C=6, kind=kind, pad="anywhere")
    out = check(case, semantics)
    assert bool((out.gt_index >= 0).any()) or kind == "tiny"


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_many_tiles_and_gt_blocks(small_blocks, semantics):
    # G = 20 > BLOCK_G = 8 (three gt blocks in the resolve pass), N = 84 = 5 tiles + 4.
    for seed in range(2):
        case = make_case(10 + seed, B=2, featmaps=SMALL, G=20, C=7, kind="mixed", pad="anywhere")
        check(case, semantics)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_pruned_and_full_cost_scans_agree(small_blocks, monkeypatch, semantics):
    # The cost scan skips tiles whose centre-cost bound exceeds the k-th kept cost: it must
    # give exactly the full scan's result (one gt of each image far from most priors).
    for kind in ("random", "far", "crowded"):
        case = make_case(5, B=2, featmaps=[(12, 12), (6, 6), (3, 3)], G=9, C=5, kind=kind,
                         pad="end")
        pruned = run(case, semantics)
        monkeypatch.setitem(dsla.TUNING, "prune", False)
        full = run(case, semantics)
        monkeypatch.setitem(dsla.TUNING, "prune", True)
        for a, b in zip(pruned, full):
            assert torch.equal(a, b)
        check(case, semantics)


@pytest.mark.parametrize("G", [0, 1, 7])
def test_gt_counts(G):
    case = make_case(7, B=2, featmaps=SMALL, G=G, C=5, kind="random", pad="none")
    out = check(case, "mmdet")
    if G == 0:
        assert bool((out.gt_index == -1).all()) and bool((out.ious == 0).all())


def test_single_prior_and_odd_n():
    case = make_case(1, B=2, featmaps=[(1, 1)], strides=(8,), G=3, C=4, kind="random")
    case["gt_bboxes"][:, 0] = torch.tensor([-4.0, -4.0, 4.0, 4.0])  # the one prior is inside
    for semantics in SEMANTICS:
        out = check(case, semantics)
        assert out.gt_index.shape == (2, 1) and bool((out.gt_index >= 0).all())
    check(make_case(2, B=1, featmaps=[(3, 5), (2, 3)], strides=(8, 16), G=4, C=3), "mmdet")


def test_padded_gts_and_images_without_valid_priors():
    case = make_case(4, B=2, featmaps=SMALL, G=8, C=5, kind="no_valid", pad="anywhere")
    for semantics in SEMANTICS:
        out = check(case, semantics)
        assert bool((out.gt_index == -1).all())
    case = make_case(4, B=2, featmaps=SMALL, G=8, C=5, kind="no_gt", pad="anywhere")
    assert bool((run(case, "mmdet").gt_index == -1).all())
    # Padding rows that would make every prior valid (kind "random" pads with such boxes too).
    case = make_case(6, B=2, featmaps=SMALL, G=8, C=5, kind="tiny", pad="anywhere")
    case["gt_bboxes"][~case["gt_mask"]] = torch.tensor([0.0, 0.0, 64.0, 64.0])
    case["gt_labels"][~case["gt_mask"]] = 2
    check(case, "mmdet")


def test_infinite_costs_tie_to_lower_prior_index():
    # Tiny gts far from the only big one: their cheapest valid priors have +inf cost.
    case = make_case(8, B=1, featmaps=[(48, 48)], strides=(8,), G=4, C=3, kind="far")
    valid, _, cost = ops.dsl_cost_ref(*case_args(case))
    assert bool(torch.isinf(cost[0][valid[0]]).any())
    check(case, "mmdet")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    case = make_case(9, B=2, featmaps=SMALL, G=6, C=8, kind="mixed", dtype=dtype, pad="end")
    for semantics in SEMANTICS:
        check(case, semantics)


@pytest.mark.parametrize("topk", [1, 5, 16, 20])
def test_topk(topk):
    case = make_case(11, B=1, featmaps=SMALL, G=5, C=4, kind="crowded")
    check(case, "mmdet", topk=topk)


def test_topk_too_large_is_a_clear_error():
    case = make_case(0, B=1, featmaps=[(2, 2)], strides=(8,), G=1, C=2)
    with pytest.raises(ValueError, match="topk must be an int in"):
        dsla.dsl_assign_triton(*case_args(case), topk=dsla.MAX_TOPK + 1)


def test_public_dispatch_uses_triton():
    case = make_case(12, B=2, featmaps=SMALL, G=5, C=4, kind="random")
    out = ops.dsl_assign(*case_args(case), backend="triton")
    direct = run(case, "mmdet")
    for a, b in zip(out, direct):
        assert torch.equal(a, b)


def test_deterministic_and_every_output_written(small_blocks):
    case = make_case(13, B=2, featmaps=SMALL, G=12, C=5, kind="crowded", pad="anywhere")
    first = run(case, "mmdet")
    B, N = first.gt_index.shape
    args = [case[k] for k in ("priors", "pred_bboxes", "pred_logits", "gt_bboxes",
                              "gt_labels", "gt_mask")]
    poisoned = (torch.full((B, N), 12345, dtype=torch.int64),
                torch.full((B, N), -777, dtype=torch.int64),
                torch.full((B, N), float("nan")))
    again = dsla._launch(*args, 13, 3.0, 3.0, False, poisoned)
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # bitwise, and no poison left
    assert bool((first.gt_index >= 0).any())


# ----------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------

def gpu_case(seed, B, G, img=(640, 640), dtype=torch.float32, kind="random", pad="end"):
    return make_case(seed, B=B, img_size=img, G=G, C=80, dtype=dtype, kind=kind, pad=pad,
                     device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("B,G,kind", [(64, 32, "random"), (16, 100, "mixed"),
                                      (8, 500, "crowded"), (16, 500, "random"),
                                      (4, 20, "far"), (8, 40, "duplicate")])
def test_gpu_matches_reference(B, G, kind, semantics):
    check(gpu_case(B * 1000 + G, B, G, kind=kind, pad="anywhere"), semantics)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision(dtype):
    check(gpu_case(1, 32, 32, dtype=dtype), "mmdet")


@pytest.mark.gpu
def test_gpu_large():
    # 2048 x 2048 input (N = 86016) with 4096 gts.
    case = gpu_case(2, 1, 4096, img=(2048, 2048), kind="mixed", pad="none")
    check(case, "mmdet")


@pytest.mark.gpu
def test_gpu_deterministic_and_written():
    case = gpu_case(3, 16, 200, kind="crowded", pad="anywhere")
    first = run(case, "mmdet")
    B, N = first.gt_index.shape
    args = case_args(case)
    poisoned = (torch.full((B, N), 12345, dtype=torch.int64, device="cuda"),
                torch.full((B, N), -777, dtype=torch.int64, device="cuda"),
                torch.full((B, N), float("nan"), device="cuda"))
    again = dsla._launch(*args, 13, 3.0, 3.0, False, poisoned)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    case = gpu_case(4, 8, 30, pad="anywhere")
    eager = run(case, "mmdet")

    @torch.compile(fullgraph=True)
    def f(*args):
        return dsla.dsl_assign_triton(*args, topk=13, semantics="mmdet")

    compiled = f(*case_args(case))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    case = gpu_case(5, 8, 30, pad="anywhere")
    args = [t.clone() for t in case_args(case)]
    other = gpu_case(6, 8, 30, pad="anywhere")
    expected = run(other, "mmdet")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dsla.dsl_assign_triton(*args)  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dsla.dsl_assign_triton(*args)
    for dst, src in zip(args, case_args(other)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(expected, out):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mmyolo", [False, True])
def test_gpu_opcheck(mmyolo):
    case = gpu_case(7, 4, 12, pad="anywhere")
    torch.library.opcheck(torch.ops.rtmdet.dsl_assign_triton.default,
                          (*case_args(case), 13, 3.0, 3.0, mmyolo))
