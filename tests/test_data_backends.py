"""The cv2 augmentation backend: the same random draws and boxes as the pil backend, boxes
that follow the pixels, and a cropped-window resize equal to resize-then-crop."""
import numpy as np
import pytest

from rtmdet import data as D
from tests.test_data_reference import ArrayBase

pytestmark = pytest.mark.skipif(D.transforms.cv2 is None, reason="needs OpenCV")


def _rect(h=120, w=160, box=(30, 20, 70, 90)):
    img = np.zeros((h, w, 3), np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = 255
    return D.Sample(img, np.asarray([box], np.float32), np.asarray([1]))


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_same_draws_and_boxes_as_pil_pixels_close():
    """Boxes never depend on pixels, so both backends must give identical boxes and labels
    for every sample: proof that they make the same random draws."""
    base = ArrayBase(n=12, seed=3)
    for s in base.samples:    # smooth images: on noise, antialiasing or not differs a lot
        s.image = D.transforms.cv2.GaussianBlur(s.image, (0, 0), 3)
    for size in (128, 96):
        pil = D.TrainDataset(base, size, aug=D.AugmentConfig(backend="pil"), seed=1)
        cv = D.TrainDataset(base, size, aug=D.AugmentConfig(backend="cv2"), seed=1)
        assert cv.backend == "cv2" and pil.backend == "pil"
        diffs = []
        for key in [(e, s, p) for e in range(2) for s in (True, False) for p in range(12)]:
            a, b = pil[key], cv[key]
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert a.image.shape == b.image.shape == (size, size, 3)
            diffs.append(np.abs(a.image.astype(int) - b.image).mean())
        # antialiased vs plain bilinear (5x downscales at 96 px) and two HSV conversions: close
        assert max(diffs) < 8 and np.mean(diffs) < 3 and min(diffs) < 1


def test_windowed_resize_equals_resize_then_crop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = int(rng.integers(60, 400)), int(rng.integers(60, 400))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        new_w, new_h = int(w * rng.uniform(0.4, 2.5)) + 1, int(h * rng.uniform(0.4, 2.5)) + 1
        cw, ch = int(rng.integers(1, new_w + 1)), int(rng.integers(1, new_h + 1))
        x0, y0 = int(rng.integers(0, new_w - cw + 1)), int(rng.integers(0, new_h - ch + 1))
        got = D.transforms._resized_window(img, new_w, new_h, x0, y0, cw, ch)
        want = D.transforms._resize_image(img, new_w, new_h, "cv2")[y0:y0 + ch, x0:x0 + cw]
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).max() <= 1


def test_cv2_transforms_keep_boxes_on_pixels():
    rng = np.random.default_rng(0)
    for _ in range(10):
        s = D.random_resize_crop(_rect(), rng, 200, (0.5, 2.0), 100, backend="cv2")
        assert s.image.shape[0] <= 100 and s.image.shape[1] <= 100
        if len(s.boxes):
            np.testing.assert_allclose(s.boxes[0], _extent(s.image.mean(-1) > 127), atol=1.5)
    r = D.resize(_rect(), 80, 240, backend="cv2")
    np.testing.assert_allclose(r.boxes[0], _extent(r.image.mean(-1) > 127), atol=1)
    samples = [_rect(box=(20 + 5 * k, 10, 60 + 5 * k, 50 + 10 * k)) for k in range(4)]
    for seed in range(3):
        m = D.mosaic(samples, np.random.default_rng(seed), 80, backend="cv2")
        for box in m.boxes:   # each white rectangle sits on the pad colour or a black tile
            win = m.image[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))]
            assert (win.mean(-1) > 200).mean() > 0.8
    base = D.Sample(np.zeros((100, 100, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    for seed in range(3):
        m = D.mixup(base, _rect(h=50, w=80, box=(10, 10, 30, 40)), np.random.default_rng(seed), 100,
                    backend="cv2")
        np.testing.assert_allclose(m.boxes[0], _extent(m.image.min(-1) > 100), atol=1.5)


def test_cv2_hsv_shifts_hue_like_upstream():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 200        # pure red-ish: OpenCV hue 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        gains = (rng.uniform(-1, 1, 3) * [5, 30, 30] * rng.integers(0, 2, 3)).astype(np.int16)
        out = D.hsv_jitter(D.Sample(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
                           np.random.default_rng(seed), backend="cv2").image
        cv2 = D.transforms.cv2
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + gains[0]) % 180      # mmdet YOLOXHSVRandomAug, verbatim
        hsv[..., 1] = np.clip(hsv[..., 1] + gains[1], 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + gains[2], 0, 255)
        want = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB) if gains.any() else img
        np.testing.assert_array_equal(out, want)


def test_backend_choice():
    assert D.resolve_backend("auto") == "cv2"
    with pytest.raises(ValueError, match="backend"):
        D.resolve_backend("torch")


def test_training_default_is_cv2_on_cuda_and_pil_on_the_cpu():
    """`--augment-backend auto` (the default): OpenCV's fast resampling keeps a GPU fed; the
    CPU keeps the pil numerics, so CPU runs stay bitwise what they were."""
    import torch
    from rtmdet.training.config import TrainConfig
    from rtmdet.training.inputs import augment_config, resolve_augment_backend
    assert TrainConfig().augment_backend == "auto"
    assert resolve_augment_backend("auto", torch.device("cuda", 0)) == "cv2"
    assert resolve_augment_backend("auto", "cpu") == "pil"
    assert resolve_augment_backend("auto") == "pil"
    assert resolve_augment_backend("pil", "cuda") == "pil"
    assert resolve_augment_backend("cv2", "cpu") == "cv2"
    assert augment_config(TrainConfig(), torch.device("cuda")).backend == "cv2"
    assert augment_config(TrainConfig(), torch.device("cpu")).backend == "pil"
    with pytest.raises(ValueError, match="backend"):
        resolve_augment_backend("kornia", "cuda")


def test_training_default_without_opencv_is_pil(monkeypatch):
    from rtmdet.training.inputs import resolve_augment_backend
    monkeypatch.setattr(D.transforms, "cv2", None)
    assert resolve_augment_backend("auto", "cuda") == "pil"
    with pytest.raises(ImportError, match="OpenCV"):
        resolve_augment_backend("cv2", "cuda")


def test_training_config_checks_the_augment_backend():
    from rtmdet.training.config import TrainConfig
    from rtmdet.training.validate import ConfigError, validate_config
    with pytest.raises(ConfigError, match="--augment-backend: expected one of auto, pil, cv2"):
        validate_config(TrainConfig(augment_backend="PIL"))
    validate_config(TrainConfig(augment_backend="cv2"))
