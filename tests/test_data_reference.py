"""The "pil" augmentation backend's outputs stay bitwise equal to those of the code before
the data package split and its speed-ups (hashes in tests/data/pipeline_reference.json, written
by `python tests/test_data_reference.py --write` from the original `rtmdet/data.py`).

The inputs are in-memory numpy images (no JPEG decoding), so the hashes depend only on the
transforms. Regenerate only for a deliberate change of numerics, and say why in the commit.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from rtmdet import data as D

REFERENCE = Path(__file__).parent / "data" / "pipeline_reference.json"
SIZES = [(320, 320), (200, 300), (131, 97), (480, 360), (64, 80), (320, 240)]


class ArrayBase:
    """A stand-in for CocoDetection: smooth random images with random boxes, from a seed."""

    def __init__(self, n=12, seed=0):
        self.samples = []
        rng = np.random.default_rng(seed)
        for i in range(n):
            h, w = SIZES[i % len(SIZES)]
            low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
            img = np.repeat(np.repeat(low, 8, 0), 8, 1)[:h, :w]
            img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
            g = int(rng.integers(0, 6))
            xy = rng.uniform(0, 1, (g, 2)) * [w, h]
            wh = rng.uniform(0.02, 0.6, (g, 2)) * [w, h]
            boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
            self.samples.append(D.Sample(img, boxes, rng.integers(0, 5, g).astype(np.int64),
                                         {"image_id": i + 1, "ori_size": (h, w)}))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i].copy()


def _digest(sample):
    h = hashlib.sha256()
    for a in (sample.image, np.asarray(sample.boxes, np.float32), np.asarray(sample.labels, np.int64)):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


def digests():
    """Name -> digest of every case: training samples (both stages, 3 epochs, 2 sizes),
    eval samples, and single transforms (resize up/down, HSV) with fixed seeds."""
    base = ArrayBase()
    out = {}
    pil = {"backend": "pil"}
    for size, aug in ((128, D.AugmentConfig(**pil)), (96, D.AugmentConfig.for_model("m", **pil))):
        ds = D.TrainDataset(base, size, aug=aug, seed=5)
        for epoch in range(3):
            for strong in (True, False):
                ds.set_epoch(epoch, strong)
                for pos in range(len(ds)):
                    out[f"train{size}/e{epoch}/{int(strong)}/{pos}"] = _digest(ds[pos])
    ev = D.EvalDataset(base, 160, backend="pil")
    for i in range(len(ev)):
        out[f"eval160/{i}"] = _digest(ev[i])
    for i in range(len(base)):
        s = base[i]
        out[f"resize/{i}"] = _digest(D.resize(s, 157, 93))
        out[f"rescale_up/{i}"] = _digest(D.rescale(s, 640, 640))
        for seed in range(4):
            out[f"hsv/{i}/{seed}"] = _digest(D.hsv_jitter(s, np.random.default_rng(seed)))
    return out


def test_pipeline_outputs_match_the_reference():
    want = json.loads(REFERENCE.read_text())
    got = digests()
    assert got.keys() == want.keys()
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"{len(bad)} of {len(want)} outputs changed, e.g. {bad[:5]}"


if __name__ == "__main__" and "--write" in sys.argv:
    REFERENCE.write_text(json.dumps(digests(), indent=0, sort_keys=True))
    print(f"wrote {REFERENCE}")
