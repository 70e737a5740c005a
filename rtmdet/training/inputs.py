"""The run's datasets and its training loader (the data package's persistent TrainLoader)."""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import data as D


@dataclass
class DataSplits:
    train: "D.CocoDetection"
    val: "D.CocoDetection"
    val_ann: Path


def load_data(cfg, main=True):
    """Build the train and val `CocoDetection`s from cfg.data / explicit paths."""
    if cfg.train_ann or cfg.val_ann:
        missing = [n for n in ("train_ann", "train_images", "val_ann", "val_images") if not getattr(cfg, n)]
        if missing:
            raise D.DatasetError("explicit dataset paths need all of --train-ann --train-images "
                                 f"--val-ann --val-images; missing: {', '.join(missing)}")
        tr = (cfg.train_ann, cfg.train_images)
        va = (cfg.val_ann, cfg.val_images)
    else:
        if cfg.data == "synthetic":
            root = synthetic_root(cfg)
            if main:
                D.ensure_synthetic(root, cfg.num_train_images, cfg.num_val_images,
                                   size=cfg.synthetic_size, params=cfg.synthetic)
            if dist.is_initialized():
                dist.barrier()
        else:
            root = cfg.data
        tr, va = D.dataset_paths(root, "train"), D.dataset_paths(root, "val")
    train, val = D.CocoDetection(*tr, warn=main), D.CocoDetection(*va, warn=main)
    if train.classes != val.classes:
        raise D.DatasetError(f"categories of {tr[0]} and {va[0]} differ")
    if cfg.max_images:
        train.images, train._gts = train.images[:cfg.max_images], train._gts[:cfg.max_images]
    return DataSplits(train, val, Path(va[0]))


def synthetic_root(cfg):
    """Cache folder of the synthetic set that cfg describes."""
    return D.synthetic_root(cfg.synthetic)


def augment_config(cfg, device=None):
    """The run's `AugmentConfig`: the model size's defaults, cfg's probabilities and ratios,
    and the augmentation backend for `device` (`resolve_augment_backend`)."""
    aug = D.AugmentConfig.for_model(cfg.model)
    aug.mosaic_prob, aug.mixup_prob = cfg.mosaic_prob, cfg.mixup_prob
    aug.backend = resolve_augment_backend(cfg.augment_backend, device)
    if cfg.ratio_range:
        aug.ratio_range = tuple(cfg.ratio_range)
    if cfg.stage2_ratio_range:
        aug.stage2_ratio_range = tuple(cfg.stage2_ratio_range)
    return aug


def resolve_augment_backend(backend, device=None):
    """"auto": "cv2" for a CUDA run where OpenCV imports (upstream's resampling, ~8x faster a
    worker: what keeps a GPU fed), else "pil" (the CPU keeps its bitwise-reproducible numerics).
    Both trained equally well on the built-in set (benches/RESULTS.md, 2026-12-06)."""
    if backend != "auto":
        return D.resolve_backend(backend)
    cuda = device is not None and torch.device(device).type == "cuda"
    return "cv2" if cuda and D.transforms.cv2 is not None else "pil"


def resolve_workers(workers, device, local_world=1):
    """Loader worker processes: `workers` if given; else 2 on the CPU (the cores train) and on
    CUDA the machine's cores shared by its processes, 2 left for the training loops, at most 12."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 2
    return max(2, min(12, (os.cpu_count() or 4) // max(local_world, 1) - 2))


def train_loader(train_set, cfg, dinfo, device):
    """The persistent loader; told where the last-epochs stage starts, so that it prefetches
    across that switch too."""
    return D.TrainLoader(train_set, batch_size=cfg.batch_size, rank=dinfo.rank, world=dinfo.world,
                         workers=cfg.workers, seed=cfg.seed, pin_memory=device.type == "cuda",
                         prefetch_factor=cfg.prefetch_factor,
                         strong_epochs=cfg.epochs - cfg.stage2_epochs)
