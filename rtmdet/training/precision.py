"""Per-device numerics defaults: bf16 autocast and channels_last on CUDA, fp32 NCHW on the CPU."""
import torch

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def resolve_amp(amp, device):
    """"auto": bf16 on a CUDA GPU that supports it, else "none" (the CPU keeps fp32)."""
    if amp in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "none"
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp: expected one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return amp


def resolve_channels_last(channels_last, device):
    """None: channels_last on CUDA (2.7x faster RTMDet-s step on an H200), NCHW on the CPU."""
    return device.type == "cuda" if channels_last is None else bool(channels_last)


def autocast(amp, device):
    amp = resolve_amp(amp, device)
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)
