"""COCO instances json + image folder reader (`CocoDetection`), validated at load, and the
dataset folder format.

Invalid entries (bad json, missing keys, duplicate ids, boxes that are not 4 finite numbers,
a decoded image of another size than its entry says) raise `DatasetError` naming the file and
the entry. What is dropped or fixed is counted in `report` and warned about once per kind:
crowd boxes (ignored, as RTMDet does), boxes under 1 px wide or high (incl. zero or negative
size, dropped as mmdetection does), boxes reaching outside the image (clipped to it; dropped if
under 1 px after clipping), annotations of unknown images or categories (dropped). Images
without annotations are kept as negatives (mmdetection's `filter_empty_gt=False`).
"""
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .sample import DatasetError, Sample

log = logging.getLogger(__name__)

# report key -> what the one-line warning says about it; "crowd" is expected, so not warned
DROPPED = {
    "too_small": "annotations with a box under 1 px wide or high (zero or negative size included) dropped",
    "clipped": "boxes reaching outside their image clipped to it",
    "outside": "boxes outside their image (under 1 px after clipping) dropped",
    "unknown_image": "annotations of an image id not in `images` dropped",
    "unknown_category": "annotations of a category id not in `categories` dropped",
    "no_annotations": "images without annotations kept as negatives (no boxes)",
}


def read_image(path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; DatasetError naming the file on failure."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise DatasetError(f"cannot read image {path}: {e}") from None


def _entries(data, key, ann_file, required):
    """data[key] as a list of dicts that have the `required` keys, or DatasetError."""
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DatasetError(f"annotation file {ann_file} is not COCO instances format: "
                           f"`{key}` is missing or not a list")
    for i, e in enumerate(entries):
        missing = [k for k in required if not isinstance(e, dict) or k not in e]
        if missing:
            raise DatasetError(f"{ann_file}: {key}[{i}] has no {', '.join(missing)}: {str(e)[:120]}")
    return entries


def _unique_ids(entries, key, ann_file):
    seen = {}
    for i, e in enumerate(entries):
        if not isinstance(e["id"], int) or isinstance(e["id"], bool):
            raise DatasetError(f"{ann_file}: {key}[{i}] has a non-integer id {e['id']!r}")
        if e["id"] in seen:
            what = {"images": "image", "categories": "category"}[key]
            raise DatasetError(f"{ann_file}: duplicate {what} id {e['id']} "
                               f"({key}[{seen[e['id']]}] and {key}[{i}])")
        seen[e["id"]] = i


def _box(a, i, ann_file):
    """The 4 finite floats of annotation i's bbox, or DatasetError naming the entry."""
    try:
        x, y, w, h = (float(v) for v in a["bbox"])
        if all(math.isfinite(v) for v in (x, y, w, h)):
            return x, y, w, h
    except (TypeError, ValueError):
        pass
    raise DatasetError(f"{ann_file}: annotations[{i}] (id {a.get('id', '?')}) has bbox "
                       f"{str(a['bbox'])[:80]}, not 4 finite numbers [x, y, w, h]")


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances json + image folder, validated at load (see the module docstring).

    `classes[label]` is the category name, `label_to_cat[label]` its COCO id (labels are
    contiguous in [0, C), ids sorted ascending, for evaluation). `report` counts what was
    dropped or fixed (keys of `DROPPED`, "crowd", "images", "annotations"); `warn=False`
    skips the one-line warnings. Item i is a raw `Sample` (no augmentation).
    """

    def __init__(self, ann_file, img_dir, warn=True):
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise DatasetError(f"annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.img_dir}")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"corrupt annotation file {self.ann_file}: {e}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"annotation file {self.ann_file} is not COCO instances format: "
                               f"a {type(data).__name__}, not an object")
        cats = _entries(data, "categories", self.ann_file, ("id", "name"))
        images = _entries(data, "images", self.ann_file, ("id", "file_name"))
        anns = _entries(data, "annotations", self.ann_file, ("image_id", "category_id", "bbox")) \
            if "annotations" in data else []
        _unique_ids(cats, "categories", self.ann_file)
        _unique_ids(images, "images", self.ann_file)
        if not cats:
            raise DatasetError(f"{self.ann_file}: no categories")
        cats = sorted(cats, key=lambda c: c["id"])
        self.classes = [str(c["name"]) for c in cats]
        self.label_to_cat = [int(c["id"]) for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.label_to_cat)}
        self.images = sorted(images, key=lambda im: im["id"])
        self.report = {"images": len(images), "annotations": 0, "crowd": 0, **{k: 0 for k in DROPPED}}
        self._first = {}    # kind -> the first entry it happened to, for the warning
        self._gts = self._read_annotations(anns)
        if warn:
            for kind, what in DROPPED.items():
                if self.report[kind]:
                    log.warning(f"{self.ann_file.name}: {self.report[kind]} {what} "
                                f"(first: {self._first[kind]})")

    def _count(self, kind, entry):
        self.report[kind] += 1
        self._first.setdefault(kind, entry)

    def _read_annotations(self, anns):
        """Per image (in `images` order): (boxes (G, 4) float32 xyxy, labels (G,) int64)."""
        size = {im["id"]: (im.get("width"), im.get("height")) for im in self.images}
        by_image = {im["id"]: ([], []) for im in self.images}
        for i, a in enumerate(anns):
            x, y, w, h = _box(a, i, self.ann_file)
            entry = f"annotations[{i}], id {a.get('id', '?')}"
            if a["image_id"] not in by_image:
                self._count("unknown_image", f"{entry}, image id {a['image_id']!r}")
                continue
            if a["category_id"] not in self.cat_to_label:
                self._count("unknown_category", f"{entry}, category id {a['category_id']!r}")
                continue
            if a.get("iscrowd", 0):
                self.report["crowd"] += 1
                continue
            if w < 1 or h < 1:
                self._count("too_small", f"{entry}, bbox {a['bbox']}")
                continue
            box = [x, y, x + w, y + h]
            iw, ih = size[a["image_id"]]
            if isinstance(iw, (int, float)) and isinstance(ih, (int, float)) and iw > 0 and ih > 0:
                clipped = [min(max(box[0], 0), iw), min(max(box[1], 0), ih),
                           min(max(box[2], 0), iw), min(max(box[3], 0), ih)]
                if clipped != box:
                    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
                        self._count("outside", f"{entry}, bbox {a['bbox']} in {iw}x{ih}")
                        continue
                    self._count("clipped", f"{entry}, bbox {a['bbox']} in {iw}x{ih}")
                    box = clipped
            by_image[a["image_id"]][0].append(box)
            by_image[a["image_id"]][1].append(self.cat_to_label[a["category_id"]])
            self.report["annotations"] += 1
        for im in self.images:
            if not by_image[im["id"]][0]:
                self._count("no_annotations", f"image id {im['id']}, {im['file_name']}")
        return [(np.asarray(by_image[im["id"]][0], np.float32).reshape(-1, 4),
                 np.asarray(by_image[im["id"]][1], np.int64)) for im in self.images]

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.images)

    def image_path(self, i):
        return self.img_dir / self.images[i]["file_name"]

    def entry(self, i):
        """Where image i comes from, for error messages."""
        return f"image id {self.images[i]['id']} in {self.ann_file}"

    def load_image(self, i):
        """Decode image i and check its size against its entry; DatasetError naming both."""
        try:
            image = read_image(self.image_path(i))
        except DatasetError as e:
            raise DatasetError(f"{e} ({self.entry(i)})") from None
        want = (self.images[i].get("height"), self.images[i].get("width"))
        if all(isinstance(v, int) and v > 0 for v in want) and image.shape[:2] != want:
            raise DatasetError(f"image {self.image_path(i)} is {image.shape[1]}x{image.shape[0]}, but "
                               f"{self.entry(i)} says {want[1]}x{want[0]}")
        return image

    def __getitem__(self, i) -> Sample:
        image = self.load_image(i)
        boxes, labels = self._gts[i]
        return Sample(image, boxes.copy(), labels.copy(),
                      {"image_id": self.images[i]["id"], "ori_size": image.shape[:2]})


def dataset_paths(data, split):
    """(ann_file, img_dir) of `split` in the documented folder format."""
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root}")
    return root / "annotations" / f"instances_{split}.json", root / split
