"""Datasets, augmentations and collate for RTMDet training (numpy + PIL, no cv2).

Dataset folder format (`--data PATH`)::

    PATH/annotations/instances_train.json   COCO instances json
    PATH/annotations/instances_val.json
    PATH/train/...                          images, `file_name` relative to this folder
    PATH/val/...

Images are RGB uint8 arrays (H, W, 3); boxes are float32 (G, 4) xyxy in image pixels;
labels are int64 (G,) contiguous in [0, C) (COCO category ids sorted ascending).

The built-in synthetic set (`--data synthetic`) is generated once from a fixed seed into
`$RTMDET_CACHE` (default `~/.cache/rtmdet`)/synthetic-v1, in the same folder format (a
preset's easier variant, `SyntheticParams`, into synthetic-v1-<hash of its settings>).
Its images are generated at a native size of 320 px with objects of about 4 to 100 px:
RTMDet's 8 to 200 px on a 640 image, at half scale.

Training augmentation follows RTMDet (SPEC section 5). Stage 1: Mosaic -> random resize
(scale 2S, ratio range) -> random crop S -> HSV jitter -> flip 0.5 -> pad S with 114 ->
MixUp (prob 0.5). Stage 2 (last `stage2` epochs): random resize (scale S) -> random crop
-> HSV -> flip -> pad. The Mosaic/MixUp image caches are emulated without state: the
cache of the sample at position p of an epoch's permutation holds the images at positions
p-K+1..p (wrapping), i.e. the K most recently loaded images, as upstream's FIFO caches do
(random_pop=False). Every random draw of a sample comes from a generator seeded by
(seed, epoch, position), so a run is reproducible for any worker count and resumes exactly.
One deviation: upstream's MixUp partner is a cached *augmented* (mosaic) result; ours is
a raw cached image (the partner is then resized, flipped and cropped as upstream does).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

PAD_VALUE = 114
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross")
SYNTHETIC_VERSION = "synthetic-v1"


@dataclass
class Sample:
    """One image and its gts: image (H, W, 3) uint8 RGB, boxes (G, 4) float32 xyxy, labels (G,)."""
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def copy(self):
        return Sample(self.image.copy(), self.boxes.copy(), self.labels.copy(), dict(self.meta))


# ----------------------------------------------------------------------------- COCO reader

class DatasetError(ValueError):
    """A dataset file is missing, corrupt or unreadable; the message names the file."""


def read_image(path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; DatasetError naming the file on failure."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise DatasetError(f"cannot read image {path}: {e}") from None


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances json + image folder. Crowd boxes and boxes of zero size are skipped.

    `classes[label]` is the category name, `label_to_cat[label]` its COCO id (for evaluation).
    Item i is a raw `Sample` (no augmentation).
    """

    def __init__(self, ann_file, img_dir):
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise DatasetError(f"annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.img_dir}")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
            cats = sorted(data["categories"], key=lambda c: c["id"])
            images = sorted(data["images"], key=lambda im: im["id"])
            anns = data.get("annotations", [])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"corrupt annotation file {self.ann_file}: {e}") from None
        except (KeyError, TypeError) as e:
            raise DatasetError(f"annotation file {self.ann_file} is not COCO instances format: "
                               f"missing or bad key {e}") from None
        self.classes = [c["name"] for c in cats]
        self.label_to_cat = [int(c["id"]) for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.label_to_cat)}
        self.images = images
        by_image = {im["id"]: ([], []) for im in images}
        for a in anns:
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                img_id, label = a["image_id"], self.cat_to_label[a["category_id"]]
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"bad annotation {a.get('id', '?')} in {self.ann_file}: {e!r}") from None
            if a.get("iscrowd", 0) or w < 1 or h < 1 or img_id not in by_image:
                continue
            by_image[img_id][0].append([x, y, x + w, y + h])
            by_image[img_id][1].append(label)
        self._gts = [(np.asarray(by_image[im["id"]][0], np.float32).reshape(-1, 4),
                      np.asarray(by_image[im["id"]][1], np.int64)) for im in images]

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.images)

    def image_path(self, i):
        return self.img_dir / self.images[i]["file_name"]

    def __getitem__(self, i) -> Sample:
        image = read_image(self.image_path(i))
        boxes, labels = self._gts[i]
        return Sample(image, boxes.copy(), labels.copy(),
                      {"image_id": self.images[i]["id"], "ori_size": image.shape[:2]})


def dataset_paths(data, split):
    """(ann_file, img_dir) of `split` in the documented folder format."""
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root}")
    return root / "annotations" / f"instances_{split}.json", root / split


# ------------------------------------------------------------------------ synthetic dataset

def default_cache_dir():
    return Path(os.environ.get("RTMDET_CACHE", Path.home() / ".cache" / "rtmdet"))


def _shape_polygon(kind, cx, cy, r, angle):
    """Vertices of a rotated polygon shape (square, triangle, star, cross) of radius r."""
    if kind == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2))
               for k in range(4)]
    elif kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(angle + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + k * math.pi / 5)) for k in range(10)]
    elif kind == "cross":
        a, b = 1.0, 0.33
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    else:
        raise ValueError(kind)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _random_colour(rng, avoid):
    """A random RGB colour at least some distance from `avoid` (the local background)."""
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - avoid).sum() > 120:
            break
    return tuple(int(v) for v in c)


@dataclass(frozen=True)
class SyntheticParams:
    """Generator settings of the synthetic set. Sizes are in pixels of a 320 px image and
    scale with the native size. The defaults are the full built-in set; presets may pass
    an easier one (fewer, larger objects, fewer classes) as a dict of these fields."""
    min_object: float = 4.0       # object extent (diameter) range
    max_object: float = 100.0
    size_power: float = 1.5       # extent = min + (max - min) * u ** power: > 1 skews small
    max_objects: int = 20         # 1..max_objects placement attempts per image
    num_classes: int = 6          # the first N of SYNTHETIC_CLASSES
    lines: tuple = (3, 12)        # distractor lines per image: [lo, hi)

    def __post_init__(self):
        # canonical types, so that equal settings name the same cache folder (24 vs 24.0)
        for name, kind in (("min_object", float), ("max_object", float), ("size_power", float),
                           ("max_objects", int), ("num_classes", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "lines", tuple(int(v) for v in self.lines))
        if not 1 <= self.num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {self.num_classes}")
        if not 0 < self.min_object <= self.max_object:
            raise ValueError(f"need 0 < min_object <= max_object, got {self.min_object}, {self.max_object}")
        if self.max_objects < 1 or len(self.lines) != 2 or not 0 <= self.lines[0] < self.lines[1]:
            raise ValueError(f"bad max_objects {self.max_objects} or lines {self.lines}")

    @classmethod
    def of(cls, params):
        """None (defaults), a dict of fields, or a SyntheticParams."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        return cls(**params)

    @property
    def classes(self):
        return SYNTHETIC_CLASSES[:self.num_classes]


def synthetic_image(seed, index, size=320, params=None):
    """Generate synthetic image `index` from `seed`: (image (S, S, 3) uint8, boxes, labels).

    Defaults (`SyntheticParams()`): 1 to 20 shapes of 6 classes, sizes 4..100 px (a skewed
    distribution, ~40% below 32 px), random colours and rotations, drawn in order so later
    shapes occlude earlier ones (a shape that would hide more than half of an earlier box is
    not placed), on a textured, noisy background with distractor lines.
    """
    p = SyntheticParams.of(params)
    rng = np.random.default_rng([seed, index])
    s = size
    # background: low-frequency colour field + strokes + pixel noise
    low = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    bg = Image.fromarray(low).resize((s, s), Image.BICUBIC)
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(*p.lines))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, s, 4))
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    scale = s / 320.0
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, p.max_objects + 1))):
        extent = p.min_object + (p.max_object - p.min_object) * rng.random() ** p.size_power
        r = extent * scale / 2
        cx, cy = rng.uniform(r * 0.5, s - r * 0.5, 2)
        label = int(rng.integers(p.num_classes))
        kind = SYNTHETIC_CLASSES[label]
        angle = rng.uniform(0, 2 * math.pi)
        pts = None
        if kind in ("circle", "ring"):
            box = [cx - r, cy - r, cx + r, cy + r]
        else:
            pts = _shape_polygon(kind, cx, cy, r, angle)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [min(xs), min(ys), max(xs), max(ys)]
        box = [min(max(box[0], 0), s), min(max(box[1], 0), s), min(max(box[2], 0), s), min(max(box[3], 0), s)]
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        if boxes and _covers_earlier(np.asarray(box), np.asarray(boxes)):
            continue
        local = np.asarray(bg.getpixel((int(min(cx, s - 1)), int(min(cy, s - 1)))))
        colour = _random_colour(rng, local)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r * 0.35)))
        else:
            draw.polygon(pts, fill=colour)
        boxes.append(box)
        labels.append(label)
    img = bg.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 8, (s, s, 3)).astype(np.int16)
    return (np.clip(arr, 0, 255).astype(np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64))


def _covers_earlier(box, boxes):
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return bool((ix * iy > 0.5 * area).any())


def write_synthetic_split(root, split, num_images, seed=0, size=320, params=None):
    """Write `num_images` synthetic images of `split` (JPEG) and their COCO json under root."""
    params = SyntheticParams.of(params)
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    split_seed = seed * 1000 + {"train": 1, "val": 2}.get(split, 3)
    images, anns = [], []
    for i in range(num_images):
        image, boxes, labels = synthetic_image(split_seed, i, size, params)
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(root / split / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for b, lab in zip(boxes.tolist(), labels.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": lab + 1,
                         "bbox": [round(v, 2) for v in (b[0], b[1], w, h)], "area": round(w * h, 2),
                         "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(params.classes)]
    tmp = root / "annotations" / f"instances_{split}.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    os.replace(tmp, root / "annotations" / f"instances_{split}.json")


def synthetic_root(params=None):
    """Cache folder of the synthetic set: `synthetic-v1` for the default generator settings,
    else a folder named by them (so a preset's easier set and the full set do not overwrite
    each other; a different size or count regenerates in place)."""
    params = SyntheticParams.of(params)
    name = SYNTHETIC_VERSION
    if params != SyntheticParams():
        key = json.dumps([getattr(params, f) for f in params.__dataclass_fields__])
        name += "-" + hashlib.sha1(key.encode()).hexdigest()[:10]
    return default_cache_dir() / name


def ensure_synthetic(root=None, num_train=2000, num_val=200, seed=0, size=320, params=None):
    """Generate the built-in dataset into `root` (default `synthetic_root(params, size)`)
    unless an identical one is already there."""
    params = SyntheticParams.of(params)
    root = Path(root) if root is not None else synthetic_root(params)
    want = {"version": SYNTHETIC_VERSION, "num_train": num_train, "num_val": num_val,
            "seed": seed, "size": size}
    if params != SyntheticParams():
        want["params"] = json.loads(json.dumps(params.__dict__))
    meta = root / "meta.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text()) == want:
                return root
        except json.JSONDecodeError:
            pass
    write_synthetic_split(root, "train", num_train, seed, size, params)
    write_synthetic_split(root, "val", num_val, seed, size, params)
    meta.write_text(json.dumps(want))
    return root


# ---------------------------------------------------------------------------- augmentations

def _resize_image(image, new_w, new_h):
    if (new_w, new_h) == (image.shape[1], image.shape[0]):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def resize(sample, new_w, new_h):
    """Resize to (new_w, new_h); boxes scale by the exact ratios new/old."""
    h, w = sample.image.shape[:2]
    sx, sy = new_w / w, new_h / h
    return Sample(_resize_image(sample.image, new_w, new_h),
                  sample.boxes * np.asarray([sx, sy, sx, sy], np.float32), sample.labels, sample.meta)


def rescale(sample, scale_w, scale_h):
    """Resize keeping the aspect ratio, as large as fits inside (scale_w, scale_h)."""
    h, w = sample.image.shape[:2]
    ratio = min(scale_w / w, scale_h / h)
    return resize(sample, max(1, int(w * ratio + 0.5)), max(1, int(h * ratio + 0.5)))


def random_resize(sample, rng, scale, ratio_range):
    """RandomResize(keep_ratio): fit inside scale * r, r ~ U(ratio_range)."""
    r = rng.uniform(*ratio_range)
    return rescale(sample, scale * r, scale * r)


def _clip_filter(boxes, labels, w, h):
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def crop(sample, x0, y0, cw, ch):
    """Crop the window [x0, x0+cw) x [y0, y0+ch); boxes are shifted, clipped, empty ones dropped."""
    h, w = sample.image.shape[:2]
    x1, y1 = min(x0 + cw, w), min(y0 + ch, h)
    boxes = sample.boxes - np.asarray([x0, y0, x0, y0], np.float32)
    boxes, labels = _clip_filter(boxes, sample.labels, x1 - x0, y1 - y0)
    return Sample(sample.image[y0:y1, x0:x1], boxes, labels, sample.meta)


def random_crop(sample, rng, size, tries=10):
    """RandomCrop(size): a random window; retried while gts exist but none survive."""
    h, w = sample.image.shape[:2]
    for _ in range(tries):
        x0 = int(rng.integers(0, max(w - size, 0) + 1))
        y0 = int(rng.integers(0, max(h - size, 0) + 1))
        out = crop(sample, x0, y0, size, size)
        if len(out.boxes) or not len(sample.boxes):
            break
    return out


def hflip(sample):
    """Horizontal flip: x1' = W - x2, x2' = W - x1."""
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
    return Sample(np.ascontiguousarray(sample.image[:, ::-1]), boxes, sample.labels, sample.meta)


def hsv_jitter(sample, rng, hue_delta=5, saturation_delta=30, value_delta=30):
    """YOLOX HSV augmentation: each of H, S, V gets an offset U(-d, d) with probability 1/2.

    Hue deltas are in OpenCV units (0..180), converted to PIL's 0..255 hue range.
    """
    gains = rng.uniform(-1, 1, 3) * np.asarray([hue_delta, saturation_delta, value_delta]) \
        * rng.integers(0, 2, 3)
    if not gains.any():
        return sample
    hsv = np.asarray(Image.fromarray(sample.image).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(gains[0] * 256 / 180))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(gains[1]), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + int(gains[2]), 0, 255)
    image = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    return Sample(image, sample.boxes, sample.labels, sample.meta)


def pad(sample, size_w, size_h, value=PAD_VALUE):
    """Pad bottom/right to at least (size_w, size_h) with `value`; boxes unchanged."""
    h, w = sample.image.shape[:2]
    if h >= size_h and w >= size_w:
        return sample
    out = np.full((max(h, size_h), max(w, size_w), 3), value, np.uint8)
    out[:h, :w] = sample.image
    return Sample(out, sample.boxes, sample.labels, sample.meta)


def mosaic(samples, rng, img_scale, pad_value=PAD_VALUE):
    """Mosaic of 4 samples on a (2S, 2S) canvas around a centre drawn from U(0.5S, 1.5S).

    Each sample is rescaled to fit (S, S); samples go top-left, top-right, bottom-left,
    bottom-right of the centre; boxes are shifted, clipped to the canvas, empty ones dropped.
    """
    s = img_scale
    canvas = np.full((2 * s, 2 * s, 3), pad_value, np.uint8)
    cx, cy = int(rng.uniform(0.5, 1.5) * s), int(rng.uniform(0.5, 1.5) * s)
    all_boxes, all_labels = [], []
    for k, smp in enumerate(samples):
        smp = rescale(smp, s, s)
        h, w = smp.image.shape[:2]
        # (x0, y0) of the pasted image on the canvas, then clipped to the canvas
        x0 = cx - w if k in (0, 2) else cx
        y0 = cy - h if k in (0, 1) else cy
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, 2 * s), min(y0 + h, 2 * s)
        canvas[cy0:cy1, cx0:cx1] = smp.image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        all_boxes.append(smp.boxes + np.asarray([x0, y0, x0, y0], np.float32))
        all_labels.append(smp.labels)
        # boxes outside their own pasted region are clipped by the canvas only (as upstream)
    boxes, labels = _clip_filter(np.concatenate(all_boxes), np.concatenate(all_labels), 2 * s, 2 * s)
    return Sample(canvas, boxes, labels, samples[0].meta)


def mixup(sample, other, rng, img_scale, flip_prob=0.5, pad_value=PAD_VALUE,
          min_wh=2.0, area_ratio=0.1):
    """MixUp: `other` rescaled to fit (S, S) on a padded canvas, maybe flipped, randomly
    cropped to `sample`'s size and blended 50/50; its boxes follow (those shrunk below
    `min_wh` px or `area_ratio` of their size by the crop are dropped)."""
    h, w = sample.image.shape[:2]
    o = rescale(other, img_scale, img_scale)
    o = pad(o, img_scale, img_scale, pad_value)
    if rng.uniform() < flip_prob:
        o = hflip(o)
    o = pad(o, w, h, pad_value)
    oh, ow = o.image.shape[:2]
    x0 = int(rng.integers(0, ow - w + 1))
    y0 = int(rng.integers(0, oh - h + 1))
    shifted = o.boxes - np.asarray([x0, y0, x0, y0], np.float32)
    clipped = shifted.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, h)
    cw, chh = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area0 = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    keep = (cw > min_wh) & (chh > min_wh) & (cw * chh > area_ratio * area0)
    patch = o.image[y0:y0 + h, x0:x0 + w]
    image = ((sample.image.astype(np.float32) + patch.astype(np.float32)) * 0.5).astype(np.uint8)
    return Sample(image, np.concatenate([sample.boxes, clipped[keep]]),
                  np.concatenate([sample.labels, o.labels[keep]]), sample.meta)


@dataclass
class AugmentConfig:
    """Augmentation strength. Defaults: RTMDet-tiny/s (SPEC section 5)."""
    mosaic_cache: int = 20          # images in the Mosaic cache (40 for m/l/x)
    mixup_cache: int = 10           # images in the MixUp cache (20 for m/l/x)
    mixup_prob: float = 0.5
    mosaic_prob: float = 1.0
    ratio_range: tuple = (0.5, 2.0)          # stage-1 random resize (0.1-2.0 for m/l/x)
    stage2_ratio_range: tuple = (0.5, 2.0)   # stage-2 random resize
    hsv: bool = True
    flip_prob: float = 0.5

    @classmethod
    def for_model(cls, size):
        if size in ("tiny", "s"):
            return cls()
        return cls(mosaic_cache=40, mixup_cache=20, ratio_range=(0.1, 2.0), stage2_ratio_range=(0.1, 2.0))


# ------------------------------------------------------------------------- train/val sets

class TrainDataset(torch.utils.data.Dataset):
    """Augmented training view of a `CocoDetection`. Index = position in the epoch order.

    Call `set_epoch(epoch, strong)` before iterating an epoch (before the DataLoader
    creates its workers): it fixes the permutation (seeded by seed and epoch) and whether
    this epoch uses stage 1 (Mosaic + MixUp, strong=True) or stage 2.
    """

    def __init__(self, base, img_size, aug=None, seed=0):
        self.base, self.img_size, self.seed = base, int(img_size), int(seed)
        self.aug = aug or AugmentConfig()
        self.set_epoch(0, True)

    def set_epoch(self, epoch, strong):
        self.epoch, self.strong = int(epoch), bool(strong)
        self.order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(self.base))

    def __len__(self):
        return len(self.base)

    def _cached(self, pos, k, rng):
        """A random image from the k most recent ones (positions pos-k+1..pos, wrapping)."""
        back = int(rng.integers(0, min(k, len(self.order))))
        return self.base[int(self.order[(pos - back) % len(self.order)])]

    def __getitem__(self, pos):
        s, a = self.img_size, self.aug
        rng = np.random.default_rng([self.seed, self.epoch, int(pos)])
        smp = self.base[int(self.order[pos])]
        meta = smp.meta
        if self.strong:
            if rng.uniform() < a.mosaic_prob:
                smp = mosaic([smp] + [self._cached(pos, a.mosaic_cache, rng) for _ in range(3)], rng, s)
            smp = random_resize(smp, rng, 2 * s, a.ratio_range)
        else:
            smp = random_resize(smp, rng, s, a.stage2_ratio_range)
        smp = random_crop(smp, rng, s)
        if a.hsv:
            smp = hsv_jitter(smp, rng)
        if rng.uniform() < a.flip_prob:
            smp = hflip(smp)
        smp = pad(smp, s, s)
        if self.strong and rng.uniform() < a.mixup_prob:
            smp = mixup(smp, self._cached(pos, a.mixup_cache, rng), rng, s)
        smp.meta = dict(meta, scale_factor=(1.0, 1.0))
        return smp


class EvalDataset(torch.utils.data.Dataset):
    """Test-time view: resize keeping ratio to fit (S, S), pad bottom/right to S with 114."""

    def __init__(self, base, img_size):
        self.base, self.img_size = base, int(img_size)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        raw = self.base[i]
        h, w = raw.image.shape[:2]
        smp = pad(rescale(raw, self.img_size, self.img_size), self.img_size, self.img_size)
        nh, nw = rescale_size(h, w, self.img_size)
        smp.meta = dict(raw.meta, scale_factor=(nw / w, nh / h), ori_size=(h, w))
        return smp


def rescale_size(h, w, size):
    ratio = min(size / w, size / h)
    return max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))


class PositionSampler(torch.utils.data.Sampler):
    """Positions rank, rank + world, ... of an epoch (only whole batches when `drop_last`),
    skipping the first `skip` of them (resume inside an epoch)."""

    def __init__(self, n, rank=0, world=1, skip=0, batch_size=1, drop_last=True):
        positions = list(range(rank, n, world))
        if drop_last:   # the same number of full batches on every rank (DDP steps together)
            positions = positions[:(n // world) // batch_size * batch_size]
        self.positions = positions[skip:]

    def __iter__(self):
        return iter(self.positions)

    def __len__(self):
        return len(self.positions)


def collate(samples):
    """Stack samples of equal size: images (B, 3, H, W) uint8 and gts padded to G_max.

    Returns {"images", "boxes" (B, G, 4) float32, "labels" (B, G) int64, "mask" (B, G) bool,
    "scale_factors" (B, 2) float32 (sx, sy), "image_ids" list, "ori_sizes" list of (h, w)}.
    G = max(1, most gts in the batch): padded rows have mask False.
    """
    b = len(samples)
    g = max(1, max(len(s.boxes) for s in samples))
    boxes = torch.zeros(b, g, 4)
    labels = torch.zeros(b, g, dtype=torch.int64)
    mask = torch.zeros(b, g, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.boxes)
        boxes[i, :n] = torch.from_numpy(np.ascontiguousarray(s.boxes, np.float32))
        labels[i, :n] = torch.from_numpy(np.asarray(s.labels, np.int64))
        mask[i, :n] = True
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "boxes": boxes, "labels": labels, "mask": mask,
            "scale_factors": torch.tensor([s.meta.get("scale_factor", (1.0, 1.0)) for s in samples],
                                          dtype=torch.float32),
            "image_ids": [s.meta.get("image_id") for s in samples],
            "ori_sizes": [tuple(s.meta.get("ori_size", s.image.shape[:2])) for s in samples]}
