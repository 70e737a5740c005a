"""Sampling positions of an epoch, collating samples into batches, the persistent loader."""
import math
from dataclasses import dataclass

import numpy as np
import torch

from .sample import DatasetError
from .transforms import cv2


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


def _uint8_batch(*shape):
    """An empty uint8 tensor; in a loader worker in shared memory, as default_collate does,
    so sending it to the main process copies nothing."""
    n = math.prod(shape)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n)).view(shape)


def _copy_chw(image, dst):
    """dst (3, H, W) <- image (H, W, 3): cv2.split into the planes is ~6x faster than a
    strided copy (checked: a binding that returns new planes instead is copied from)."""
    if cv2 is not None and image.strides[1:] == (3, 1):     # rows of packed pixels (crops too)
        planes = list(dst)
        out = cv2.split(image, planes)
        if out[0].ctypes.data != planes[0].ctypes.data:
            dst[:] = np.stack(out)
    else:
        dst[:] = image.transpose(2, 0, 1)


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
    h, w = samples[0].image.shape[:2]
    images = _uint8_batch(b, 3, h, w)
    for i, s in enumerate(samples):
        if s.image.shape != (h, w, 3):
            raise ValueError(f"collate needs samples of one size: {s.image.shape} vs {(h, w, 3)}")
        _copy_chw(s.image, images[i].numpy())
    return {"images": images, "boxes": boxes, "labels": labels, "mask": mask,
            "scale_factors": torch.tensor([s.meta.get("scale_factor", (1.0, 1.0)) for s in samples],
                                          dtype=torch.float32),
            "image_ids": [s.meta.get("image_id") for s in samples],
            "ori_sizes": [tuple(s.meta.get("ori_size", s.image.shape[:2])) for s in samples]}


# ------------------------------------------------------------------ persistent train loader

@dataclass
class LoadFailure:
    """Stands in for a sample whose file could not be read (a `DatasetError` in a worker),
    so the main process can raise the one-line error instead of a worker traceback."""
    message: str


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except DatasetError as e:
            return LoadFailure(str(e))


def _collate_or_failure(samples):
    failed = [s for s in samples if isinstance(s, LoadFailure)]
    return failed[0] if failed else collate(samples)


def _raise_failure(batch):
    if isinstance(batch, LoadFailure):
        raise DatasetError(batch.message)
    return batch


class EpochKeySampler(torch.utils.data.Sampler):
    """This rank's positions as `(epoch, strong, position)` keys, epoch after epoch without
    end, from `start = (epoch, strong, skip)`; epoch e > start's uses stage 1 while
    e < `strong_epochs` (None: start's stage throughout). Keys take the epoch to the workers,
    and the stream lets the loader prefetch across epoch boundaries."""

    def __init__(self, n, rank=0, world=1, batch_size=1, strong_epochs=None):
        self.positions = PositionSampler(n, rank, world, batch_size=batch_size).positions
        self.strong_epochs = strong_epochs
        self.start = (0, True, 0)

    def strong_after(self, epoch, strong):
        """The stage the stream gives the epoch after `epoch` (of stage `strong`)."""
        return strong if self.strong_epochs is None else epoch + 1 < self.strong_epochs

    def __iter__(self):
        epoch, strong, skip = self.start
        while self.positions:
            for p in self.positions[skip:]:
                yield epoch, strong, p
            epoch, strong, skip = epoch + 1, self.strong_after(epoch, strong), 0


class TrainLoader:
    """Batches of a `TrainDataset`, epoch after epoch, from worker processes that start once
    and persist, prefetching across epoch boundaries (no stall between epochs).

    `epoch(e, strong, start_iter)` yields exactly the batches of a per-epoch
    `DataLoader(PositionSampler(..., skip=start_iter * batch_size), collate, drop_last)`
    after `set_epoch(e, strong)`: same images, same random draws. Epochs asked for in order
    (e, e + 1, ...) come from one stream; any other request (resume, an epoch left half-way,
    a stage switch not announced by `strong_epochs`) restarts it, waiting for the batches in
    flight. A file that cannot be read raises `DatasetError` (one line naming the file) here.
    `seed` seeds the loader's own torch generator only (augmentation draws come from the
    dataset's seed), so iterating never consumes the global torch RNG.
    """

    def __init__(self, dataset, batch_size, rank=0, world=1, workers=0, seed=0,
                 pin_memory=False, prefetch_factor=2, strong_epochs=None):
        self.batch_size = int(batch_size)
        self.sampler = EpochKeySampler(len(dataset), rank, world, self.batch_size, strong_epochs)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            _Guarded(dataset), batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_collate_or_failure, drop_last=True, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(int(seed)), **extra)
        self._stream, self._next = None, None     # the batch iterator, the key of its next batch
        self.restarts = 0

    def __len__(self):
        """Batches of a whole epoch on this rank."""
        return len(self.sampler.positions) // self.batch_size

    def epoch(self, epoch, strong, start_iter=0):
        """Yield the batches of `epoch` from batch `start_iter` on (resume inside an epoch)."""
        key = (int(epoch), bool(strong), int(start_iter))
        if self._stream is None or self._next != key:
            self.sampler.start = (key[0], key[1], key[2] * self.batch_size)
            self._stream = iter(self.loader)   # persistent workers: drains what is in flight
            self.restarts += 1
        self._next = None                      # until this epoch is read to its end
        for i in range(key[2], len(self)):
            try:
                batch = _raise_failure(next(self._stream))
            except BaseException:
                self._stream = None
                raise
            if i + 1 == len(self):
                self._next = (key[0] + 1, self.sampler.strong_after(key[0], key[1]), 0)
            yield batch

    def close(self):
        """Stop the worker processes (also done when the loader is garbage collected)."""
        self._stream = None
        it = getattr(self.loader, "_iterator", None)   # DataLoader keeps its persistent iterator here
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_batches(dataset, batch_size, rank=0, world=1, workers=0, pin_memory=False):
    """Collated batches of an `EvalDataset` (this rank's every world-th image, the last batch
    partial). An unreadable image raises `DatasetError` (one line) here, not in a worker."""
    sampler = PositionSampler(len(dataset), rank, world, drop_last=False)
    loader = torch.utils.data.DataLoader(_Guarded(dataset), batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=_collate_or_failure,
                                         pin_memory=pin_memory)
    return (_raise_failure(batch) for batch in loader)
