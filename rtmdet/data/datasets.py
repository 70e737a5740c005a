"""Training and evaluation views of a `CocoDetection`: the RTMDet augmentation pipeline.

The Mosaic/MixUp image caches are emulated without state: the cache of the sample at
position p of an epoch's permutation holds the images at positions p-K+1..p (wrapping), i.e.
the K most recently loaded images, as upstream's FIFO caches do (random_pop=False). Every
random draw of a sample comes from a generator seeded by (seed, epoch, position), so a run is
reproducible for any worker count and resumes exactly. One deviation: upstream's MixUp
partner is a cached *augmented* (mosaic) result; ours is a raw cached image (the partner is
then resized, flipped and cropped as upstream does). Decoded images are kept in a small
per-process LRU (`decode_cache`), so the 4-5 images a Mosaic + MixUp sample reads are mostly
decoded once per worker; it changes no output.
"""
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .sample import Sample
from .transforms import (hflip, hsv_jitter, mixup, mosaic, pad, random_resize_crop, rescale, rescale_size,
                         resolve_backend)


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
    # resampling + HSV: "pil" (the reference numerics), "cv2" (OpenCV's, as upstream; about 8x
    # faster a worker, trains as well: benches/RESULTS.md), "auto" (cv2 if installed). The
    # trainer picks per device (training/inputs.py `resolve_augment_backend`).
    backend: str = "pil"

    @classmethod
    def for_model(cls, size, **overrides):
        if size in ("tiny", "s"):
            return cls(**overrides)
        return cls(**{"mosaic_cache": 40, "mixup_cache": 20, "ratio_range": (0.1, 2.0),
                      "stage2_ratio_range": (0.1, 2.0), **overrides})


class _DecodeCache:
    """The last `size` raw samples read from `base`, by index (read-only images, so no
    transform can change a cached one)."""

    def __init__(self, base, size):
        self.base, self.size, self.items = base, int(size), OrderedDict()

    def __getitem__(self, i):
        if self.size <= 0:
            return self.base[i]
        smp = self.items.get(i)
        if smp is None:
            smp = self.base[i]
            smp.image.flags.writeable = False
            self.items[i] = smp
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(i)
        return Sample(smp.image, smp.boxes.copy(), smp.labels.copy(), dict(smp.meta))


class TrainDataset(torch.utils.data.Dataset):
    """Augmented training view of a `CocoDetection`.

    An index is a key `(epoch, strong, position)`: the sample at `position` of that epoch's
    permutation (seeded by seed and epoch), through stage 1 (Mosaic + MixUp, strong=True)
    or stage 2. Keys carry the epoch, so persistent loader workers need no shared state.
    A plain int `position` uses the epoch and stage last given to `set_epoch`.
    `aug.backend` "auto" is resolved here (`self.backend`).
    """

    def __init__(self, base, img_size, aug=None, seed=0, decode_cache=128):
        self.base, self.img_size, self.seed = base, int(img_size), int(seed)
        self.aug = aug or AugmentConfig()
        self.backend = resolve_backend(self.aug.backend)
        self.decode_cache = int(decode_cache)
        self._orders = {}
        self._raw = None
        self.set_epoch(0, True)

    def set_epoch(self, epoch, strong):
        """Epoch and stage of plain int indices (the keys of `TrainLoader` carry their own)."""
        self.epoch, self.strong = int(epoch), bool(strong)

    @property
    def order(self):
        return self.epoch_order(self.epoch)

    def epoch_order(self, epoch):
        """The permutation of base indices of `epoch` (the last few are kept)."""
        key = (int(epoch), len(self.base))
        if key not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = np.random.default_rng([self.seed, key[0], 7]).permutation(key[1])
        return self._orders[key]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, strong, pos = key
            return self.sample(int(epoch), bool(strong), int(pos))
        return self.sample(self.epoch, self.strong, int(key))

    def __getstate__(self):     # worker processes start with an empty decode cache
        return {**self.__dict__, "_raw": None}

    def _read(self, i):
        if self._raw is None or self._raw.base is not self.base:
            self._raw = _DecodeCache(self.base, self.decode_cache)
        return self._raw[int(i)]

    def _cached(self, order, pos, k, rng):
        """A random image from the k most recent ones (positions pos-k+1..pos, wrapping)."""
        back = int(rng.integers(0, min(k, len(order))))
        return self._read(order[(pos - back) % len(order)])

    def sample(self, epoch, strong, pos):
        """The augmented sample at `pos` of `epoch`; every draw comes from (seed, epoch, pos)."""
        s, a, be = self.img_size, self.aug, self.backend
        order = self.epoch_order(epoch)
        rng = np.random.default_rng([self.seed, epoch, pos])
        smp = self._read(order[pos])
        meta = smp.meta
        if strong:
            if rng.uniform() < a.mosaic_prob:
                smp = mosaic([smp] + [self._cached(order, pos, a.mosaic_cache, rng) for _ in range(3)], rng, s,
                             backend=be)
            smp = random_resize_crop(smp, rng, 2 * s, a.ratio_range, s, backend=be)
        else:
            smp = random_resize_crop(smp, rng, s, a.stage2_ratio_range, s, backend=be)
        if a.hsv:
            smp = hsv_jitter(smp, rng, backend=be)
        if rng.uniform() < a.flip_prob:
            smp = hflip(smp)
        smp = pad(smp, s, s)
        if strong and rng.uniform() < a.mixup_prob:
            smp = mixup(smp, self._cached(order, pos, a.mixup_cache, rng), rng, s, backend=be)
        image = smp.image if smp.image.flags.writeable else smp.image.copy()   # not a cached image
        return Sample(image, smp.boxes, smp.labels, dict(meta, scale_factor=(1.0, 1.0)))


class EvalDataset(torch.utils.data.Dataset):
    """Test-time view: resize keeping ratio to fit (S, S), pad bottom/right to S with 114.
    `backend` as `AugmentConfig.backend` (use the training one)."""

    def __init__(self, base, img_size, backend="pil"):
        self.base, self.img_size = base, int(img_size)
        self.backend = resolve_backend(backend)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        raw = self.base[i]
        h, w = raw.image.shape[:2]
        smp = pad(rescale(raw, self.img_size, self.img_size, self.backend), self.img_size, self.img_size)
        nh, nw = rescale_size(h, w, self.img_size)
        smp.meta = dict(raw.meta, scale_factor=(nw / w, nh / h), ori_size=(h, w))
        return smp
