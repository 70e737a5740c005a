"""Bad datasets: every case either trains correctly with a one-line warning and a count in
`report`, or stops with a DatasetError naming the file and the entry (issue 15)."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from rtmdet import data as D


def _write(tmp_path, images=None, annotations=None, categories=None, raw=None):
    """A dataset folder: images a.png (64x48) and b.png (32x32), and an annotation file."""
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(img / "a.png")
    Image.new("RGB", (32, 32), (200, 0, 0)).save(img / "b.png")
    ann = tmp_path / "ann.json"
    if raw is not None:
        ann.write_text(raw)
        return ann, img
    data = {"images": images if images is not None else
            [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
             {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
            "annotations": annotations if annotations is not None else
            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12]},
             {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}]}
    ann.write_text(json.dumps(data))
    return ann, img


def _ann(i, image_id=1, cat=1, bbox=(2, 3, 10, 12), **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), **kw}


def _error(tmp_path, match, **kw):
    ann, img = _write(tmp_path, **kw)
    with pytest.raises(D.DatasetError, match=match) as e:
        D.CocoDetection(ann, img)
    assert "ann.json" in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_invalid_annotation_files_name_file_and_entry(tmp_path):
    _error(tmp_path, "corrupt annotation file", raw="{not json")
    _error(tmp_path, "not an object", raw="[1, 2]")
    _error(tmp_path, "`categories` is missing", raw=json.dumps({"images": []}))
    _error(tmp_path, "`images` is missing", raw=json.dumps({"categories": [{"id": 1, "name": "x"}]}))
    _error(tmp_path, r"images\[1\] has no file_name", images=[{"id": 1, "file_name": "a.png"}, {"id": 2}])
    _error(tmp_path, r"annotations\[0\] has no bbox", annotations=[{"id": 5, "image_id": 1, "category_id": 1}])
    _error(tmp_path, r"categories\[0\] has no name", categories=[{"id": 1}])
    _error(tmp_path, "no categories", categories=[])
    _error(tmp_path, "non-integer id", images=[{"id": "1", "file_name": "a.png"}])
    for bad in ([1, 2, 3], [1, 2, "x", 4], [1, 2, float("nan"), 4], "1 2 3 4", None):
        msg = _error(tmp_path, r"annotations\[1\] \(id 8\) has bbox", annotations=[_ann(7), {**_ann(8), "bbox": bad}])
        assert "not 4 finite numbers" in msg


def test_duplicate_ids_are_errors(tmp_path):
    imgs = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "b.png"}]
    msg = _error(tmp_path, "duplicate image id 1", images=imgs)
    assert r"images[0] and images[2]" in msg
    _error(tmp_path, "duplicate category id 3",
           categories=[{"id": 3, "name": "x"}, {"id": 3, "name": "y"}])


def test_zero_and_negative_size_boxes_dropped_counted_warned(tmp_path, caplog):
    anns = [_ann(1), _ann(2, bbox=(5, 5, 0, 4)), _ann(3, bbox=(5, 5, -3, 4)), _ann(4, bbox=(5, 5, 4, 0.5))]
    ann, img = _write(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="rtmdet.data"):
        ds = D.CocoDetection(ann, img)
    assert ds.report["too_small"] == 3 and ds.report["annotations"] == 1
    np.testing.assert_array_equal(ds[0].boxes, [[2, 3, 12, 15]])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2      # too small, and image b now has no annotations: one line per kind
    assert any("ann.json: 3 annotations with a box under 1 px" in m and "id 2" in m for m in lines)
    assert all("\n" not in m for m in lines)


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    anns = [_ann(1, bbox=(-4, 40, 20, 20)), _ann(2, bbox=(70, 5, 10, 10)), _ann(3, bbox=(60, 0, 4, 48))]
    ann, img = _write(tmp_path, annotations=anns)
    ds = D.CocoDetection(ann, img)
    assert ds.report["clipped"] == 1 and ds.report["outside"] == 1 and ds.report["annotations"] == 2
    np.testing.assert_array_equal(ds[0].boxes, [[0, 40, 16, 48], [60, 0, 64, 48]])


def test_non_contiguous_and_unknown_categories(tmp_path):
    cats = [{"id": 90, "name": "z"}, {"id": 3, "name": "c"}, {"id": 17, "name": "q"}]
    anns = [_ann(1, cat=90), _ann(2, cat=17), _ann(3, cat=3), _ann(4, cat=5), _ann(5, image_id=99)]
    ann, img = _write(tmp_path, annotations=anns, categories=cats)
    ds = D.CocoDetection(ann, img)
    assert ds.classes == ["c", "q", "z"] and ds.label_to_cat == [3, 17, 90]
    assert ds[0].labels.tolist() == [2, 1, 0]
    assert ds.report["unknown_category"] == 1 and ds.report["unknown_image"] == 1


def test_images_without_annotations_are_negatives(tmp_path):
    ann, img = _write(tmp_path, annotations=[_ann(1)])
    ds = D.CocoDetection(ann, img)
    assert len(ds) == 2 and ds.report["no_annotations"] == 1
    neg = ds[1]
    assert neg.boxes.shape == (0, 4) and neg.labels.shape == (0,)
    train = D.TrainDataset(ds, 32, seed=0)
    batch = D.collate([train[(e, s, 1)] for e in range(3) for s in (True, False)])
    assert batch["images"].shape == (6, 3, 32, 32)
    ann, img = _write(tmp_path, raw=json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                "categories": [{"id": 1, "name": "x"}]}))
    assert D.CocoDetection(ann, img).report["no_annotations"] == 1   # no `annotations` key at all


def test_corrupt_missing_and_wrong_size_images(tmp_path):
    imgs = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
            {"id": 3, "file_name": "gone.png"},
            {"id": 4, "file_name": "broken.jpg"},
            {"id": 5, "file_name": "a.png", "width": 48, "height": 64}]
    ann, img = _write(tmp_path, images=imgs)
    (img / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = D.CocoDetection(ann, img)
    with pytest.raises(D.DatasetError, match=r"gone.png.*image id 3 in .*ann.json"):
        ds[2]
    with pytest.raises(D.DatasetError, match=r"cannot read image .*broken.jpg.*image id 4"):
        ds[3]
    with pytest.raises(D.DatasetError, match=r"a.png is 64x48, but image id 5 .* says 48x64"):
        ds[4]
    for workers in (0, 1):
        problems = D.check_images(D.EvalDataset(ds, 32), workers=workers)
        assert len(problems) == 3
        assert "gone.png" in problems[0] and "broken.jpg" in problems[1] and "48x64" in problems[2]
        assert all("\n" not in p for p in problems)
    (tmp_path / "ok").mkdir()
    ok = D.CocoDetection(*_write(tmp_path / "ok"))
    assert D.check_images(ok) == []


def test_eval_batches_raise_one_clean_error(tmp_path):
    ann, img = _write(tmp_path)
    (img / "b.png").write_bytes(b"garbage")
    ev = D.EvalDataset(D.CocoDetection(ann, img), 32)
    with pytest.raises(D.DatasetError) as e:
        list(D.eval_batches(ev, batch_size=2, workers=1))
    assert "b.png" in str(e.value) and "\n" not in str(e.value) and "worker" not in str(e.value)
    (tmp_path / "ok").mkdir()
    ann, img = _write(tmp_path / "ok")
    batches = list(D.eval_batches(D.EvalDataset(D.CocoDetection(ann, img), 32), batch_size=2, rank=1, world=2))
    assert [b["image_ids"] for b in batches] == [[2]]
