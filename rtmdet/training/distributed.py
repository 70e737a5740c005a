"""Process-group set-up (torchrun: NCCL on GPUs, gloo on the CPU) and small collectives."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) is kept off on the project's machines; torchrun inherits this.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def resolve_device(device_arg, local_rank=0):
    """torch.device for "auto" | "cpu" | "cuda" | "cuda:N"; "cuda" is this process's GPU."""
    if device_arg in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def setup_distributed(device_arg):
    """Initialise torch.distributed when launched by torchrun; returns (DistInfo, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank() if world > 1 else 0, world, local)
    return info, device


def all_reduce_mean(t, dinfo):
    """Mean of tensor `t` over the processes (in place; `t` itself with one process)."""
    if dinfo.world > 1:
        dist.all_reduce(t)
        t /= dinfo.world
    return t


def any_process(flag, device, dinfo):
    """True on every process when `flag` is True on any of them (one tiny all-reduce)."""
    if dinfo.world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_objects(obj, dinfo):
    """List of every process's `obj` (rank order); [obj] with one process."""
    if dinfo.world == 1:
        return [obj]
    out = [None] * dinfo.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module, dinfo, src=0):
    """Copy rank `src`'s parameters and buffers into `module` on every process (the EMA's BN
    statistics differ per rank, since each rank's forward updates its own)."""
    if dinfo.world == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)
