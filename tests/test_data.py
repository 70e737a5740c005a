"""Datasets, augmentations and collate: boxes must stay consistent with the pixels."""
import json

import numpy as np
import pytest
import torch

from rtmdet import data as D


def _rect_sample(h=120, w=160, box=(30, 20, 70, 90), colour=(255, 255, 255), bg=0):
    img = np.full((h, w, 3), bg, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = colour
    return D.Sample(img, np.asarray([box], np.float32), np.asarray([1]))


def _extent(mask):
    """Pixel-edge bounding box (x1, y1, x2, y2) of the True pixels of (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _bright(img, thr=200):
    return img.min(-1) > thr


def test_synthetic_deterministic(tmp_path):
    a = D.synthetic_image(3, 5)
    b = D.synthetic_image(3, 5)
    c = D.synthetic_image(3, 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    D.write_synthetic_split(tmp_path / "1", "val", 4, seed=2, size=96)
    D.write_synthetic_split(tmp_path / "2", "val", 4, seed=2, size=96)
    j1 = (tmp_path / "1/annotations/instances_val.json").read_text()
    assert j1 == (tmp_path / "2/annotations/instances_val.json").read_text()
    for i in range(4):
        assert (tmp_path / f"1/val/{i:06d}.jpg").read_bytes() == (tmp_path / f"2/val/{i:06d}.jpg").read_bytes()
    # the set is not trivial: several classes, many objects, sizes over a wide range
    boxes, labels = [], []
    for i in range(40):
        _, bx, lab = D.synthetic_image(0, i)
        boxes.append(bx)
        labels.append(lab)
    boxes, labels = np.concatenate(boxes), np.concatenate(labels)
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert len(set(labels.tolist())) == len(D.SYNTHETIC_CLASSES)
    assert len(boxes) > 40 * 5 and side.min() < 8 and side.max() > 60


def test_ensure_synthetic_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTMDET_CACHE", str(tmp_path))
    root = D.ensure_synthetic(num_train=3, num_val=2, size=64)
    assert root == tmp_path / D.SYNTHETIC_VERSION
    mtime = (root / "annotations/instances_train.json").stat().st_mtime_ns
    assert D.ensure_synthetic(num_train=3, num_val=2, size=64) == root
    assert (root / "annotations/instances_train.json").stat().st_mtime_ns == mtime  # reused
    ds = D.CocoDetection(*D.dataset_paths(root, "val"))
    assert len(ds) == 2 and ds.classes == list(D.SYNTHETIC_CLASSES)


def test_synthetic_params_easier_set(tmp_path, monkeypatch):
    # the default settings given explicitly reproduce the built-in set
    for x, y in zip(D.synthetic_image(1, 2), D.synthetic_image(1, 2, params=D.SyntheticParams())):
        np.testing.assert_array_equal(x, y)
    p = dict(min_object=24, max_object=120, size_power=1.0, max_objects=8, num_classes=4, lines=(2, 6))
    boxes, labels, counts = [], [], []
    for i in range(40):
        _, bx, lab = D.synthetic_image(0, i, 192, p)
        boxes.append(bx)
        labels.append(lab)
        counts.append(len(bx))
    boxes, labels = np.concatenate(boxes), np.concatenate(labels)
    wh = boxes[:, 2:] - boxes[:, :2]
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert max(counts) <= 8 and min(counts) >= 1
    assert wh.max() <= 120 * 192 / 320 + 0.01 and np.median(wh.max(1)) > 30
    monkeypatch.setenv("RTMDET_CACHE", str(tmp_path))
    root = D.ensure_synthetic(num_train=2, num_val=1, size=64, params=p)
    assert root.parent == tmp_path and root.name.startswith(D.SYNTHETIC_VERSION + "-")
    assert root == D.synthetic_root(D.SyntheticParams.of(p))
    assert D.synthetic_root() == tmp_path / D.SYNTHETIC_VERSION
    ds = D.CocoDetection(*D.dataset_paths(root, "train"))
    assert ds.classes == ["circle", "square", "triangle", "star"]
    with pytest.raises(ValueError, match="num_classes"):
        D.SyntheticParams(num_classes=7)
    with pytest.raises(ValueError, match="min_object"):
        D.SyntheticParams(min_object=50, max_object=10)


def test_coco_reader_round_trip(tmp_path):
    from PIL import Image
    from rtmdet.evaluation import detections_to_coco
    (tmp_path / "img").mkdir()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / "img/a.png")
    Image.new("RGB", (30, 60)).save(tmp_path / "img/b.png")
    ann = {"images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 50},
                      {"id": 3, "file_name": "b.png", "height": 60, "width": 30}],
           "categories": [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 10, 20], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 2, "bbox": [5, 5, 4, 4], "iscrowd": 0},
                           {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 9, 9], "iscrowd": 1},
                           {"id": 4, "image_id": 3, "category_id": 9, "bbox": [3, 4, 5, 6], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = D.CocoDetection(tmp_path / "ann.json", tmp_path / "img")
    assert ds.classes == ["cat", "dog"] and ds.label_to_cat == [2, 9]
    s = ds[1]   # images sorted by id: id 7 is second
    assert s.meta["image_id"] == 7 and s.image.shape == (40, 50, 3)
    assert (s.image[0, 0] == (1, 2, 3)).all()
    np.testing.assert_allclose(s.boxes, [[1, 2, 11, 22], [5, 5, 9, 9]])   # crowd skipped
    assert s.labels.tolist() == [1, 0]
    coco = detections_to_coco([7], [{"boxes": s.boxes, "scores": np.ones(2), "labels": s.labels}],
                              ds.label_to_cat)
    assert [d["category_id"] for d in coco] == [9, 2]
    assert coco[0]["bbox"] == [1, 2, 10, 20]


def test_reader_errors_name_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(D.DatasetError, match="bad.json"):
        D.CocoDetection(bad, tmp_path / "img")
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(D.DatasetError, match="bad.json"):
        D.CocoDetection(bad, tmp_path / "img")
    with pytest.raises(D.DatasetError, match="missing.json"):
        D.CocoDetection(tmp_path / "missing.json", tmp_path / "img")
    (tmp_path / "img/broken.jpg").write_bytes(b"not an image")
    with pytest.raises(D.DatasetError, match="broken.jpg"):
        D.read_image(tmp_path / "img/broken.jpg")


def test_hflip_resize_crop_pad_keep_boxes_on_pixels():
    s = _rect_sample()
    f = D.hflip(s)
    np.testing.assert_allclose(f.boxes[0], _extent(_bright(f.image)))
    np.testing.assert_allclose(f.boxes[0], [160 - 70, 20, 160 - 30, 90])
    r = D.resize(s, 80, 240)      # x / 2, y * 2
    np.testing.assert_allclose(r.boxes[0], [15, 40, 35, 180])
    np.testing.assert_allclose(r.boxes[0], _extent(r.image.mean(-1) > 127), atol=1)
    k = D.rescale(s, 64, 64)       # keep ratio: 160x120 -> 64x48
    assert k.image.shape == (48, 64, 3)
    np.testing.assert_allclose(k.boxes[0], np.asarray([30, 20, 70, 90]) * 0.4)
    c = D.crop(s, 50, 40, 60, 60)   # partially inside: clipped
    np.testing.assert_allclose(c.boxes[0], [0, 0, 20, 50])
    np.testing.assert_allclose(c.boxes[0], _extent(_bright(c.image)))
    assert len(D.crop(s, 100, 0, 50, 50).boxes) == 0          # outside: dropped
    p = D.pad(s, 200, 150)
    assert p.image.shape == (150, 200, 3) and (p.image[120:, :] == D.PAD_VALUE).all()
    np.testing.assert_array_equal(p.boxes, s.boxes)


def test_random_resize_crop_and_hsv_keep_boxes_on_pixels():
    rng = np.random.default_rng(0)
    for _ in range(10):
        s = D.random_resize(_rect_sample(), rng, 200, (0.5, 2.0))
        s = D.random_crop(s, rng, 100)
        assert s.image.shape[0] <= 100 and s.image.shape[1] <= 100
        if len(s.boxes):
            np.testing.assert_allclose(s.boxes[0], _extent(s.image.mean(-1) > 127), atol=1.5)
    h = D.hsv_jitter(_rect_sample(colour=(200, 60, 60), bg=30), np.random.default_rng(3))
    assert h.image.shape == (120, 160, 3)


def test_mosaic_boxes_follow_their_images():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    samples = [_rect_sample(box=(20 + 5 * k, 10, 60 + 5 * k, 50 + 10 * k), colour=c) for k, c in enumerate(colours)]
    for seed in range(5):
        m = D.mosaic(samples, np.random.default_rng(seed), 80)
        assert m.image.shape == (160, 160, 3)
        visible = [c for c in colours if np.all(np.abs(m.image.astype(int) - c) < 60, -1).any()]
        assert len(m.boxes) == len(visible) >= 2      # rectangles pushed off the canvas are dropped
        for box in m.boxes:
            c = m.image[int(box[1] + box[3]) // 2, int(box[0] + box[2]) // 2].astype(int)
            mask = np.all(np.abs(m.image.astype(int) - c) < 60, -1)
            np.testing.assert_allclose(box, _extent(mask), atol=1.5)


def test_mixup_boxes_follow_the_blended_image():
    base = D.Sample(np.zeros((100, 100, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    other = _rect_sample(h=50, w=80, box=(10, 10, 30, 40))
    for seed in range(5):
        m = D.mixup(base, other, np.random.default_rng(seed), 100)
        assert m.image.shape == (100, 100, 3)
        # other rescaled by 100/80 (exact ratio per axis after rounding) onto a 114-padded canvas, blended 50/50 with black
        assert len(m.boxes) == 1
        np.testing.assert_allclose(m.boxes[0], _extent(m.image.min(-1) > 100), atol=1.5)
        w, h = m.boxes[0, 2] - m.boxes[0, 0], m.boxes[0, 3] - m.boxes[0, 1]
        np.testing.assert_allclose([w, h], [25, 30 * 63 / 50], atol=1e-4)  # 50 px -> round(62.5) = 63


def _coco_dir(tmp_path, n=6, size=96):
    D.write_synthetic_split(tmp_path, "train", n, seed=1, size=size)
    return D.CocoDetection(*D.dataset_paths(tmp_path, "train"))


def test_train_dataset_deterministic_and_sized(tmp_path):
    base = _coco_dir(tmp_path)
    a = D.TrainDataset(base, 64, seed=3)
    b = D.TrainDataset(base, 64, seed=3)
    for strong in (True, False):
        a.set_epoch(2, strong)
        b.set_epoch(2, strong)
        for pos in (0, 5):
            x, y = a[pos], b[pos]
            np.testing.assert_array_equal(x.image, y.image)
            np.testing.assert_array_equal(x.boxes, y.boxes)
            assert x.image.shape == (64, 64, 3)
            assert (x.boxes[:, 2] > x.boxes[:, 0]).all() and (x.boxes[:, :2] >= 0).all()
            assert (x.boxes[:, 2:] <= 64).all()
    a.set_epoch(3, True)
    assert not np.array_equal(a[0].image, b[0].image)


def test_eval_dataset_scale_factor(tmp_path):
    base = _coco_dir(tmp_path, n=2, size=96)
    ev = D.EvalDataset(base, 64)
    s = ev[0]
    assert s.image.shape == (64, 64, 3) and s.meta["scale_factor"] == (64 / 96, 64 / 96)
    np.testing.assert_allclose(s.boxes, base[0].boxes * 64 / 96, rtol=1e-5)


def test_collate_pads_gts_with_mask():
    s1 = _rect_sample(h=32, w=32, box=(1, 2, 3, 4))
    s2 = D.Sample(np.zeros((32, 32, 3), np.uint8), np.asarray([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 3, 3]], np.float32),
                  np.asarray([2, 0, 1]))
    s3 = D.Sample(np.zeros((32, 32, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    b = D.collate([s1, s2, s3])
    assert b["images"].shape == (3, 3, 32, 32) and b["images"].dtype == torch.uint8
    assert b["boxes"].shape == (3, 3, 4) and b["labels"].shape == (3, 3)
    assert b["mask"].tolist() == [[True, False, False], [True, True, True], [False, False, False]]
    assert b["labels"][1].tolist() == [2, 0, 1]
    torch.testing.assert_close(b["boxes"][0, 0], torch.tensor([1.0, 2, 3, 4]))
    assert (b["boxes"][0, 1:] == 0).all()
    assert D.collate([s3])["boxes"].shape == (1, 1, 4)   # G >= 1 even with no gts


def test_position_sampler_shards_and_skips():
    assert list(D.PositionSampler(10, 0, 2, batch_size=2)) == [0, 2, 4, 6]
    assert list(D.PositionSampler(10, 1, 2, batch_size=2)) == [1, 3, 5, 7]
    assert list(D.PositionSampler(10, 0, 1, skip=4, batch_size=4)) == [4, 5, 6, 7]
    assert list(D.PositionSampler(5, 0, 2, drop_last=False)) == [0, 2, 4]
    # 11 positions over 2 ranks: rank 0 holds 6, rank 1 holds 5; both run 2 batches of 2
    assert len(D.PositionSampler(11, 0, 2, batch_size=2)) == len(D.PositionSampler(11, 1, 2, batch_size=2)) == 4


def test_collate_copies_any_image_layout_exactly():
    img = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    views = [img[5:45, 7:57], img[5:45, ::-1][:, :50], np.asfortranarray(img[:40, :50])]
    batch = D.collate([D.Sample(v, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for v in views])
    for got, v in zip(batch["images"], views):
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1))
    with pytest.raises(ValueError, match="one size"):
        D.collate([D.Sample(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
                   D.Sample(img[:10], np.zeros((0, 4), np.float32), np.zeros(0, np.int64))])
