"""TrainConfig (everything a run needs, saved in every checkpoint) and the named presets."""
from dataclasses import asdict, dataclass, fields
from typing import Optional


@dataclass
class TrainConfig:
    """Everything a run needs; saved (as a plain dict) in every checkpoint.

    `amp="auto"` and `channels_last=None` pick per device: bf16 autocast and channels_last
    on a CUDA GPU that supports bf16, fp32 and contiguous NCHW on the CPU.
    """
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
    batch_size: int = 32                  # per process and micro-batch
    accumulate: int = 1                   # micro-batches per optimizer step
    img_size: int = 640
    lr: Optional[float] = None            # None: 0.004 * effective batch / 256
    weight_decay: float = 0.05
    warmup_iters: int = 1000              # optimizer steps
    ema_momentum: float = 0.0002
    ema_gamma: float = 2000.0
    amp: str = "auto"                     # auto | none | bf16 | fp16
    channels_last: Optional[bool] = None  # None: on CUDA only
    compile: bool = False                 # torch.compile the model
    adamw: str = "auto"                   # auto (fused on CUDA) | fused | foreach | for-loop
    grad_clip: Optional[float] = None     # max gradient norm
    workers: Optional[int] = None         # None: 2 on the CPU, min(12, CPUs / GPUs - 2) on CUDA
    prefetch_factor: int = 4              # batches each worker loads ahead
    eval_interval: int = 10
    eval_score_thr: float = 0.001
    eval_nms_pre: int = 30000
    seed: int = 0
    out: str = "runs/train"
    resume: Optional[str] = None          # checkpoint path, or "auto" (OUT/last.pth, else prev.pth)
    device: str = "auto"
    sync_bn: bool = False
    threads: Optional[int] = None
    log_interval: int = 50                # also the interval of the finiteness check
    save_predictions: int = 4             # val images drawn with predictions at the end
    checkpoint_iters: Optional[int] = None  # also checkpoint every N optimizer steps
    max_iters: Optional[int] = None       # stop (with a checkpoint) after N optimizer steps in total
    mosaic_prob: float = 1.0
    mixup_prob: float = 0.5
    ratio_range: Optional[tuple] = None   # stage-1 random resize ratios; None: per model size
    stage2_ratio_range: Optional[tuple] = None
    augment_backend: str = "auto"         # auto (cv2 on CUDA with OpenCV, else pil) | pil | cv2
    backend: str = "auto"                 # op backend for the loss
    progress: bool = True


def config_to_dict(cfg):
    """A plain dict (tuples as lists) that `torch.load(weights_only=True)` reads back."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return plain(asdict(cfg))


def config_from_dict(d):
    """TrainConfig from a saved dict; unknown keys (other versions) are ignored."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in d.items() if k in names}
    for k in ("ratio_range", "stage2_ratio_range"):
        if values.get(k) is not None:
            values[k] = tuple(values[k])
    if isinstance(values.get("synthetic"), dict):
        values["synthetic"] = {k: tuple(v) if isinstance(v, list) else v
                               for k, v in values["synthetic"].items()}
    return TrainConfig(**values)


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
