"""COCO box evaluation: a thin wrapper over pycocotools `COCOeval`."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np

METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
                "bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l")


def detections_to_coco(image_ids, results, label_to_cat):
    """Per-image predictions -> COCO result dicts.

    results: list of {"boxes" (K, 4) xyxy in original pixels, "scores" (K,), "labels" (K,)}
    (tensors or arrays); label_to_cat[label] is the COCO category id.
    """
    out = []
    for img_id, r in zip(image_ids, results):
        boxes = np.asarray(_numpy(r["boxes"]), np.float64).reshape(-1, 4)
        scores = np.asarray(_numpy(r["scores"]), np.float64).reshape(-1)
        labels = np.asarray(_numpy(r["labels"])).reshape(-1)
        for b, s, lab in zip(boxes, scores, labels):
            out.append({"image_id": int(img_id), "category_id": int(label_to_cat[int(lab)]),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(s)})
    return out


def _numpy(x):
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def coco_evaluate(ann_file, detections, out_dir=None, verbose=True, max_dets=100):
    """Run COCOeval (bbox) of `detections` (COCO result dicts) against `ann_file`.

    Prints the standard 12-number table when verbose; writes `metrics.json` (and
    `detections.json`) to out_dir when given. Returns {name: value} for METRIC_NAMES.
    No detections at all gives zeros (COCOeval cannot load an empty result list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "detections.json", "w") as f:   # before loadRes adds its own keys
            json.dump(detections, f)
    if detections:
        detections = [dict(d) for d in detections]
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            dt = gt.loadRes(detections)
            ev = COCOeval(gt, dt, "bbox")
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            ev.summarize()
        if verbose:
            print(table.getvalue(), end="")
        stats = [max(float(v), 0.0) for v in ev.stats]  # -1 (no gts in an area range) -> 0
    else:
        if verbose:
            print("no detections: every metric is 0")
        stats = [0.0] * len(METRIC_NAMES)
    metrics = dict(zip(METRIC_NAMES, stats))
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_detections(image, result, classes, min_score=0.0, min_side=384):
    """Draw boxes, class names and scores on an RGB image array (H, W, 3); returns a PIL image.

    result: {"boxes" (K, 4) xyxy in this image's pixels, "scores" (K,), "labels" (K,)}.
    Images smaller than `min_side` are enlarged by an integer factor first (nearest neighbour)
    so that labels stay readable; each label is a filled tag in the box's colour with black or
    white text, whichever contrasts more, above the box or inside it where the box touches
    the top edge, and shifted to stay inside the image.
    """
    from PIL import Image, ImageDraw
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    factor = max(1, -(-min_side // max(img.size)))  # ceil: a 192-px image is drawn at 384 px
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    font = _label_font(max(img.size))
    line = max(2, round(max(img.size) / 320))
    boxes = np.asarray(_numpy(result["boxes"]), np.float64).reshape(-1, 4) * factor
    scores = np.asarray(_numpy(result["scores"])).reshape(-1)
    labels = np.asarray(_numpy(result["labels"])).reshape(-1).astype(int)
    for b, s, lab in zip(boxes, scores, labels):
        if s < min_score:
            continue
        colour = _PALETTE[lab % len(_PALETTE)]
        draw.rectangle([float(v) for v in b], outline=colour, width=line)
        name = classes[lab] if 0 <= lab < len(classes) else str(lab)
        text = f"{name} {s:.2f}"
        tag = label_box(b, draw.textbbox((0, 0), text, font=font), img.size)
        draw.rectangle(tag, fill=colour)
        draw.text((tag[0] + _PAD, tag[1] + _PAD), text, font=font, fill=text_colour(colour),
                  anchor="la")
    return img


_PAD = 2  # pixels between a label's text and the edge of its tag


def _label_font(side):
    """A font whose size follows the drawn image: 12 px at 384 px, 17 at 640, 34 at 1280."""
    from PIL import ImageFont
    size = max(12, round(side / 38))
    try:
        return ImageFont.load_default(size=size)   # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def label_box(box, text_bbox, image_size):
    """(x1, y1, x2, y2) of the tag behind a label: above `box`'s top-left corner, or inside
    the box when there is no room above (top edge), moved left/up to stay in the image."""
    W, H = image_size
    w = text_bbox[2] - text_bbox[0] + 2 * _PAD
    h = text_bbox[3] + 2 * _PAD  # from the text's top (anchor "la"), descenders included
    x1 = min(max(float(box[0]), 0.0), max(W - w, 0.0))
    y1 = float(box[1]) - h
    if y1 < 0:
        y1 = max(float(box[1]), 0.0)
    y1 = min(y1, max(H - h, 0.0))
    return (x1, y1, x1 + w, y1 + h)


def text_colour(fill):
    """Black or white text, whichever has the higher WCAG contrast ratio with `fill` (RGB)."""
    return (0, 0, 0) if contrast_ratio(fill, (0, 0, 0)) >= contrast_ratio(fill, (255, 255, 255)) \
        else (255, 255, 255)


def contrast_ratio(a, b):
    """WCAG 2 contrast ratio of two RGB colours (1 to 21)."""
    def luminance(rgb):
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)
