"""The RTMDet trainer, one job per file:

config.py (TrainConfig, presets), validate.py (up-front argument checks), schedule.py (LR),
optim.py (AdamW), ema.py, precision.py (amp / channels_last defaults), distributed.py
(torchrun set-up, collectives), inputs.py (datasets, training loader), checkpoints.py (safe,
atomic, keep-two), interrupt.py (Ctrl-C at step boundaries), logs.py (log.jsonl, curves,
progress), evaluate.py (COCO evaluation, drawn predictions), loop.py (the loop).
"""
from .checkpoints import (CheckpointError, find_resume, load_checkpoint, model_from_checkpoint,
                          rng_state, save_checkpoint, set_rng_state)
from .config import CPU_DEMO_SYNTHETIC, PRESETS, TrainConfig, config_from_dict, config_to_dict
from .distributed import DistInfo, setup_distributed
from .ema import ModelEMA
from .evaluate import evaluate, save_val_predictions
from .inputs import DataSplits, augment_config, load_data, synthetic_root
from .interrupt import TrainingInterrupted
from .logs import JsonlLog, plot_curves, read_log
from .loop import LossModule, train
from .optim import build_adamw, param_groups
from .schedule import lr_factor, scaled_lr
from .validate import ConfigError, validate_config

__all__ = ["CheckpointError", "find_resume", "load_checkpoint", "model_from_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state", "CPU_DEMO_SYNTHETIC", "PRESETS", "TrainConfig",
           "config_from_dict", "config_to_dict", "DistInfo", "setup_distributed", "ModelEMA",
           "evaluate", "save_val_predictions", "DataSplits", "augment_config", "load_data",
           "synthetic_root", "TrainingInterrupted", "JsonlLog", "plot_curves", "read_log",
           "LossModule", "train", "build_adamw", "param_groups", "lr_factor", "scaled_lr",
           "ConfigError", "validate_config"]
