"""Command line: `python -m rtmdet {train,eval,predict,bench,info}` (also `rtmdet ...`).

Datasets (`--data`): `synthetic` (built in, generated on first use into
$RTMDET_CACHE or ~/.cache/rtmdet) or a folder PATH holding
`annotations/instances_train.json`, `annotations/instances_val.json` and the image
folders `train/` and `val/` (COCO `file_name`s are relative to them). Instead of PATH,
give `--train-ann --train-images --val-ann --val-images` explicitly.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

SIZES = ("tiny", "s", "m", "l", "x")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _int_type(minimum, multiple=1, what=None):
    """argparse type: an int >= minimum (and a multiple of `multiple`); bad values exit 2."""
    what = what or (f"an integer >= {minimum}" if minimum != 1 else "a positive integer")

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum or v % multiple:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


def _float_type(low=None, high=None, low_open=False, what="a number"):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or (low is not None and (v < low or (low_open and v == low))) or \
                (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


POSITIVE = _int_type(1)
NONNEG = _int_type(0)
IMG_SIZE = _int_type(32, 32, "a positive multiple of 32 (the largest stride)")
PROB = _float_type(0.0, 1.0, what="a number in [0, 1]")
POSITIVE_FLOAT = _float_type(0.0, low_open=True, what="a positive number")
NONNEG_FLOAT = _float_type(0.0, what="a number >= 0")


def _data_args(p, *, train=True):
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (built-in set) or a dataset folder PATH with "
                        "annotations/instances_{train,val}.json and {train,val}/ images")
    if train:
        p.add_argument("--train-ann", help="COCO instances json of the training set (overrides --data)")
        p.add_argument("--train-images", help="image folder of the training set")
    p.add_argument("--val-ann", help="COCO instances json of the validation set (overrides --data)")
    p.add_argument("--val-images", help="image folder of the validation set")
    p.add_argument("--num-train-images", type=POSITIVE, help="synthetic set: training images (default 2000)")
    p.add_argument("--num-val-images", type=POSITIVE, help="synthetic set: validation images (default 200)")


def _common(p):
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=NONNEG, default=None, help="DataLoader worker processes (0: main process)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=None,
                   help="mixed precision (default auto: bf16 on a CUDA GPU that supports it, none on the CPU)")


def build_parser():
    from .train import PRESETS
    parser = argparse.ArgumentParser(prog="rtmdet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a detector (single process, or torchrun for several GPUs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", choices=SIZES, default=None, help="model size (default tiny)")
    t.add_argument("--preset", choices=sorted(PRESETS), help="named settings (explicit options win); "
                   "cpu-demo: RTMDet-tiny on the built-in set in < 15 min on 2 CPU cores")
    _data_args(t)
    _common(t)
    t.add_argument("--max-images", type=POSITIVE, help="use only the first N training images")
    t.add_argument("--epochs", type=POSITIVE, help="epochs (default 300)")
    t.add_argument("--stage2-epochs", type=NONNEG, help="last epochs without Mosaic/MixUp (default 20)")
    t.add_argument("--batch-size", type=POSITIVE, help="images per process and micro-batch (default 32)")
    t.add_argument("--accumulate", type=POSITIVE, help="micro-batches per optimizer step (gradient "
                   "accumulation; the effective batch and the LR scale with it; default 1)")
    t.add_argument("--img-size", type=IMG_SIZE, help="square input size, a multiple of 32 (default 640)")
    t.add_argument("--lr", type=POSITIVE_FLOAT, help="base LR (default 0.004 x effective batch / 256)")
    t.add_argument("--weight-decay", type=NONNEG_FLOAT, help="AdamW weight decay (default 0.05)")
    t.add_argument("--warmup-iters", type=NONNEG, help="linear warm-up optimizer steps (default 1000)")
    t.add_argument("--grad-clip", type=POSITIVE_FLOAT, help="clip the gradient norm to this value")
    t.add_argument("--eval-interval", type=NONNEG, help="evaluate the EMA model every N epochs (0: never)")
    t.add_argument("--seed", type=NONNEG, help="random seed (default 0)")
    t.add_argument("--out", help="output folder (default runs/train)")
    t.add_argument("--resume", help="checkpoint to resume from exactly, or 'auto' (OUT/last.pth, or "
                   "OUT/prev.pth when last.pth is corrupt; a fresh start when neither exists)")
    t.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    t.add_argument("--log-interval", type=POSITIVE, help="log (and check the loss is finite) every N "
                   "steps (default 50)")
    t.add_argument("--checkpoint-iters", type=POSITIVE, help="also checkpoint every N optimizer steps")
    t.add_argument("--max-iters", type=POSITIVE, help="stop after N optimizer steps in total (with a checkpoint)")
    t.add_argument("--mosaic-prob", type=PROB, help="Mosaic probability in stage 1 (default 1.0)")
    t.add_argument("--mixup-prob", type=PROB, help="MixUp probability in stage 1 (default 0.5)")
    t.add_argument("--augment-backend", choices=("auto", "pil", "cv2"),
                   help="image resampling and HSV of the augmentations (default auto: cv2 on CUDA "
                        "where OpenCV is installed, about 8x faster a worker, else pil, the "
                        "reference numerics that keep CPU runs bitwise reproducible)")
    t.add_argument("--save-predictions", type=NONNEG, help="val images to draw with predictions at the end")
    t.add_argument("--backend", choices=("auto", "torch", "triton", "cpp", "cuda"),
                   help="op backend for the assigner and losses (default auto)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on CUDA only)")
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    t.add_argument("--adamw", choices=("auto", "fused", "foreach", "for-loop"),
                   help="AdamW implementation (default auto: fused on CUDA, PyTorch's default on the CPU)")
    t.add_argument("--prefetch-factor", type=POSITIVE, help="batches each loader worker prepares ahead (default 4)")
    t.add_argument("--check-data", action="store_true",
                   help="decode every training and validation image first and stop if any is unreadable")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    e = sub.add_parser("eval", help="COCO evaluation of a checkpoint; writes OUT/metrics.json")
    e.add_argument("checkpoint", help="checkpoint (.pth) written by `rtmdet train`")
    _data_args(e, train=False)
    _common(e)
    e.add_argument("--img-size", type=IMG_SIZE, help="input size, a multiple of 32 (default: the training size)")
    e.add_argument("--batch-size", type=POSITIVE, default=8, help="images per batch (default 8)")
    e.add_argument("--score-thr", type=PROB, default=0.001, help="score threshold (default 0.001)")
    e.add_argument("--nms-pre", type=POSITIVE, default=30000, help="top-k before NMS (default 30000)")
    e.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    e.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_FOLDER/eval)")
    e.add_argument("--overwrite", action="store_true",
                   help="allow writing metrics.json/detections.json into a training run's folder")

    p = sub.add_parser("predict", help="detect objects in images; writes drawn images and detections.json")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by `rtmdet train`")
    p.add_argument("images", nargs="+", help="image files or folders")
    _common(p)
    p.add_argument("--img-size", type=IMG_SIZE, help="input size, a multiple of 32 (default: the training size)")
    p.add_argument("--score-thr", type=PROB, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")

    b = sub.add_parser("bench", help="time training steps and inference of a model")
    b.add_argument("--model", choices=SIZES, default="tiny", help="model size (default tiny)")
    b.add_argument("--batch-size", type=POSITIVE, default=8, help="batch size (default 8)")
    b.add_argument("--img-size", type=IMG_SIZE, default=640, help="input size, a multiple of 32 (default 640)")
    b.add_argument("--num-classes", type=POSITIVE, default=80, help="classes (default 80)")
    b.add_argument("--steps", type=POSITIVE, default=5, help="timed steps (default 5)")
    b.add_argument("--warmup", type=NONNEG, default=2, help="untimed steps first (default 2)")
    b.add_argument("--backend", default="auto", help="op backend (default auto)")
    _common(b)

    sub.add_parser("info", help="print versions and the available op backends")
    return parser


def _train_config(args):
    from .train import PRESETS, TrainConfig
    values = dict(PRESETS[args.preset]) if args.preset else {}
    names = {f.name for f in fields(TrainConfig)}
    for k, v in vars(args).items():
        if k in names and v is not None:
            values[k] = v
    if args.no_progress:
        values["progress"] = False
    return TrainConfig(**values)


class UsageError(ValueError):
    """A bad argument found after parsing (printed argparse style, exit code 2)."""


def _device(arg):
    from .training.distributed import resolve_device
    try:
        return resolve_device(arg)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_train(args):
    from .train import ConfigError, train, validate_config
    cfg = _train_config(args)
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.check_data:
        _check_data(cfg)
    t0 = time.time()
    metrics = train(cfg)
    if metrics is not None:
        print(f"done in {time.time() - t0:.0f}s: bbox_mAP {metrics['bbox_mAP']:.4f}; "
              f"outputs in {cfg.out}")
    return 0


def _check_data(cfg):
    """--check-data: decode every image of both splits; any problem stops the run."""
    from . import data as D
    from .train import load_data
    from .training.inputs import resolve_workers
    if not hasattr(D, "check_images"):
        raise UsageError("--check-data: this version of rtmdet.data has no check_images")
    splits = load_data(cfg)
    problems = []
    for name, ds in (("train", splits.train), ("val", splits.val)):
        found = D.check_images(ds, workers=resolve_workers(cfg.workers, _device(cfg.device)))
        print(f"--check-data: {len(ds)} {name} images, {len(found)} problem(s)")
        problems += found
    if problems:
        raise D.DatasetError(f"{len(problems)} unreadable image(s): " + "; ".join(problems[:10]) +
                             (" ..." if len(problems) > 10 else ""))


def _eval_out(args):
    """Where eval writes: --out, else CHECKPOINT_FOLDER/eval. A training run's folder (it holds
    log.jsonl) is refused without --overwrite, so its metrics.json is never replaced by accident."""
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    if (out / "log.jsonl").is_file() and (out / "metrics.json").is_file() and not args.overwrite:
        raise UsageError(f"--out {out} is a training run's folder: its metrics.json and "
                         "detections.json would be replaced; give another --out or --overwrite")
    return out


def cmd_eval(args):
    import torch
    from . import data as D
    from .train import DistInfo, evaluate, model_from_checkpoint
    device = _device(args.device)
    out = _eval_out(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, classes, _ = model_from_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    cfg.data, cfg.device = args.data, str(device)
    for k in ("val_ann", "val_images", "num_val_images", "img_size", "batch_size", "workers", "amp"):
        if getattr(args, k, None) is not None:
            setattr(cfg, k, getattr(args, k))
    if args.val_ann or args.val_images:
        if not (args.val_ann and args.val_images):
            raise UsageError("give both --val-ann and --val-images")
        val, ann = D.CocoDetection(args.val_ann, args.val_images), Path(args.val_ann)
    else:
        if cfg.data == "synthetic":
            cfg.train_ann = cfg.train_images = None
            cfg.val_ann = cfg.val_images = None
        val, ann = _val_only(cfg)
    if val.classes != classes:
        raise D.DatasetError(f"categories of {ann} {val.classes} differ from the checkpoint's {classes}")
    cfg.eval_score_thr, cfg.eval_nms_pre = args.score_thr, args.nms_pre
    metrics = evaluate(model, val, ann, cfg, device, DistInfo(), out_dir=out)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'} and {out / 'detections.json'}")
    return 0


def _val_only(cfg):
    from . import data as D
    if cfg.data == "synthetic":
        from .train import synthetic_root
        root = synthetic_root(cfg)
        D.ensure_synthetic(root, cfg.num_train_images, cfg.num_val_images,
                           size=cfg.synthetic_size, params=cfg.synthetic)
    else:
        root = cfg.data
    ann, img = D.dataset_paths(root, "val")
    return D.CocoDetection(ann, img), ann


def _image_files(items):
    from .data import DatasetError
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"image file not found: {p}")
    if not files:
        raise DatasetError(f"no images found in {', '.join(items)}")
    return files


def cmd_predict(args):
    """Detect objects in every image; an unreadable image is reported (stderr and an "error"
    entry in detections.json) and the others are still written; exit code 2 if any failed."""
    import numpy as np
    import torch
    from . import data as D
    from .evaluation import draw_detections
    from .model import normalize_images
    from .train import model_from_checkpoint
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = _image_files(args.images)
    model, cfg, classes, label_to_cat = model_from_checkpoint(args.checkpoint, device,
                                                              use_ema=not args.no_ema)
    size = args.img_size or cfg.img_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for f in files:
        try:
            image = D.read_image(f)
        except (D.DatasetError, OSError, ValueError) as e:
            print(f"rtmdet predict: error: {e}", file=sys.stderr)
            failed.append(str(f))
            results.append({"file": str(f), "error": str(e), "detections": []})
            continue
        h, w = image.shape[:2]
        smp = D.pad(D.rescale(D.Sample(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
                              size, size), size, size)
        nh, nw = D.rescale_size(h, w, size)
        x = torch.from_numpy(np.array(smp.image)).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            r = model.predict(normalize_images(x), scale_factors=torch.tensor([[nw / w, nh / h]], device=device),
                              score_thr=args.score_thr)[0]
        draw_detections(image, r, classes).save(out / f"{f.stem}.png")
        results.append({"file": str(f), "detections": [
            {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4),
             "label": int(lab), "class": classes[int(lab)], "category_id": label_to_cat[int(lab)]}
            for b, s, lab in zip(r["boxes"].tolist(), r["scores"].tolist(), r["labels"].tolist())]})
        print(f"{f}: {len(results[-1]['detections'])} detections")
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {len(files) - len(failed)} images and {out / 'detections.json'}")
    if failed:
        print(f"rtmdet predict: error: {len(failed)} of {len(files)} image(s) unreadable: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args):
    import torch
    from .model import RTMDet, normalize_images
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = RTMDet.from_name(args.model, num_classes=args.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s = args.batch_size, args.img_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, s, s), generator=gen, dtype=torch.uint8).to(device)
    xy = torch.rand(b, 10, 2, generator=gen) * s * 0.7
    wh = torch.rand(b, 10, 2, generator=gen) * s * 0.3 + 4
    targets = {"boxes": torch.cat([xy, xy + wh], -1).to(device),
               "labels": torch.randint(0, args.num_classes, (b, 10), generator=gen).to(device),
               "mask": torch.ones(b, 10, dtype=torch.bool, device=device)}
    x = normalize_images(images)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                            enabled=args.amp in ("bf16", "fp16")):
            loss = sum(model.loss(x, targets, backend=args.backend).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad():
            model.predict(x)

    for name, fn in (("train step", train_step), ("inference", infer)):
        model.train(name == "train step")
        for _ in range(args.warmup):
            fn()
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        print(f"{name}: RTMDet-{args.model} batch {b} at {s}x{s} on {device}: median {med * 1e3:.1f} ms "
              f"({b / med:.1f} images/s; min {times[0] * 1e3:.1f} ms)")
    return 0


def cmd_info(args):
    import torch
    from . import __version__, ops
    print(f"rtmdet {__version__}, torch {torch.__version__}")
    for k, v in ops.backend_info().items():
        print(f"  {k}: {v}")
    return 0


def main(argv=None):
    """Exit codes: 0 done, 2 bad arguments / data / checkpoint (one line on stderr), 130
    interrupted (a checkpoint was saved; the message says how to continue)."""
    from .data import DatasetError
    from .train import CheckpointError, ConfigError, TrainingInterrupted
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
               "bench": cmd_bench, "info": cmd_info}[args.command]
    try:
        return command(args)
    except UsageError as e:
        sub = _subparsers(parser)[args.command]
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError, CheckpointError, ConfigError) as e:
        print(f"rtmdet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"rtmdet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":     # once under torchrun
            print(f"\nrtmdet {args.command}: {e}", file=sys.stderr)
        return 130


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


if __name__ == "__main__":
    sys.exit(main())
