"""The persistent TrainLoader gives bitwise the batches of the old per-epoch DataLoader."""
import numpy as np
import pytest
import torch

from rtmdet import data as D


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    D.write_synthetic_split(root, "train", 22, seed=4, size=96)
    return D.CocoDetection(*D.dataset_paths(root, "train"))


def _old_epoch(train_set, epoch, strong, start_iter, batch_size, rank=0, world=1, workers=0):
    """What the trainer did before TrainLoader: a new DataLoader every epoch."""
    train_set.set_epoch(epoch, strong)
    sampler = D.PositionSampler(len(train_set), rank, world, skip=start_iter * batch_size,
                                batch_size=batch_size)
    return list(torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                            num_workers=workers, collate_fn=D.collate, drop_last=True))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# epochs 0-2 stage 1, 3-5 stage 2 (the switch), epoch 2 resumed at batch 2 of 5 (a restart),
# then epochs in order from one stream; epoch 5 starts mid-way (a restart)
PLAN = [(0, True, 0), (2, True, 2), (3, False, 0), (4, False, 0), (5, False, 1)]


@pytest.mark.parametrize("workers,rank,world,strong_epochs", [(2, 0, 1, 3), (2, 0, 1, None), (0, 1, 2, None)])
def test_persistent_loader_matches_per_epoch_loader(base, workers, rank, world, strong_epochs):
    aug = D.AugmentConfig(mosaic_cache=6, mixup_cache=3)
    old_set = D.TrainDataset(base, 64, aug=aug, seed=11)
    new_set = D.TrainDataset(base, 64, aug=aug, seed=11)
    with D.TrainLoader(new_set, batch_size=2 if world > 1 else 4, rank=rank, world=world,
                       workers=workers, seed=0, prefetch_factor=2, strong_epochs=strong_epochs) as loader:
        assert len(loader) == (22 // world) // loader.batch_size
        for epoch, strong, start in PLAN:
            got = list(loader.epoch(epoch, strong, start_iter=start))
            want = _old_epoch(old_set, epoch, strong, start, loader.batch_size, rank, world)
            assert len(got) == len(loader) - start
            _assert_same(got, want)
            assert got[0]["images"].dtype == torch.uint8 and got[0]["images"].shape[1:] == (3, 64, 64)
        # restarts: the first epoch, the resume, the stage switch unless announced, the mid-epoch start
        assert loader.restarts == (3 if strong_epochs else 4)
        # an epoch left half-way does not leak into the next one
        it = loader.epoch(6, True)
        next(it)
        _assert_same(list(loader.epoch(7, False)), _old_epoch(old_set, 7, False, 0, loader.batch_size, rank, world))
        assert loader.restarts == (4 if strong_epochs else 5) + 1


def test_keys_carry_the_epoch(base):
    ds = D.TrainDataset(base, 64, seed=2)
    ds.set_epoch(3, False)
    want = ds[5]
    ds.set_epoch(0, True)       # the key wins over the stored epoch
    got = ds[(3, False, 5)]
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    assert not np.array_equal(ds[(4, False, 5)].image, want.image)


def test_decode_cache_changes_nothing_and_stays_private(base):
    cached = D.TrainDataset(base, 64, seed=5)
    plain = D.TrainDataset(base, 64, seed=5, decode_cache=0)
    for key in [(1, s, p) for s in (True, False) for p in range(8)]:
        a, b = cached[key], plain[key]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.image.flags.writeable      # never a view of a cached (read-only) image
    assert 0 < len(cached._raw.items) <= 128 and plain._raw.items == {}


def test_unreadable_image_in_a_worker_is_one_clean_error(base, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(base.img_dir.parent, root)
    ds = D.CocoDetection(*D.dataset_paths(root, "train"))
    ds.image_path(3).write_bytes(b"garbage")
    train_set = D.TrainDataset(ds, 64, seed=0)
    with D.TrainLoader(train_set, batch_size=4, workers=2) as loader:
        with pytest.raises(D.DatasetError) as e:
            list(loader.epoch(0, True))
    msg = str(e.value)
    assert "000003.jpg" in msg and "\n" not in msg and "worker" not in msg
