"""Augmentations on `Sample`s: resize, crop, flip, HSV, pad, Mosaic, MixUp.

Boxes are float32 (G, 4) xyxy in pixels and always follow the pixels. Two backends give the
resampling and colour conversion (every random draw is the same in both):

- "pil": PIL's antialiased bilinear resize and its HSV (hue 0..255): bitwise the outputs of
  the original implementation (tests/test_data_reference.py).
- "cv2": OpenCV's bilinear resize (cv2.INTER_LINEAR, no antialiasing) and HSV (hue 0..180),
  what mmdetection's RTMDet pipeline uses; 3-4x faster. A large resize followed by a crop
  computes only the cropped window (one `cv2.warpAffine` at the same pixel centres).
"""
import numpy as np
from PIL import Image

from .sample import PAD_VALUE, Sample

try:
    import cv2
    # No OpenCV thread pool in this process: a loader worker forked from a process whose pool
    # has run inherits its state but not its threads, and hangs at its next cv2 call. Workers
    # run one per core anyway (mmdetection and YOLOX set this too).
    cv2.setNumThreads(0)
except ImportError:     # the "pil" backend needs only PIL
    cv2 = None

BACKENDS = ("pil", "cv2")


def resolve_backend(backend):
    """"auto" -> "cv2" where OpenCV imports, else "pil"; ImportError if "cv2" is asked for
    without it."""
    if backend == "auto":
        return "cv2" if cv2 is not None else "pil"
    if backend not in BACKENDS:
        raise ValueError(f"augmentation backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "cv2" and cv2 is None:
        raise ImportError("the cv2 augmentation backend needs OpenCV: pip install opencv-python-headless")
    return backend


def _resize_image(image, new_w, new_h, backend="pil"):
    if (new_w, new_h) == (image.shape[1], image.shape[0]):
        return image
    if backend == "cv2":
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def _resized_window(image, new_w, new_h, x0, y0, cw, ch):
    """Window [x0, x0+cw) x [y0, y0+ch) of the image bilinearly resized to (new_w, new_h),
    without computing the rest (cv2 backend): dst pixel centre x maps to (x + 0.5) * w / new_w
    - 0.5, as in cv2.resize (OpenCV's warp weights are 1/32 px steps, resize's finer: <= 1
    level apart). A window larger than half the resized image is cut from a full resize."""
    h, w = image.shape[:2]
    if 2 * cw * ch >= new_w * new_h:
        return _resize_image(image, new_w, new_h, "cv2")[y0:y0 + ch, x0:x0 + cw]
    ix, iy = w / new_w, h / new_h
    m = np.asarray([[ix, 0, (x0 + 0.5) * ix - 0.5], [0, iy, (y0 + 0.5) * iy - 0.5]])
    return cv2.warpAffine(image, m, (cw, ch), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def resize(sample, new_w, new_h, backend="pil"):
    """Resize to (new_w, new_h); boxes scale by the exact ratios new/old."""
    h, w = sample.image.shape[:2]
    sx, sy = new_w / w, new_h / h
    return Sample(_resize_image(sample.image, new_w, new_h, backend),
                  sample.boxes * np.asarray([sx, sy, sx, sy], np.float32), sample.labels, sample.meta)


def rescale(sample, scale_w, scale_h, backend="pil"):
    """Resize keeping the aspect ratio, as large as fits inside (scale_w, scale_h)."""
    h, w = sample.image.shape[:2]
    ratio = min(scale_w / w, scale_h / h)
    return resize(sample, max(1, int(w * ratio + 0.5)), max(1, int(h * ratio + 0.5)), backend)


def random_resize(sample, rng, scale, ratio_range, backend="pil"):
    """RandomResize(keep_ratio): fit inside scale * r, r ~ U(ratio_range)."""
    r = rng.uniform(*ratio_range)
    return rescale(sample, scale * r, scale * r, backend)


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


def _crop_window(boxes, labels, w, h, rng, size, tries):
    """RandomCrop's draws on an image of (w, h) with these boxes: (x0, y0, x1, y1, boxes, labels)."""
    for _ in range(tries):
        x0 = int(rng.integers(0, max(w - size, 0) + 1))
        y0 = int(rng.integers(0, max(h - size, 0) + 1))
        x1, y1 = min(x0 + size, w), min(y0 + size, h)
        kept = _clip_filter(boxes - np.asarray([x0, y0, x0, y0], np.float32), labels, x1 - x0, y1 - y0)
        if len(kept[0]) or not len(boxes):
            break
    return (x0, y0, x1, y1) + kept


def random_crop(sample, rng, size, tries=10):
    """RandomCrop(size): a random window; retried while gts exist but none survive."""
    h, w = sample.image.shape[:2]
    x0, y0, x1, y1, boxes, labels = _crop_window(sample.boxes, sample.labels, w, h, rng, size, tries)
    return Sample(sample.image[y0:y1, x0:x1], boxes, labels, sample.meta)


def random_resize_crop(sample, rng, scale, ratio_range, size, backend="pil", tries=10):
    """`random_resize` then `random_crop` (the same draws, the same boxes); the cv2 backend
    resamples only the cropped window."""
    if backend == "pil":
        return random_crop(random_resize(sample, rng, scale, ratio_range, backend), rng, size, tries)
    r = rng.uniform(*ratio_range)
    h, w = sample.image.shape[:2]
    new_h, new_w = rescale_size(h, w, scale * r)
    sx, sy = new_w / w, new_h / h
    boxes = sample.boxes * np.asarray([sx, sy, sx, sy], np.float32)
    x0, y0, x1, y1, boxes, labels = _crop_window(boxes, sample.labels, new_w, new_h, rng, size, tries)
    image = _resized_window(sample.image, new_w, new_h, x0, y0, x1 - x0, y1 - y0)
    return Sample(image, boxes, labels, sample.meta)


def hflip(sample):
    """Horizontal flip: x1' = W - x2, x2' = W - x1."""
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
    image = cv2.flip(sample.image, 1) if cv2 is not None else np.ascontiguousarray(sample.image[:, ::-1])
    return Sample(image, boxes, sample.labels, sample.meta)


def hsv_jitter(sample, rng, hue_delta=5, saturation_delta=30, value_delta=30, backend="pil"):
    """YOLOX HSV augmentation: each of H, S, V gets an offset U(-d, d) with probability 1/2.

    Hue deltas are in OpenCV units (0..180); the pil backend converts them to PIL's 0..255
    hue range. Offsets truncate towards zero (as upstream's int16 cast); no offset: no change.
    """
    gains = rng.uniform(-1, 1, 3) * np.asarray([hue_delta, saturation_delta, value_delta]) \
        * rng.integers(0, 2, 3)
    if not gains.any():
        return sample
    if backend == "cv2":
        values = np.arange(256)
        lut = np.stack([(values + int(gains[0])) % 180, np.clip(values + int(gains[1]), 0, 255),
                        np.clip(values + int(gains[2]), 0, 255)], -1).astype(np.uint8)
        hsv = cv2.LUT(cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV), lut.reshape(1, 256, 3))
        return Sample(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), sample.boxes, sample.labels, sample.meta)
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


def mosaic(samples, rng, img_scale, pad_value=PAD_VALUE, backend="pil"):
    """Mosaic of 4 samples on a (2S, 2S) canvas around a centre drawn from U(0.5S, 1.5S).

    Each sample is rescaled to fit (S, S); samples go top-left, top-right, bottom-left,
    bottom-right of the centre; boxes are shifted, clipped to the canvas, empty ones dropped.
    """
    s = img_scale
    canvas = np.full((2 * s, 2 * s, 3), pad_value, np.uint8)
    cx, cy = int(rng.uniform(0.5, 1.5) * s), int(rng.uniform(0.5, 1.5) * s)
    all_boxes, all_labels = [], []
    for k, smp in enumerate(samples):
        smp = rescale(smp, s, s, backend)
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
          min_wh=2.0, area_ratio=0.1, backend="pil"):
    """MixUp: `other` rescaled to fit (S, S) on a padded canvas, maybe flipped, randomly
    cropped to `sample`'s size and blended 50/50; its boxes follow (those shrunk below
    `min_wh` px or `area_ratio` of their size by the crop are dropped)."""
    h, w = sample.image.shape[:2]
    o = rescale(other, img_scale, img_scale, backend)
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
    # floor((a + b) / 2) in integers: bitwise what float32 (a + b) * 0.5 truncated gives
    image = ((sample.image.astype(np.uint16) + patch) >> 1).astype(np.uint8)
    return Sample(image, np.concatenate([sample.boxes, clipped[keep]]),
                  np.concatenate([sample.labels, o.labels[keep]]), sample.meta)


def rescale_size(h, w, size):
    """(h, w) of an (h, w) image rescaled to fit (size, size) keeping its ratio, as `rescale`."""
    ratio = min(size / w, size / h)
    return max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
