"""Command line: `python -m rtmdet {train,eval,predict,bench,info}` (also `rtmdet ...`).

Datasets (`--data`): `synthetic` (built in, generated on first use into
$RTMDET_CACHE or ~/.cache/rtmdet) or a folder PATH holding
`annotations/instances_train.json`, `annotations/instances_val.json` and the image
folders `train/` and `val/` (COCO `file_name`s are relative to them). Instead of PATH,
give `--train-ann --train-images --val-ann --val-images` explicitly.
"""
import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

SIZES = ("tiny", "s", "m", "l", "x")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _data_args(p, *, train=True):
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (built-in set) or a dataset folder PATH with "
                        "annotations/instances_{train,val}.json and {train,val}/ images")
    if train:
        p.add_argument("--train-ann", help="COCO instances json of the training set (overrides --data)")
        p.add_argument("--train-images", help="image folder of the training set")
    p.add_argument("--val-ann", help="COCO instances json of the validation set (overrides --data)")
    p.add_argument("--val-images", help="image folder of the validation set")
    p.add_argument("--num-train-images", type=int, help="synthetic set: training images (default 2000)")
    p.add_argument("--num-val-images", type=int, help="synthetic set: validation images (default 200)")


def _common(p):
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (0: main process)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="mixed precision")


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
    t.add_argument("--max-images", type=int, help="use only the first N training images")
    t.add_argument("--epochs", type=int, help="epochs (default 300)")
    t.add_argument("--stage2-epochs", type=int, help="last epochs without Mosaic/MixUp (default 20)")
    t.add_argument("--batch-size", type=int, help="images per process and step (default 32)")
    t.add_argument("--img-size", type=int, help="square input size (default 640)")
    t.add_argument("--lr", type=float, help="base LR (default 0.004 x total batch / 256)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    t.add_argument("--warmup-iters", type=int, help="linear warm-up iterations (default 1000)")
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    t.add_argument("--eval-interval", type=int, help="evaluate the EMA model every N epochs (0: never)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--out", help="output folder (default runs/train)")
    t.add_argument("--resume", help="checkpoint to resume from exactly, or 'auto' (OUT/last.pth if present)")
    t.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    t.add_argument("--log-interval", type=int, help="log every N iterations (default 50)")
    t.add_argument("--checkpoint-iters", type=int, help="also checkpoint every N iterations")
    t.add_argument("--max-iters", type=int, help="stop after N iterations in total (with a checkpoint)")
    t.add_argument("--mosaic-prob", type=float, help="Mosaic probability in stage 1 (default 1.0)")
    t.add_argument("--mixup-prob", type=float, help="MixUp probability in stage 1 (default 0.5)")
    t.add_argument("--save-predictions", type=int, help="val images to draw with predictions at the end")
    t.add_argument("--backend", choices=("auto", "torch", "triton", "cpp", "cuda"),
                   help="op backend for the assigner and losses (default auto)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    e = sub.add_parser("eval", help="COCO evaluation of a checkpoint; writes OUT/metrics.json")
    e.add_argument("checkpoint", help="checkpoint (.pth) written by `rtmdet train`")
    _data_args(e, train=False)
    _common(e)
    e.add_argument("--img-size", type=int, help="input size (default: the training size)")
    e.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    e.add_argument("--score-thr", type=float, default=0.001, help="score threshold (default 0.001)")
    e.add_argument("--nms-pre", type=int, default=30000, help="top-k before NMS (default 30000)")
    e.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    e.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")

    p = sub.add_parser("predict", help="detect objects in images; writes drawn images and detections.json")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by `rtmdet train`")
    p.add_argument("images", nargs="+", help="image files or folders")
    _common(p)
    p.add_argument("--img-size", type=int, help="input size (default: the training size)")
    p.add_argument("--score-thr", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")

    b = sub.add_parser("bench", help="time training steps and inference of a model")
    b.add_argument("--model", choices=SIZES, default="tiny", help="model size (default tiny)")
    b.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    b.add_argument("--img-size", type=int, default=640, help="input size (default 640)")
    b.add_argument("--num-classes", type=int, default=80, help="classes (default 80)")
    b.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
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


def _device(arg):
    import torch
    if arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def cmd_train(args):
    from .train import train
    cfg = _train_config(args)
    t0 = time.time()
    metrics = train(cfg)
    if metrics is not None:
        print(f"done in {time.time() - t0:.0f}s: bbox_mAP {metrics['bbox_mAP']:.4f}; "
              f"outputs in {cfg.out}")
    return 0


def cmd_eval(args):
    import torch
    from . import data as D
    from .train import DistInfo, evaluate, load_data, model_from_checkpoint
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, classes, _ = model_from_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    cfg.data, cfg.device = args.data, str(device)
    for k in ("val_ann", "val_images", "num_val_images", "img_size", "batch_size", "workers", "amp"):
        if getattr(args, k, None) is not None:
            setattr(cfg, k, getattr(args, k))
    if args.val_ann or args.val_images:
        if not (args.val_ann and args.val_images):
            raise D.DatasetError("give both --val-ann and --val-images")
        val, ann = D.CocoDetection(args.val_ann, args.val_images), Path(args.val_ann)
    else:
        if cfg.data == "synthetic":
            cfg.train_ann = cfg.train_images = None
            cfg.val_ann = cfg.val_images = None
        splits = _val_only(cfg)
        val, ann = splits
    if val.classes != classes:
        raise D.DatasetError(f"categories of {ann} {val.classes} differ from the checkpoint's {classes}")
    cfg.eval_score_thr, cfg.eval_nms_pre = args.score_thr, args.nms_pre
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    metrics = evaluate(model, val, ann, cfg, device, DistInfo(), out_dir=out)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'}")
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
    results = []
    for f in files:
        image = D.read_image(f)
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
    print(f"wrote {len(files)} images and {out / 'detections.json'}")
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
    from .data import DatasetError
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
               "bench": cmd_bench, "info": cmd_info}[args.command]
    try:
        return command(args)
    except (DatasetError, FileNotFoundError) as e:
        print(f"rtmdet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if "checkpoint" in str(e):
            print(f"rtmdet {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
