"""RTMDet trainer: AdamW, warm-up + flat-then-cosine LR, EMA, AMP, exact resume, DDP.

Single process: `train(TrainConfig(...))`. Several GPUs: `torchrun --nproc_per_node N -m
rtmdet train ...` (DistributedDataParallel; every process loads its share of each epoch;
evaluation results are gathered on rank 0). Without CUDA the same code runs with gloo.

Exact resume: a checkpoint stores model, EMA, optimizer, grad scaler, the step counter
(the LR schedule is a pure function of it), RNG states, the epoch and the number of
iterations done in it. Data augmentation draws from generators seeded by (seed, epoch,
position), so resuming inside an epoch skips the positions already seen and continues
with exactly the samples and random draws an uninterrupted run would use.
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as D
from .evaluation import coco_evaluate, detections_to_coco


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint."""
    model: str = "tiny"
    data: str = "synthetic"
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    num_train_images: int = 2000          # synthetic set only
    num_val_images: int = 200             # synthetic set only
    synthetic: Optional[dict] = None      # synthetic set only: data.SyntheticParams fields
    synthetic_size: int = 320             # synthetic set only: native image size
    max_images: Optional[int] = None      # use only the first N training images
    epochs: int = 300
    stage2_epochs: int = 20               # last epochs without Mosaic/MixUp
    batch_size: int = 32                  # per process
    img_size: int = 640
    lr: Optional[float] = None            # None: 0.004 * total batch / 256
    weight_decay: float = 0.05
    warmup_iters: int = 1000
    ema_momentum: float = 0.0002
    ema_gamma: float = 2000.0
    amp: str = "none"                     # none | bf16 | fp16
    grad_clip: Optional[float] = None     # max gradient norm
    workers: int = 2
    eval_interval: int = 10
    eval_score_thr: float = 0.001
    eval_nms_pre: int = 30000
    seed: int = 0
    out: str = "runs/train"
    resume: Optional[str] = None          # checkpoint path, or "auto" (OUT/last.pth if any)
    device: str = "auto"
    sync_bn: bool = False
    threads: Optional[int] = None
    log_interval: int = 50
    save_predictions: int = 4             # val images drawn with predictions at the end
    checkpoint_iters: Optional[int] = None  # also checkpoint every N iterations
    max_iters: Optional[int] = None       # stop (with a checkpoint) after N total iterations
    mosaic_prob: float = 1.0
    mixup_prob: float = 0.5
    ratio_range: Optional[tuple] = None   # stage-1 random resize ratios; None: per model size
    stage2_ratio_range: Optional[tuple] = None
    backend: str = "auto"                 # op backend for the loss
    progress: bool = True


# The demo's synthetic set: 192 px images, 1-8 objects of 4 classes (circle, square,
# triangle, star), extents ~14-72 px, still with occlusion, textured backgrounds and lines.
CPU_DEMO_SYNTHETIC = dict(min_object=24.0, max_object=120.0, size_power=1.0, max_objects=8,
                          num_classes=4, lines=(2, 6))

PRESETS = {
    # README demo: RTMDet-tiny on the built-in set, 2 CPU cores, < 15 minutes end to end
    # (about 11 on an idle 2-core machine: 1500 steps at ~0.4 s). A short run from scratch
    # needs a much larger LR than 0.004 x 8 / 256 and a fast EMA (gamma 200).
    "cpu-demo": dict(img_size=192, synthetic=CPU_DEMO_SYNTHETIC, synthetic_size=192,
                     num_train_images=800, num_val_images=200, epochs=12, stage2_epochs=2,
                     batch_size=8, lr=0.004, warmup_iters=50, workers=1, eval_interval=3,
                     threads=2, eval_nms_pre=1000, log_interval=20, ratio_range=(0.5, 1.5),
                     stage2_ratio_range=(0.8, 1.25), mixup_prob=0.0, ema_gamma=200.0),
}


# ------------------------------------------------------------------------------ schedule

def lr_factor(step, *, warmup_iters, epochs, iters_per_epoch, start_factor=1e-5, final_ratio=0.05):
    """LR multiplier before iteration `step` (0-based): linear warm-up from `start_factor`
    over `warmup_iters`, flat, then cosine to `final_ratio` over the second half (from
    epoch epochs // 2 to the end), as mmdet's LinearLR + CosineAnnealingLR (iter based)."""
    w = 1.0 if step >= warmup_iters else start_factor + (1 - start_factor) * step / warmup_iters
    begin = (epochs // 2) * iters_per_epoch
    span = max((epochs - epochs // 2) * iters_per_epoch, 1)
    c = 1.0
    if step >= begin:
        t = min(step - begin, span)
        c = final_ratio + (1 - final_ratio) * (1 + math.cos(math.pi * t / span)) / 2
    return w * c


# ------------------------------------------------------------------------------------ EMA

class ModelEMA:
    """Exponential moving average of all float parameters and buffers (mmdet ExpMomentumEMA).

    Update k (k = 0, 1, ...): k = 0 copies; otherwise with
    m = (1 - momentum) * exp(-(1 + k) / gamma) + momentum:  avg = (1 - m) * avg + m * x.
    Integer buffers (BN's num_batches_tracked) are copied.
    """

    def __init__(self, model, momentum=0.0002, gamma=2000.0):
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum, self.gamma, self.steps = momentum, gamma, 0

    def momentum_at(self, k):
        return (1 - self.momentum) * math.exp(-(1 + k) / self.gamma) + self.momentum

    @torch.no_grad()
    def update(self, model):
        src = _unwrap(model).state_dict()
        m = self.momentum_at(self.steps)
        for k, avg in self.module.state_dict().items():
            x = src[k].detach()
            if self.steps == 0 or not avg.dtype.is_floating_point:
                avg.copy_(x)
            else:
                avg.mul_(1 - m).add_(x.to(avg.dtype), alpha=m)
        self.steps += 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]


def _unwrap(model):
    model = getattr(model, "module", model)   # DDP
    return getattr(model, "model", model)     # _LossModule


class _LossModule(nn.Module):
    """forward = model.loss, so DistributedDataParallel sees the loss computation."""

    def __init__(self, model, backend):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, images, boxes, labels, mask):
        return self.model.loss(images, {"boxes": boxes, "labels": labels, "mask": mask},
                               backend=self.backend)


# ------------------------------------------------------------------------------ optimizer

def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on normalisation layers and biases (mmdet's
    norm_decay_mult=0, bias_decay_mult=0)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- environment

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_arg):
    """Initialise torch.distributed when launched by torchrun; returns (DistInfo, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")  # "cuda": this process's GPU
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_arg}: CUDA is not available on this machine")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank() if world > 1 else 0, world, local)
    return info, device


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- data

@dataclass
class DataSplits:
    train: D.CocoDetection
    val: D.CocoDetection
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


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, val, ann_file, cfg, device, dinfo=DistInfo(), out_dir=None, verbose=True):
    """COCO bbox evaluation of `model` on `val` (each process takes every world-th image;
    detections are gathered on rank 0). Returns the metrics on rank 0, None elsewhere."""
    from .model import normalize_images
    model.eval()
    ds = D.EvalDataset(val, cfg.img_size)
    sampler = D.PositionSampler(len(ds), dinfo.rank, dinfo.world, drop_last=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.workers, collate_fn=D.collate)
    dets = []
    for batch in loader:
        with _autocast(cfg.amp, device):
            res = model.predict(normalize_images(batch["images"].to(device)),
                                scale_factors=batch["scale_factors"].to(device),
                                score_thr=cfg.eval_score_thr, nms_pre=cfg.eval_nms_pre)
        dets += detections_to_coco(batch["image_ids"], res, val.label_to_cat)
    if dinfo.world > 1:
        gathered = [None] * dinfo.world
        dist.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
    if not dinfo.main:
        return None
    return coco_evaluate(ann_file, dets, out_dir=out_dir, verbose=verbose)


def _autocast(amp, device):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- checkpoint

def save_checkpoint(path, **state):
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def model_from_checkpoint(path, device="cpu", use_ema=True):
    """(model in eval mode, TrainConfig, classes, label_to_cat) from a training checkpoint."""
    from .model import RTMDet
    ck = load_checkpoint(path)
    cfg = config_from_dict(ck["config"])
    model = RTMDet.from_name(cfg.model, num_classes=len(ck["classes"]))
    model.load_state_dict(ck["ema"]["module"] if use_ema and ck.get("ema") else ck["model"])
    return model.to(device).eval(), cfg, ck["classes"], ck["label_to_cat"]


def config_from_dict(d):
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------- train

class JsonlLog:
    def __init__(self, path, enabled):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig):
    """Train (or resume) according to cfg; returns the last evaluation metrics (rank 0)."""
    from .model import RTMDet, normalize_images

    dinfo, device = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if dinfo.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + dinfo.rank)

    splits = load_data(cfg, dinfo.main)
    classes, label_to_cat = splits.train.classes, splits.train.label_to_cat
    train_set = D.TrainDataset(splits.train, cfg.img_size, augment_config(cfg), seed=cfg.seed)

    model = RTMDet.from_name(cfg.model, num_classes=len(classes)).to(device)
    if cfg.sync_bn and dinfo.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEMA(model, cfg.ema_momentum, cfg.ema_gamma)
    total_batch = cfg.batch_size * dinfo.world
    base_lr = cfg.lr if cfg.lr is not None else 0.004 * total_batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr,
                                  betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    loss_module = _LossModule(model, cfg.backend)
    if dinfo.world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    iters_per_epoch = len(D.PositionSampler(len(train_set), dinfo.rank, dinfo.world,
                                            batch_size=cfg.batch_size)) // cfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} x {dinfo.world} processes exceeds the "
                         f"{len(train_set)} training images")
    resume = cfg.resume
    if resume == "auto":
        resume = out / "last.pth" if (out / "last.pth").is_file() else None
    log = JsonlLog(out / "log.jsonl", dinfo.main)
    return _run(cfg, dinfo, device, splits, train_set, model, ema, optimizer, scaler, loss_module,
                base_lr, iters_per_epoch, log, classes, label_to_cat, out, normalize_images, resume)


def _run(cfg, dinfo, device, splits, train_set, model, ema, optimizer, scaler, loss_module,
         base_lr, iters_per_epoch, log, classes, label_to_cat, out, normalize_images,
         resume=None):
    start_epoch, start_iter, step = 0, 0, 0
    if resume:
        ck = load_checkpoint(resume)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][min(dinfo.rank, len(ck["rng"]) - 1)])
        start_epoch, start_iter, step = ck["epoch"], ck["iter"], ck["step"]
        if dinfo.main:
            print(f"resumed from {resume}: epoch {start_epoch}, iteration {start_iter}, step {step}")

    def checkpoint(epoch, it):
        states = [rng_state()]
        if dinfo.world > 1:
            states = [None] * dinfo.world
            dist.all_gather_object(states, rng_state())
        if dinfo.main:
            save_checkpoint(out / "last.pth", model=model.state_dict(), ema=ema.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            scheduler={"step": step, "base_lr": base_lr}, rng=states,
                            epoch=epoch, iter=it, step=step, config=asdict(cfg),
                            classes=classes, label_to_cat=label_to_cat)

    metrics = None
    total_steps = cfg.epochs * iters_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        strong = epoch < cfg.epochs - cfg.stage2_epochs
        train_set.set_epoch(epoch, strong)
        sampler = D.PositionSampler(len(train_set), dinfo.rank, dinfo.world,
                                    skip=start_iter * cfg.batch_size, batch_size=cfg.batch_size)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                             num_workers=cfg.workers, collate_fn=D.collate,
                                             drop_last=True, pin_memory=device.type == "cuda")
        model.train()
        bar = _progress(cfg, dinfo, iters_per_epoch, start_iter, f"epoch {epoch + 1}/{cfg.epochs}")
        it = start_iter
        t_last = time.time()
        sums = {}
        try:
            for batch in loader:
                t_data = time.time() - t_last
                lr = base_lr * lr_factor(step, warmup_iters=cfg.warmup_iters, epochs=cfg.epochs,
                                         iters_per_epoch=iters_per_epoch)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                images = normalize_images(batch["images"].to(device, non_blocking=True))
                with _autocast(cfg.amp, device):
                    losses = loss_module(images, batch["boxes"].to(device), batch["labels"].to(device),
                                         batch["mask"].to(device))
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, iteration {it}: "
                                             f"{ {k: v.item() for k, v in losses.items()} }")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if step == 0 and all(p.grad is None for p in model.parameters()):
                    raise RuntimeError(f"the loss (backend={cfg.backend!r}) gives no gradient to any "
                                       "model parameter: an op on this path lacks autograd support; "
                                       "try --backend torch")
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                ema.update(model)
                step += 1
                it += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["n"] = sums.get("n", 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}")
                if step % cfg.log_interval == 0 or it == iters_per_epoch:
                    n = sums.pop("n")
                    avg = _reduce_mean({k: v / n for k, v in sums.items()}, device, dinfo)
                    sums = {}
                    log.write(type="train", epoch=epoch + 1, iter=it, step=step, lr=lr,
                              loss=sum(avg.values()), **avg, time=time.time(),
                              iter_time=time.time() - t_last, data_time=t_data)
                if cfg.checkpoint_iters and step % cfg.checkpoint_iters == 0 and it < iters_per_epoch:
                    checkpoint(epoch, it)
                t_last = time.time()
                if cfg.max_iters and step >= cfg.max_iters:
                    if it == iters_per_epoch:
                        checkpoint(epoch + 1, 0)
                    else:
                        checkpoint(epoch, it)
                    if bar is not None:
                        bar.close()
                    return metrics
        except KeyboardInterrupt:
            checkpoint(epoch, it)
            if dinfo.main:
                print(f"\ninterrupted: saved {out / 'last.pth'} at epoch {epoch}, iteration {it}; "
                      f"continue with --resume {out / 'last.pth'}")
            raise
        if bar is not None:
            bar.close()
        start_iter = 0
        checkpoint(epoch + 1, 0)
        last = epoch + 1 == cfg.epochs
        if cfg.eval_interval and ((epoch + 1) % cfg.eval_interval == 0 or last):
            t0 = time.time()
            metrics = evaluate(ema.module, splits.val, splits.val_ann, cfg, device, dinfo,
                               out_dir=out, verbose=dinfo.main)
            if dinfo.main:
                log.write(type="val", epoch=epoch + 1, step=step, time=time.time(),
                          eval_time=time.time() - t0, **metrics)
                print(f"epoch {epoch + 1}: bbox_mAP {metrics['bbox_mAP']:.4f} "
                      f"(mAP_50 {metrics['bbox_mAP_50']:.4f}) in {time.time() - t0:.1f}s")
            if dinfo.main:
                plot_curves(out / "log.jsonl", out / "curves.png")
    if dinfo.main:
        plot_curves(out / "log.jsonl", out / "curves.png")
        if cfg.save_predictions:
            save_val_predictions(ema.module, splits.val, cfg, device, out / "predictions", classes)
    return metrics


def _progress(cfg, dinfo, total, initial, desc):
    if not (cfg.progress and dinfo.main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, mininterval=2.0, dynamic_ncols=True)


def _reduce_mean(values, device, dinfo):
    if dinfo.world == 1:
        return values
    t = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / dinfo.world).tolist()))


def plot_curves(log_path, png_path):
    """Loss (per logged step) and bbox mAP (per evaluation) curves from a log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    tr = [r for r in recs if r["type"] == "train"]
    va = [r for r in recs if r["type"] == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "loss_cls", "loss_bbox"):
        a.plot([r["step"] for r in tr], [r.get(key, float("nan")) for r in tr], label=key)
    a.set_xlabel("iteration")
    a.set_title("training loss")
    a.legend()
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
        b.plot([r["epoch"] for r in va], [r[key] for r in va], marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_title("validation (EMA model)")
    b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def save_val_predictions(model, val, cfg, device, out_dir, classes, score_thr=0.3):
    """Draw the predictions of the first `cfg.save_predictions` val images into out_dir."""
    from .evaluation import draw_detections
    from .model import normalize_images
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = D.EvalDataset(val, cfg.img_size)
    model.eval()
    for i in range(min(cfg.save_predictions, len(ds))):
        batch = D.collate([ds[i]])
        res = model.predict(normalize_images(batch["images"].to(device)),
                            scale_factors=batch["scale_factors"].to(device), score_thr=score_thr)[0]
        draw_detections(D.read_image(val.image_path(i)), res, classes).save(
            out_dir / f"{Path(val.image_path(i)).stem}.png")
