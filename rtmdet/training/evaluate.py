"""COCO evaluation of a model during or after training (split across processes, gathered on
rank 0) and the drawn predictions written at the end of a run."""
from pathlib import Path

import torch

from .. import data as D
from ..evaluation import coco_evaluate, detections_to_coco
from .distributed import DistInfo, gather_objects
from .inputs import resolve_augment_backend, resolve_workers
from .interrupt import test_hook
from .precision import autocast


@torch.no_grad()
def evaluate(model, val, ann_file, cfg, device, dinfo=DistInfo(), out_dir=None, verbose=True,
             should_stop=None, channels_last=False):
    """COCO bbox evaluation of `model` on `val`: process r takes images r, r + world, ...
    (each image exactly once), detections are gathered on rank 0. Returns the metrics on
    rank 0, None elsewhere. `should_stop()` True between batches abandons the evaluation
    (raises the interrupt it returns)."""
    from ..model import normalize_images
    model.eval()
    ds = D.EvalDataset(val, cfg.img_size, backend=resolve_augment_backend(cfg.augment_backend, device))
    dets = []
    workers = resolve_workers(cfg.workers, device, dinfo.world)
    for batch in _eval_batches(ds, cfg.batch_size, dinfo, workers, device.type == "cuda"):
        test_hook("eval")
        if should_stop is not None:
            should_stop()
        images = normalize_images(batch["images"].to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.amp, device):
            res = model.predict(images, scale_factors=batch["scale_factors"].to(device),
                                score_thr=cfg.eval_score_thr, nms_pre=cfg.eval_nms_pre)
        dets += detections_to_coco(batch["image_ids"], res, val.label_to_cat)
    dets = [d for part in gather_objects(dets, dinfo) for d in part]
    if not dinfo.main:
        return None
    return coco_evaluate(ann_file, dets, out_dir=out_dir, verbose=verbose)


def _eval_batches(ds, batch_size, dinfo, workers, pin_memory):
    """The data package's eval_batches (one-line errors for unreadable images) when present."""
    if hasattr(D, "eval_batches"):
        return D.eval_batches(ds, batch_size, dinfo.rank, dinfo.world, workers, pin_memory)
    sampler = D.PositionSampler(len(ds), dinfo.rank, dinfo.world, drop_last=False)
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler,
                                            num_workers=workers, collate_fn=D.collate,
                                            pin_memory=pin_memory))


@torch.no_grad()
def save_val_predictions(model, val, cfg, device, out_dir, classes, score_thr=0.3, should_stop=None):
    """Draw the predictions of the first `cfg.save_predictions` val images into out_dir."""
    from ..evaluation import draw_detections
    from ..model import normalize_images
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = D.EvalDataset(val, cfg.img_size, backend=resolve_augment_backend(cfg.augment_backend, device))
    model.eval()
    for i in range(min(cfg.save_predictions, len(ds))):
        test_hook("predictions")
        if should_stop is not None:
            should_stop()
        batch = D.collate([ds[i]])
        res = model.predict(normalize_images(batch["images"].to(device)),
                            scale_factors=batch["scale_factors"].to(device), score_thr=score_thr)[0]
        draw_detections(D.read_image(val.image_path(i)), res, classes).save(
            out_dir / f"{Path(val.image_path(i)).stem}.png")
