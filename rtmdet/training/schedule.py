"""LR schedule (warm-up, flat, cosine) and the recipe's linear LR scaling."""
import math

RECIPE_LR, RECIPE_BATCH = 0.004, 256   # SPEC section 5: AdamW lr 0.004 for 256 images a step


def scaled_lr(effective_batch, lr=None):
    """`lr` if given, else the recipe's LR scaled linearly to `effective_batch` images a step."""
    return lr if lr is not None else RECIPE_LR * effective_batch / RECIPE_BATCH


def lr_factor(step, *, warmup_iters, epochs, iters_per_epoch, start_factor=1e-5, final_ratio=0.05):
    """LR multiplier before optimizer step `step` (0-based): linear warm-up from `start_factor`
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
