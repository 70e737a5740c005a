"""The built-in synthetic dataset: a seeded generator of shape images, written as COCO."""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross")
SYNTHETIC_VERSION = "synthetic-v1"


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
