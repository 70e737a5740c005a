"""`check_images`: decode every image of a dataset up front (`--check-data`), so that a
corrupt or missing image is reported before training, not at the first epoch or evaluation."""
import torch
from tqdm import tqdm

from .sample import DatasetError


def _base(dataset):
    """The `CocoDetection` under a TrainDataset / EvalDataset view."""
    while hasattr(dataset, "base"):
        dataset = dataset.base
    return dataset


class _Decode(torch.utils.data.Dataset):
    """Item i: None if image i decodes (at the size its entry says), else the problem line."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            self.base.load_image(i)
        except DatasetError as e:
            return str(e)
        return None


def _first(items):
    return items[0]


def check_images(dataset, workers=0, desc="checking images"):
    """Decode every image of `dataset` (a CocoDetection or a view of one) with a progress
    bar; returns one line per problem (the file, its entry and why), empty if all are fine."""
    base = _base(dataset)
    loader = torch.utils.data.DataLoader(_Decode(base), batch_size=1, num_workers=workers,
                                         collate_fn=_first)
    problems = []
    with tqdm(loader, total=len(base), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for problem in bar:
            if problem is not None:
                problems.append(problem)
                bar.set_postfix(problems=len(problems))
    return problems
