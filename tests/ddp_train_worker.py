"""Helper for test_ddp_cpu.py: one training run (under torchrun: one rank of it) that also
dumps this process's own weights, so the test can compare ranks.

    python tests/ddp_train_worker.py CONFIG_JSON DUMP_DIR [--frozen-bn]

--frozen-bn keeps BatchNorm in eval mode (running statistics), which makes each image's
forward independent of the batch it is in: then 2 processes x batch B must equal 1 process
x batch 2B up to float rounding (with live BN the batch statistics differ by construction).
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from rtmdet import ops
from rtmdet.train import TrainConfig
from rtmdet.training.distributed import setup_distributed
from rtmdet.training.ema import unwrap
from rtmdet.training.interrupt import StopFlag
from rtmdet.training.loop import Trainer


def main():
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    dump = Path(sys.argv[2])
    if "--frozen-bn" in sys.argv:
        nn.modules.batchnorm._BatchNorm.train = lambda self, mode=True: nn.Module.train(self, False)
    dinfo, device = setup_distributed(cfg.device)
    with StopFlag() as stop, ops.value_checks(False):
        trainer = Trainer(cfg, dinfo, device, stop)
        try:
            trainer.run()
        finally:
            trainer.close()
    dump.mkdir(parents=True, exist_ok=True)
    torch.save({"model": unwrap(trainer.model).state_dict(), "ema": trainer.ema.module.state_dict(),
                "step": trainer.step, "world": dinfo.world}, dump / f"rank{dinfo.rank}.pt")
    if dinfo.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
