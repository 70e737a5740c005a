"""What a run writes for people: log.jsonl (one JSON record a line), curves.png, progress bars."""
import json
import os
from pathlib import Path


class JsonlLog:
    """Appends records to `path` (rank 0 only). `size()` is saved in checkpoints and
    `truncate(size)` on resume drops records written after that checkpoint, so a resumed
    run's log equals an uninterrupted run's."""

    def __init__(self, path, enabled):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def size(self):
        return self.path.stat().st_size if self.enabled and self.path.is_file() else 0

    def truncate(self, size):
        if self.enabled and self.path.is_file() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(log_path, png_path):
    """Loss (per logged step) and bbox mAP (per evaluation) curves from a log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = read_log(log_path) if Path(log_path).is_file() else []
    tr = [r for r in recs if r.get("type") == "train"]
    va = [r for r in recs if r.get("type") == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "loss_cls", "loss_bbox"):
        a.plot([r["step"] for r in tr], [r.get(key, float("nan")) for r in tr], label=key)
    a.set_xlabel("iteration (optimizer step)")
    a.set_ylabel("loss (mean over the log interval)")
    a.set_title("training loss")
    a.legend()
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
        b.plot([r["epoch"] for r in va], [r[key] for r in va], marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("COCO bbox mAP")
    b.set_ylim(0.0, 1.0)
    b.set_title("validation (EMA model)")
    b.legend()
    fig.tight_layout()
    tmp = Path(str(png_path) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def progress_bar(enabled, total, initial, desc):
    """A tqdm bar, or None when progress is off (non-main ranks, --no-progress)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, mininterval=2.0, dynamic_ncols=True)
