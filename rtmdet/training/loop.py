"""The training loop: `train(TrainConfig(...))`, single process or under torchrun (DDP).

Hot path: no host synchronisation between steps. The logged losses are summed on the
device and read (and checked for finiteness) every `log_interval` steps, before every
checkpoint and at the end of an epoch; a non-finite window stops the run with an error
naming the epoch and iteration window, and no checkpoint is written from such weights.

Exact resume: a checkpoint (training/checkpoints.py) stores model, EMA, optimizer, grad
scaler, the step counter (the LR schedule is a pure function of it), RNG states, the epoch
and the iterations done in it, the log's length and the loss window. Data augmentation
draws from generators seeded by (seed, epoch, position), so resuming inside an epoch
continues with exactly the samples an uninterrupted run would use. Work due at an epoch
boundary (evaluation, drawn predictions) is recorded in OUT/tasks.json when done, so a
resume finishes what an interrupted run left.
"""
import json
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import data as D
from .. import ops
from ..model import RTMDet, normalize_images
from . import checkpoints as C
from .config import TrainConfig, config_to_dict
from .distributed import all_reduce_mean, any_process, broadcast_module, gather_objects, setup_distributed
from .ema import ModelEMA, unwrap
from .evaluate import evaluate, save_val_predictions
from .inputs import augment_config, load_data, resolve_augment_backend, resolve_workers, train_loader
from .interrupt import StopFlag, TrainingInterrupted, test_hook
from .logs import JsonlLog, plot_curves, progress_bar
from .optim import build_adamw
from .precision import autocast, resolve_amp, resolve_channels_last
from .schedule import lr_factor, scaled_lr
from .validate import ConfigError, validate_config

TASKS = "tasks.json"


class LossModule(nn.Module):
    """forward = model + head loss, so DistributedDataParallel sees the loss computation.
    `net` is the (optionally compiled) model; it is kept out of the module tree so the
    parameters are registered once."""

    def __init__(self, model, backend, compile=False):
        super().__init__()
        self.model, self.backend = model, backend
        self.__dict__["net"] = torch.compile(model) if compile else model

    def forward(self, images, boxes, labels, mask):
        from ..loss import head_loss
        cls_scores, bbox_preds = self.net(images)
        return head_loss(cls_scores, bbox_preds, boxes, labels, mask, strides=self.model.strides,
                         backend=self.backend)


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig):
    """Train (or resume) according to cfg; returns the last evaluation metrics (rank 0, else
    None). An interrupt (SIGINT/SIGTERM) saves a checkpoint at the next step boundary and
    raises TrainingInterrupted, whose message says how to continue."""
    validate_config(cfg)
    dinfo, device = setup_distributed(cfg.device)
    # the ops' NaN/label checks synchronise with the host on every call: off in the loop
    # (the loss window's finiteness check covers NaNs; the datasets validate labels)
    with StopFlag() as stop, ops.value_checks(False):
        trainer = Trainer(cfg, dinfo, device, stop)
        try:
            return trainer.run()
        finally:
            trainer.close()


class Trainer:
    """One run's state; `run()` goes through the epochs from wherever the run stands."""

    def __init__(self, cfg, dinfo, device, stop):
        self.cfg, self.dinfo, self.device, self.stop = cfg, dinfo, device, stop
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        if dinfo.main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed + dinfo.rank)
        self.amp = resolve_amp(cfg.amp, device)
        self.channels_last = resolve_channels_last(cfg.channels_last, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True    # fixed input size: pick the fastest convs once
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dinfo.world))
        self.user_cfg = cfg      # saved in checkpoints as given (workers None stays "auto")
        self.cfg = cfg = replace(cfg, workers=resolve_workers(cfg.workers, device, local_world),
                                 augment_backend=resolve_augment_backend(cfg.augment_backend, device))
        self.eval_cfg = replace(cfg, amp=self.amp)

        self.splits = load_data(cfg, dinfo.main)
        self.classes, self.label_to_cat = self.splits.train.classes, self.splits.train.label_to_cat
        self.train_set = D.TrainDataset(self.splits.train, cfg.img_size, augment_config(cfg, device),
                                        seed=cfg.seed)

        if cfg.sync_bn and dinfo.world > 1 and device.type != "cuda":
            raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm needs CUDA devices (this run is on "
                              f"{device.type}); leave it off")
        model = RTMDet.from_name(cfg.model, num_classes=len(self.classes)).to(device)
        if cfg.sync_bn and dinfo.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEMA(model, cfg.ema_momentum, cfg.ema_gamma)
        self.effective_batch = cfg.batch_size * dinfo.world * cfg.accumulate
        self.base_lr = scaled_lr(self.effective_batch, cfg.lr)
        self.optimizer = build_adamw(model, self.base_lr, cfg.weight_decay, device, cfg.adamw)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.loss_module = LossModule(model, cfg.backend, cfg.compile)
        if dinfo.world > 1:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)

        self.loader = train_loader(self.train_set, cfg, dinfo, device)
        self.ipe = len(self.loader) // cfg.accumulate    # optimizer steps per epoch
        if self.ipe == 0:
            need = cfg.batch_size * dinfo.world * cfg.accumulate
            raise ConfigError(f"--batch-size: {cfg.batch_size} images x {dinfo.world} process(es) x "
                              f"--accumulate {cfg.accumulate} needs at least {need} training images; "
                              f"the training set has {len(self.train_set)}")
        self.layout = {"world": dinfo.world, "batch_size": cfg.batch_size,
                       "accumulate": cfg.accumulate, "iters_per_epoch": self.ipe}
        self.log = JsonlLog(self.out / "log.jsonl", dinfo.main)
        self.writer = C.CheckpointWriter()
        self.epoch, self.it, self.step = 0, 0, 0
        self.keys, self.window, self.window_n = None, None, 0
        self.checked = (0, 0, 0)        # (epoch, it, step) of the last finite window
        self.window_time = self.window_data = 0.0
        self.metrics = None
        self.t_boundary = None
        self.saved_step = None
        self.agreed_stop = False        # DDP: the stop flag as all processes agreed at a log step

    # ------------------------------------------------------------------------- run

    def run(self):
        cfg = self.cfg
        resumed = self.resume()
        self.say(f"RTMDet-{cfg.model}: {self.dinfo.world} process(es) x batch {cfg.batch_size} x "
                 f"accumulate {cfg.accumulate} = effective batch {self.effective_batch}; lr "
                 f"{self.base_lr:.4g}{'' if cfg.lr is not None else ' (0.004 x batch / 256)'}; "
                 f"{self.ipe} steps per epoch; amp {self.amp}, channels_last {self.channels_last}, "
                 f"compile {cfg.compile}, {cfg.workers} loader workers, {cfg.augment_backend} augmentation, "
                 f"device {self.device}")
        if not resumed:
            self.log.write(type="run", effective_batch=self.effective_batch, lr=self.base_lr,
                           world=self.dinfo.world, amp=self.amp, channels_last=self.channels_last,
                           iters_per_epoch=self.ipe, augment_backend=cfg.augment_backend, time=time.time(),
                           train_data=self.splits.train.report, val_data=self.splits.val.report)
        if not resumed and self.dinfo.main:
            (self.out / TASKS).unlink(missing_ok=True)
        if resumed and self.it == 0 and self.epoch > 0:
            self.boundary_tasks(self.epoch)
        while self.epoch < cfg.epochs:
            if not self.train_epoch():
                return self.metrics        # --max-iters reached
            self.checkpoint()
            self.boundary_tasks(self.epoch)
        return self.metrics

    def close(self):
        self.writer.wait()
        self.loader.close()

    def say(self, text):
        if self.dinfo.main:
            print(text, flush=True)

    # ---------------------------------------------------------------------- epoch

    def train_epoch(self):
        """Train from (self.epoch, self.it) to the end of the epoch; False when --max-iters
        stopped the run. Raises TrainingInterrupted after saving, on an interrupt."""
        cfg, epoch = self.cfg, self.epoch
        strong = epoch < cfg.epochs - cfg.stage2_epochs
        t_start = time.perf_counter()
        batches = self.loader.epoch(epoch, strong, start_iter=self.it * cfg.accumulate)
        self.model.train()
        bar = progress_bar(cfg.progress and self.dinfo.main, self.ipe, self.it,
                           f"epoch {epoch + 1}/{cfg.epochs}")
        first_wait = None
        try:
            while self.it < self.ipe:
                if self.stop_requested(every_step=True):
                    self.interrupt()
                t0 = time.perf_counter()
                lr = self.base_lr * lr_factor(self.step, warmup_iters=cfg.warmup_iters, epochs=cfg.epochs,
                                              iters_per_epoch=self.ipe)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                data_time = 0.0
                for micro in range(cfg.accumulate):
                    td = time.perf_counter()
                    test_hook("data")
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise RuntimeError(f"the training loader ended after {self.it} of {self.ipe} "
                                           f"steps of epoch {epoch + 1}") from None
                    except Exception:
                        if self.stop.requested:      # workers hit by the same Ctrl-C
                            self.interrupt()
                        raise
                    data_time += time.perf_counter() - td
                    if micro == 0 and self.stop_requested(every_step=True):
                        self.interrupt()             # this batch is discarded whole
                    if first_wait is None:
                        first_wait = time.perf_counter() - t_start
                    self.micro_step(batch, last=micro == cfg.accumulate - 1)
                self.optimizer_step()
                self.window_time += time.perf_counter() - t0
                self.window_data += data_time
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_interval == 0 or self.it == self.ipe:
                    self.flush_log(lr, bar)
                if cfg.checkpoint_iters and self.step % cfg.checkpoint_iters == 0 and self.it < self.ipe:
                    self.checkpoint()
                if cfg.max_iters and self.step >= cfg.max_iters:
                    self.checkpoint()
                    self.writer.wait()
                    return False
        finally:
            if bar is not None:
                bar.close()
            del batches
        t_end = time.perf_counter()
        boundary = None if self.t_boundary is None else (t_start - self.t_boundary) + first_wait
        self.log.write(type="epoch", epoch=epoch + 1, step=self.step, time=time.time(),
                       epoch_time=t_end - t_start, first_batch_wait=first_wait, boundary_time=boundary)
        self.epoch, self.it = epoch + 1, 0
        self.t_boundary = t_end
        return True

    def micro_step(self, batch, last):
        """Forward + backward of one batch (gradients accumulate over --accumulate batches)."""
        cfg, dev = self.cfg, self.device
        images = batch["images"].to(dev, non_blocking=True)
        if self.channels_last:     # convert the uint8 batch (4x smaller than the float one)
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize_images(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        boxes = batch["boxes"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        sync = (self.loss_module.no_sync() if self.dinfo.world > 1 and not last
                else nullcontext())
        with sync:
            test_hook("forward")
            with autocast(self.amp, dev):
                losses = self.loss_module(images, boxes, labels, mask)
            loss = sum(losses.values())
            if cfg.accumulate > 1:
                loss = loss / cfg.accumulate
            test_hook("backward")
            self.scaler.scale(loss).backward()
        values = torch.stack([v.detach().float() for v in losses.values()]).double()
        if self.keys is None:
            self.keys = list(losses)
            self.window = torch.zeros(len(self.keys), dtype=torch.float64, device=dev)
        if cfg.accumulate > 1:
            values = values / cfg.accumulate
        self.window += values

    def optimizer_step(self):
        cfg = self.cfg
        if self.step == 0 and all(p.grad is None for p in self.model.parameters()):
            raise RuntimeError(f"the loss (backend={cfg.backend!r}) gives no gradient to any "
                               "model parameter: an op on this path lacks autograd support; "
                               "try --backend torch")
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        test_hook("optimizer")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        self.it += 1
        self.window_n += 1

    def stop_requested(self, every_step=False):
        """The interrupt flag, agreed by all processes (under DDP only where the loop
        synchronises anyway: at log intervals and checkpoints)."""
        if self.dinfo.world == 1:
            return self.stop.requested
        return self.agreed_stop if every_step else False

    # -------------------------------------------------------------------- logging

    def flush_log(self, lr, bar=None):
        """Read the loss window to the host (the only sync of the loop), check it, log it."""
        if self.window_n == 0:
            return
        n = self.window_n
        avg_t = all_reduce_mean(self.window / n, self.dinfo)
        if self.dinfo.world > 1:
            self.agreed_stop = any_process(self.stop.requested, self.device, self.dinfo)
        values = avg_t.tolist()
        self.check_finite(values)
        avg = dict(zip(self.keys, values))
        self.log.write(type="train", epoch=self.epoch + 1, iter=self.it, step=self.step, lr=lr,
                       loss=sum(avg.values()), **avg, time=time.time(),
                       iter_time=self.window_time / n, data_time=self.window_data / n)
        if bar is not None:
            bar.set_postfix(loss=f"{sum(avg.values()):.3f}", lr=f"{lr:.2e}", refresh=False)
        self.window.zero_()
        self.window_n = 0
        self.window_time = self.window_data = 0.0

    def check_finite(self, values=None):
        """Raise FloatingPointError if the loss window holds a non-finite value, naming the
        steps since the last successful check."""
        if self.window_n == 0:
            return
        if values is None:
            values = (self.window / self.window_n).tolist()
        if all(np.isfinite(values)):
            self.checked = ((self.epoch + 1, 0, self.step) if self.it == self.ipe
                            else (self.epoch, self.it, self.step))
            return
        e0, i0, s0 = self.checked
        where = (f"epoch {self.epoch + 1}, iterations {i0 + 1}-{self.it}" if e0 == self.epoch
                 else f"epoch {e0 + 1} iteration {i0 + 1} to epoch {self.epoch + 1} iteration {self.it}")
        got = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, values))
        raise FloatingPointError(
            f"non-finite loss ({got}) in {where} (steps {s0 + 1}-{self.step}); the weights "
            f"after step {s0} are not saved, {self.out / C.LAST} (if any) is the last good "
            "checkpoint; try a lower --lr or --grad-clip")

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self):
        """Save the run's state at the current step boundary (background write)."""
        if self.saved_step == (self.epoch, self.it, self.step):
            return
        self.saved_step = (self.epoch, self.it, self.step)
        self.check_finite()
        states = gather_objects(C.rng_state(), self.dinfo)
        if not self.dinfo.main:
            return
        epoch, it = (self.epoch + 1, 0) if self.it == self.ipe else (self.epoch, self.it)
        window = None if self.window is None else {
            "keys": self.keys, "sums": self.window, "n": self.window_n}
        self.writer.save(self.out / C.LAST, {
            "model": unwrap(self.model).state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": states, "epoch": epoch, "iter": it, "step": self.step,
            "config": config_to_dict(self.user_cfg), "classes": list(self.classes),
            "label_to_cat": list(self.label_to_cat), "layout": self.layout,
            "base_lr": self.base_lr, "log_bytes": self.log.size(), "log_window": window})

    def interrupt(self, during=None):
        """Save at this step boundary (if training) and raise TrainingInterrupted."""
        if during is None:
            self.checkpoint()
        self.writer.wait()
        where = (f"while {during} after epoch {self.epoch}/{self.cfg.epochs}" if during else
                 f"at epoch {self.epoch + 1}/{self.cfg.epochs}, iteration {self.it}/{self.ipe} "
                 f"(step {self.step})")
        raise TrainingInterrupted(
            f"interrupted {where}: saved {self.out / C.LAST}; continue with --resume auto "
            f"--out {self.out} (or --resume {self.out / C.LAST})")

    def resume(self):
        """Load the checkpoint cfg.resume names ("auto": OUT/last.pth, else prev.pth); False
        for a fresh start."""
        cfg = self.cfg
        path, ck = C.find_resume(cfg.resume, self.out, log=self.say)
        if ck is None:
            return False
        saved = ck["config"]
        if saved.get("model") != cfg.model:
            raise ConfigError(f"--model {cfg.model}: checkpoint {path} is of RTMDet-{saved.get('model')}; "
                              f"resume with --model {saved.get('model')} or start a new --out")
        if list(ck["classes"]) != list(self.classes):
            raise D.DatasetError(f"the dataset's classes {self.classes} differ from those of checkpoint "
                                 f"{path} {list(ck['classes'])} (names or order); resuming would "
                                 "permute the class outputs")
        unwrap(self.model).load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        C.set_rng_state(ck["rng"][min(self.dinfo.rank, len(ck["rng"]) - 1)])
        self.epoch, self.it, self.step = int(ck["epoch"]), int(ck["iter"]), int(ck["step"])
        self.saved_step = self.checked = (self.epoch, self.it, self.step)
        tasks = self.read_tasks()
        if self.dinfo.main:   # drop records written after the state we continue from
            done_at = tasks.get("step") == self.step and self.it == 0
            self.log.truncate(int(tasks["log_bytes"] if done_at else ck["log_bytes"]))
        old = ck["layout"]
        if old != self.layout:
            # another world size / batch: keep the epoch, the fraction of it done and the
            # schedule position; the loss window restarts
            frac = self.it / old["iters_per_epoch"]
            self.it = min(round(frac * self.ipe), self.ipe - 1) if self.it else 0
            self.step = self.epoch * self.ipe + self.it
            self.say(f"note: checkpoint layout {old} differs from this run's {self.layout}: "
                     f"continuing at epoch {self.epoch + 1}, iteration {self.it}, step {self.step}")
        elif ck.get("log_window"):
            w = ck["log_window"]
            self.keys, self.window_n = list(w["keys"]), int(w["n"])
            self.window = w["sums"].to(self.device, torch.float64)
        self.say(f"resumed from {path}: epoch {self.epoch + 1}, iteration {self.it}, step {self.step}")
        if self.dinfo.main:
            self.log.write(type="resume", checkpoint=str(path), epoch=self.epoch, iter=self.it,
                           step=self.step, time=time.time())
        return True

    # ------------------------------------------------------------ boundary tasks

    def boundary_tasks(self, epoch):
        """Evaluation / drawn predictions due after `epoch` (1-based) epochs, those not done yet."""
        cfg = self.cfg
        last = epoch == cfg.epochs
        due = []
        if cfg.eval_interval and (epoch % cfg.eval_interval == 0 or last):
            due.append("eval")
        if last and cfg.save_predictions:
            due.append("predictions")
        tasks = self.read_tasks()
        done = tasks["done"] if tasks.get("step") == self.step else []
        if tasks.get("metrics") is not None and tasks.get("step") == self.step:
            self.metrics = tasks["metrics"]
        # Evaluation and drawing read the in-memory EMA model, not last.pth: they (and, with no
        # task due, the next epoch) run while this boundary's checkpoint is written. Only
        # recording a task as done waits for the write: were tasks.json to mark step S done
        # while last.pth is older, a crash then a resume would start from the older checkpoint,
        # truncate the log to it and skip the task at S, its log record lost.
        for task in due:
            if task in done:
                continue
            if task == "eval":
                self.run_eval(epoch)
            elif self.dinfo.main:
                save_val_predictions(self.ema.module, self.splits.val, self.eval_cfg, self.device,
                                     self.out / "predictions", self.classes,
                                     should_stop=lambda: self.check_stop("drawing predictions"))
            done.append(task)
            self.writer.wait()
            self.write_tasks({"step": self.step, "epoch": epoch, "done": done, "metrics": self.metrics,
                              "log_bytes": self.log.size()})
        if self.dinfo.main and (last or "eval" in due):
            plot_curves(self.out / "log.jsonl", self.out / "curves.png")

    def run_eval(self, epoch):
        t0 = time.time()
        broadcast_module(self.ema.module, self.dinfo)
        metrics = evaluate(self.ema.module, self.splits.val, self.splits.val_ann, self.eval_cfg,
                           self.device, self.dinfo, out_dir=self.out, verbose=self.dinfo.main,
                           should_stop=lambda: self.check_stop("evaluating"),
                           channels_last=self.channels_last)
        if self.dinfo.main:
            self.metrics = metrics
            self.log.write(type="val", epoch=epoch, step=self.step, time=time.time(),
                           eval_time=time.time() - t0, **metrics)
            print(f"epoch {epoch}: bbox_mAP {metrics['bbox_mAP']:.4f} "
                  f"(mAP_50 {metrics['bbox_mAP_50']:.4f}) in {time.time() - t0:.1f}s", flush=True)

    def check_stop(self, during):
        if self.dinfo.world == 1 and self.stop.requested:
            self.interrupt(during=during)

    def read_tasks(self):
        path = self.out / TASKS
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def write_tasks(self, record):
        if self.dinfo.main:
            tmp = self.out / (TASKS + ".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.out / TASKS)


