"""The record every data stage passes on (`Sample`), the data error type, the pad value."""
from dataclasses import dataclass, field

import numpy as np

PAD_VALUE = 114


@dataclass
class Sample:
    """One image and its gts: image (H, W, 3) uint8 RGB, boxes (G, 4) float32 xyxy, labels (G,)."""
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def copy(self):
        return Sample(self.image.copy(), self.boxes.copy(), self.labels.copy(), dict(self.meta))


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or unreadable; the message names the file."""
