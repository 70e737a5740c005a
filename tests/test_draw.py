"""Prediction images with legible labels (issue 15 item 9): size, contrast, no clipping."""
import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import ImageDraw  # noqa: E402

from rtmdet.evaluation import (_PALETTE, _label_font, contrast_ratio, draw_detections,  # noqa: E402
                               label_box, text_colour)

CLASSES = ["circle", "square", "triangle", "star"]


def result(boxes, labels, scores=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9) if scores is None else np.asarray(scores)
    return {"boxes": boxes, "scores": scores, "labels": np.asarray(labels)}


def test_every_palette_colour_has_readable_text():
    for colour in _PALETTE:
        assert contrast_ratio(colour, text_colour(colour)) >= 4.5, colour  # WCAG AA


def test_contrast_ratio_known_values():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((120, 120, 120), (120, 120, 120)) == pytest.approx(1.0)


def test_small_images_are_enlarged_and_text_is_big_enough():
    img = np.zeros((192, 160, 3), np.uint8)
    out = draw_detections(img, result([[10, 40, 90, 120]], [1]), CLASSES)
    assert out.size == (320, 384)  # factor 2: the longer side reaches 384
    font = _label_font(max(out.size))
    box = ImageDraw.Draw(out).textbbox((0, 0), "square 0.90", font=font)
    assert box[3] - box[1] >= 9  # cap height of a >= 12 px font
    big = draw_detections(np.zeros((640, 640, 3), np.uint8), result([[10, 40, 90, 120]], [1]), CLASSES)
    assert big.size == (640, 640)


@pytest.mark.parametrize("box", [[0, 0, 50, 40], [5, -20, 60, 30], [150, 1, 191, 60],
                                 [180, 170, 192, 192], [-30, 100, 10, 140]])
def test_labels_stay_inside_the_image(box):
    W = H = 384
    text = (0, 0, 140, 17)  # wider than a small box
    x1, y1, x2, y2 = label_box(np.asarray(box) * 2, text, (W, H))
    assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
    if box[1] * 2 >= y2 - y1:  # room above: the label sits above the box
        assert y2 == pytest.approx(box[1] * 2)


def drawn_tag(box, label, size=400):
    """Draw one detection on a black image; returns (tag rectangle, image array)."""
    img = np.zeros((size, size, 3), np.uint8)
    out = draw_detections(img, result([box], [label]), CLASSES)
    text = f"{CLASSES[label]} 0.90"
    bbox = ImageDraw.Draw(out).textbbox((0, 0), text, font=_label_font(size))
    return [round(v) for v in label_box(box, bbox, out.size)], np.asarray(out)


@pytest.mark.parametrize("box,label", [([20, 0, 200, 150], 0), ([20, 100, 200, 250], 2),
                                       ([300, 5, 399, 90], 3)])
def test_label_is_a_filled_tag_with_whole_text(box, label):
    (x1, y1, x2, y2), out = drawn_tag(box, label)
    if box[1] < y2 - y1:
        assert y1 == box[1]          # top edge: inside the box, not cut off above the image
    else:
        assert y2 == box[1]          # otherwise just above the box
    fill, ink = np.array(_PALETTE[label]), np.array(text_colour(_PALETTE[label]))
    tag = out[y1:y2, x1:x2].astype(int)
    assert (tag == fill).all(-1).mean() > 0.5
    # glyph pixels (anti-aliased): nearer the text colour than the fill
    text = np.abs(tag - ink).sum(-1) < np.abs(tag - fill).sum(-1)
    rows, cols = np.nonzero(text)
    assert text.sum() > 30 and rows.max() - rows.min() >= 8  # glyphs of a >= 12 px font
    assert rows.min() >= 1 and rows.max() <= y2 - y1 - 2      # not clipped by the tag
    assert cols.min() >= 1 and cols.max() <= x2 - x1 - 2


def test_scores_below_min_score_and_unknown_labels():
    img = np.zeros((400, 400, 3), np.uint8)
    out = np.asarray(draw_detections(img, result([[20, 50, 200, 150]], [0], [0.2]), CLASSES,
                                     min_score=0.3))
    assert not out.any()
    out = np.asarray(draw_detections(img, result([[20, 50, 200, 150]], [7]), CLASSES))
    assert out.any()  # drawn, with the label number as its name
