"""Datasets, augmentations, batching and checks for RTMDet training.

Dataset folder format (`--data PATH`)::

    PATH/annotations/instances_train.json   COCO instances json
    PATH/annotations/instances_val.json
    PATH/train/...                          images, `file_name` relative to this folder
    PATH/val/...

Images are RGB uint8 arrays (H, W, 3); boxes are float32 (G, 4) xyxy in image pixels;
labels are int64 (G,) contiguous in [0, C) (COCO category ids sorted ascending).

The built-in synthetic set (`--data synthetic`) is generated once from a fixed seed into
`$RTMDET_CACHE` (default `~/.cache/rtmdet`)/synthetic-v1, in the same folder format (a
preset's easier variant, `SyntheticParams`, into synthetic-v1-<hash of its settings>).
Its images are generated at a native size of 320 px with objects of about 4 to 100 px:
RTMDet's 8 to 200 px on a 640 image, at half scale.

Training augmentation follows RTMDet (SPEC section 5). Stage 1: Mosaic -> random resize
(scale 2S, ratio range) -> random crop S -> HSV jitter -> flip 0.5 -> pad S with 114 ->
MixUp (prob 0.5). Stage 2 (last `stage2` epochs): random resize (scale S) -> random crop
-> HSV -> flip -> pad. `datasets.py` says how the Mosaic/MixUp caches and the random draws
work, `transforms.py` what the "cv2" and "pil" backends compute.

Files: `coco.py` (reading + validation), `synthetic.py` (the built-in set), `transforms.py`,
`datasets.py` (TrainDataset, EvalDataset), `loader.py` (sampler, collate, TrainLoader),
`checks.py` (check_images), `sample.py` (Sample, DatasetError).
"""

from .checks import check_images
from .coco import CocoDetection, dataset_paths, read_image
from .datasets import AugmentConfig, EvalDataset, TrainDataset
from .loader import EpochKeySampler, LoadFailure, PositionSampler, TrainLoader, collate, eval_batches
from .sample import PAD_VALUE, DatasetError, Sample
from .synthetic import (SYNTHETIC_CLASSES, SYNTHETIC_VERSION, SyntheticParams, default_cache_dir,
                        ensure_synthetic, synthetic_image, synthetic_root, write_synthetic_split)
from .transforms import (BACKENDS, crop, hflip, hsv_jitter, mixup, mosaic, pad, random_crop, random_resize,
                         random_resize_crop, rescale, rescale_size, resize, resolve_backend)
