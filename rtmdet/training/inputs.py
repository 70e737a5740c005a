"""The run's datasets and its training loader (the data package's persistent TrainLoader when
it exists, else a per-epoch DataLoader with the same batches)."""
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
    train, val = D.CocoDetection(*tr), D.CocoDetection(*va)
    if train.classes != val.classes:
        raise D.DatasetError(f"categories of {tr[0]} and {va[0]} differ")
    if cfg.max_images:
        train.images, train._gts = train.images[:cfg.max_images], train._gts[:cfg.max_images]
    return DataSplits(train, val, Path(va[0]))


def synthetic_root(cfg):
    """Cache folder of the synthetic set that cfg describes."""
    return D.synthetic_root(cfg.synthetic)


def augment_config(cfg):
    aug = D.AugmentConfig.for_model(cfg.model)
    aug.mosaic_prob, aug.mixup_prob = cfg.mosaic_prob, cfg.mixup_prob
    if cfg.ratio_range:
        aug.ratio_range = tuple(cfg.ratio_range)
    if cfg.stage2_ratio_range:
        aug.stage2_ratio_range = tuple(cfg.stage2_ratio_range)
    return aug


class EpochDataLoader:
    """Today's loader behind TrainLoader's interface: a DataLoader + PositionSampler built per
    epoch (its workers start each epoch). Used only while `D.TrainLoader` is missing."""

    def __init__(self, train_set, *, batch_size, rank, world, workers, seed, pin_memory,
                 prefetch_factor):
        self.train_set, self.batch_size = train_set, batch_size
        self.rank, self.world, self.workers = rank, world, workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor

    def __len__(self):
        n = len(D.PositionSampler(len(self.train_set), self.rank, self.world, batch_size=self.batch_size))
        return n // self.batch_size

    def epoch(self, epoch, strong, start_iter=0):
        self.train_set.set_epoch(epoch, strong)
        sampler = D.PositionSampler(len(self.train_set), self.rank, self.world,
                                    skip=start_iter * self.batch_size, batch_size=self.batch_size)
        extra = {"prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        return iter(torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
            collate_fn=D.collate, drop_last=True, pin_memory=self.pin_memory, **extra))

    def close(self):
        pass


def resolve_workers(workers, device, local_world=1):
    """Loader worker processes: `workers` if given; else 2 on the CPU (the cores train) and on
    CUDA the machine's cores shared by its processes, 2 left for the training loops, at most 12."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 2
    return max(2, min(12, (os.cpu_count() or 4) // max(local_world, 1) - 2))


def train_loader(train_set, cfg, dinfo, device):
    """The persistent loader of the data package if present, else EpochDataLoader."""
    make = getattr(D, "TrainLoader", EpochDataLoader)
    return make(train_set, batch_size=cfg.batch_size, rank=dinfo.rank, world=dinfo.world,
                workers=cfg.workers, seed=cfg.seed, pin_memory=device.type == "cuda",
                prefetch_factor=cfg.prefetch_factor)
