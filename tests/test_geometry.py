"""Box geometry (SPEC section 1): IoU/GIoU by hand, the distance coder, point priors."""
import pytest
import torch

from rtmdet import ops
from tests.oracle import giou_oracle, iou_oracle


def _iou_giou(a, b):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    return (float(ops.box_iou(a, b)[0, 0]), float(ops.box_iou(a, b, mode="giou")[0, 0]))


# (box a, box b, IoU, GIoU), worked out by hand.
HAND = [
    ("overlapping", [0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - (9 - 7) / 9),
    ("disjoint", [0, 0, 1, 1], [2, 2, 3, 3], 0.0, -(9 - 2) / 9),
    ("touching", [0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),
    ("nested", [0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),
    ("identical", [1, 2, 5, 7], [1, 2, 5, 7], 1.0, 1.0),
    ("half", [0, 0, 4, 2], [0, 0, 2, 2], 0.5, 0.5),
    ("zero-width in box", [1, 0, 1, 2], [0, 0, 2, 2], 0.0, 0.0),
    # union = eps and enclose = eps: 0 / eps and (eps - eps) / eps.
    ("two identical points", [3, 3, 3, 3], [3, 3, 3, 3], 0.0, 0.0),
    # Inverted a: area (-2)(-2) = 4, overlap clamped to 0, union 8, enclose 2 x 2 = 4.
    ("inverted", [2, 2, 0, 0], [0, 0, 2, 2], 0.0, 0 - (4 - 8) / 4),
]


@pytest.mark.parametrize("name,a,b,iou,giou", HAND, ids=[h[0] for h in HAND])
def test_iou_and_giou_by_hand(name, a, b, iou, giou):
    got_iou, got_giou = _iou_giou(a, b)
    assert got_iou == pytest.approx(iou, abs=1e-12)
    assert got_giou == pytest.approx(giou, abs=1e-12)
    a, b = [float(v) for v in a], [float(v) for v in b]
    assert (iou_oracle(a, b), giou_oracle(a, b)) == pytest.approx((iou, giou), abs=1e-12)
    # Symmetric.
    assert _iou_giou(b, a) == pytest.approx((got_iou, got_giou), abs=1e-12)


def test_degenerate_boxes_are_finite_in_float32():
    boxes = torch.tensor([[0, 0, 0, 0], [5, 5, 5, 9], [5, 5, 9, 5], [9, 9, 1, 1], [1e4, 1e4, 1e4, 1e4],
                          [0, 0, 1e4, 1e4], [-3, -3, -1, -1]], dtype=torch.float32)
    for mode in ("iou", "giou"):
        out = ops.box_iou(boxes, boxes, mode=mode)
        assert out.shape == (7, 7) and out.dtype == torch.float32
        assert bool(torch.isfinite(out).all())


def test_eps_floors_the_union():
    a = torch.tensor([[0.0, 0.0, 1e-3, 1e-3]], dtype=torch.float64)  # area 1e-6
    # union 1e-6 exactly: IoU 1; with eps 1e-3 the union is floored to 1e-3: IoU 1e-3.
    assert float(ops.box_iou(a, a)) == pytest.approx(1.0)
    assert float(ops.box_iou(a, a, eps=1e-3)) == pytest.approx(1e-3)


def _random_boxes(gen, *shape):
    xy = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * 50
    wh = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * 30
    return torch.cat([xy, xy + wh], -1)


@pytest.mark.parametrize("mode", ["iou", "giou"])
def test_aligned_is_the_diagonal_of_pairwise(mode):
    gen = torch.Generator().manual_seed(0)
    a, b = _random_boxes(gen, 9), _random_boxes(gen, 9)
    pairwise = ops.box_iou(a, b, mode=mode)
    aligned = ops.box_iou(a, b, mode=mode, aligned=True)
    assert pairwise.shape == (9, 9) and aligned.shape == (9,)
    torch.testing.assert_close(aligned, pairwise.diagonal())
    for i in range(9):
        for j in range(9):
            oracle = giou_oracle if mode == "giou" else iou_oracle
            want = oracle(a[i].tolist(), b[j].tolist())
            assert float(pairwise[i, j]) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_batch_dims_broadcast(aligned):
    gen = torch.Generator().manual_seed(1)
    a = _random_boxes(gen, 2, 1, 5)
    b = _random_boxes(gen, 3, 5 if aligned else 4)
    out = ops.box_iou(a, b, mode="giou", aligned=aligned)
    assert out.shape == ((2, 3, 5) if aligned else (2, 3, 5, 4))
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], ops.box_iou(a[i, 0], b[j], mode="giou", aligned=aligned))


def test_dtype_is_kept():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        out = ops.box_iou(a.to(dtype), a.to(dtype))
        assert out.dtype == dtype and float(out) == 1.0


def test_distance2bbox_by_hand_and_round_trip():
    points = torch.tensor([[10.0, 20.0]])
    box = ops.distance2bbox(points, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert box.tolist() == [[9.0, 18.0, 13.0, 24.0]]
    assert ops.bbox2distance(points, box).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # Priors (x, y, stride_w, stride_h) are accepted as points: the strides are ignored.
    priors = ops.grid_priors([(4, 5), (2, 3)], (8, 16))
    gen = torch.Generator().manual_seed(2)
    dist = torch.rand(2, priors.shape[0], 4, generator=gen) * 100
    boxes = ops.distance2bbox(priors, dist)
    assert boxes.shape == (2, 26, 4)
    assert torch.equal(boxes[..., :2], priors[:, :2] - dist[..., :2])
    assert torch.equal(boxes[..., 2:], priors[:, :2] + dist[..., 2:])
    torch.testing.assert_close(ops.bbox2distance(priors, boxes), dist, rtol=0, atol=1e-4)


def test_grid_priors_640():
    p = ops.grid_priors([(80, 80), (40, 40), (20, 20)])
    assert p.shape == (8400, 4) and p.dtype == torch.float32
    assert p[0].tolist() == [0, 0, 8, 8]
    assert p[1].tolist() == [8, 0, 8, 8]          # row-major: x moves first
    assert p[79].tolist() == [632, 0, 8, 8]
    assert p[80].tolist() == [0, 8, 8, 8]
    assert p[6399].tolist() == [632, 632, 8, 8]
    assert p[6400].tolist() == [0, 0, 16, 16]     # level-major
    assert p[6441].tolist() == [16, 16, 16, 16]
    assert p[8000].tolist() == [0, 0, 32, 32]
    assert p[8399].tolist() == [608, 608, 32, 32]
    assert (p[:6400, 2:] == 8).all() and (p[6400:8000, 2:] == 16).all() and (p[8000:, 2:] == 32).all()


def test_grid_priors_rectangular_offset_and_pairs():
    p = ops.grid_priors([(2, 3)], (8,))
    assert p[:, :2].tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]
    half = ops.grid_priors([(2, 3)], (8,), offset=0.5)
    assert half[0].tolist() == [4, 4, 8, 8] and half[5].tolist() == [20, 12, 8, 8]
    pair = ops.grid_priors([(1, 2)], ((8, 16),), dtype=torch.float64)
    assert pair.dtype == torch.float64
    assert pair.tolist() == [[0, 0, 8, 16], [8, 0, 8, 16]]
    assert ops.grid_priors([], ()).shape == (0, 4)
    with pytest.raises(ValueError, match="strides"):
        ops.grid_priors([(2, 2)], (8, 16))
