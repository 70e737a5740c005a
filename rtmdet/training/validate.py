"""Up-front checks of a TrainConfig: each bad value gets one line naming its CLI flag."""
from .config import TrainConfig
from .optim import ADAMW_IMPLS
from .precision import AMP_CHOICES

SIZES = ("tiny", "s", "m", "l", "x")
BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
AUGMENT_BACKENDS = ("auto", "pil", "cv2")


class ConfigError(ValueError):
    """A setting that cannot work; the message starts with the flag, e.g. "--img-size: ..."."""


def flag(name):
    return "--" + name.replace("_", "-")


def _check(cond, name, expected, value):
    if not cond:
        raise ConfigError(f"{flag(name)}: expected {expected}, got {value!r}")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: TrainConfig):
    """Raise ConfigError for the first setting that cannot work (before any work starts)."""
    c = cfg
    _check(c.model in SIZES, "model", f"one of {', '.join(SIZES)}", c.model)
    _check(_int(c.img_size) and c.img_size >= 32 and c.img_size % 32 == 0, "img_size",
           "a positive multiple of 32 (the largest stride)", c.img_size)
    for name in ("batch_size", "epochs", "accumulate", "log_interval", "prefetch_factor",
                 "num_train_images", "num_val_images", "eval_nms_pre", "synthetic_size"):
        v = getattr(c, name)
        _check(_int(v) and v >= 1, name, "a positive integer", v)
    _check(c.workers is None or (_int(c.workers) and c.workers >= 0), "workers", "an integer >= 0",
           c.workers)
    for name in ("stage2_epochs", "eval_interval", "warmup_iters", "save_predictions", "seed"):
        v = getattr(c, name)
        _check(_int(v) and v >= 0, name, "an integer >= 0", v)
    for name in ("checkpoint_iters", "max_iters", "max_images", "threads"):
        v = getattr(c, name)
        _check(v is None or (_int(v) and v >= 1), name, "a positive integer", v)
    _check(c.lr is None or c.lr > 0, "lr", "a positive number", c.lr)
    _check(c.weight_decay >= 0, "weight_decay", "a number >= 0", c.weight_decay)
    _check(c.grad_clip is None or c.grad_clip > 0, "grad_clip", "a positive number", c.grad_clip)
    for name in ("mosaic_prob", "mixup_prob", "eval_score_thr"):
        v = getattr(c, name)
        _check(0.0 <= v <= 1.0, name, "a number in [0, 1]", v)
    _check(0.0 < c.ema_momentum <= 1.0, "ema_momentum", "a number in (0, 1]", c.ema_momentum)
    _check(c.ema_gamma > 0, "ema_gamma", "a positive number", c.ema_gamma)
    for name in ("ratio_range", "stage2_ratio_range"):
        v = getattr(c, name)
        _check(v is None or (len(v) == 2 and 0 < v[0] <= v[1]), name, "two ratios 0 < low <= high", v)
    _check(c.amp in AMP_CHOICES, "amp", f"one of {', '.join(AMP_CHOICES)}", c.amp)
    _check(c.adamw in ADAMW_IMPLS, "adamw", f"one of {', '.join(ADAMW_IMPLS)}", c.adamw)
    _check(c.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}", c.backend)
    _check(c.augment_backend in AUGMENT_BACKENDS, "augment_backend",
           f"one of {', '.join(AUGMENT_BACKENDS)}", c.augment_backend)
    _check(c.resume is None or c.resume == "auto" or isinstance(c.resume, str), "resume",
           "a checkpoint path or 'auto'", c.resume)
    from .distributed import resolve_device
    try:
        resolve_device(c.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.resume not in (None, "auto"):
        from pathlib import Path
        _check(Path(c.resume).is_file(), "resume", "an existing checkpoint file or 'auto'", c.resume)
