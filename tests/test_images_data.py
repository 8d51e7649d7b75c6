"""Tests of fluxbench.images.data: digits, the procedural shape set and the CIFAR-10 loader.

All checks are exact (no statistics): values are compared with scikit-learn's raw pixels,
ranges with their closed-form bounds, reproducibility bit for bit.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="needs the images extra: pip install 'fluxbench[images]'")
pytest.importorskip("torchvision", reason="needs the images extra: pip install 'fluxbench[images]'")
import torch

from fluxbench.images import data
from fluxbench.images.data import cifar10, digit_labels, digits, procedural


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- digits
def test_digits_are_sklearn_pixels_rescaled_to_unit_interval():
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float64)
    x = digits(dtype=torch.float64)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float64
    torch.testing.assert_close(x[:, 0], raw / 8 - 1, rtol=0, atol=0)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_digits_split_is_fixed_disjoint_and_covers_every_class():
    full, train, test = digits(), digits(split="train"), digits(split="test")
    assert test.shape[0] == 360 and train.shape[0] == 1437
    idx = torch.arange(full.shape[0])
    torch.testing.assert_close(test, full[idx % 5 == 0], rtol=0, atol=0)
    torch.testing.assert_close(train, full[idx % 5 != 0], rtol=0, atol=0)
    for split in ("train", "test"):
        labels = digit_labels(split=split)
        assert labels.shape[0] == digits(split=split).shape[0]
        assert set(labels.tolist()) == set(range(10))


def test_digits_upsampling_is_bilinear_and_stays_in_range():
    x8 = digits(dtype=torch.float64)
    x32 = digits(resolution=32, dtype=torch.float64)
    assert x32.shape == (1797, 1, 32, 32)
    assert float(x32.min()) >= -1.0 and float(x32.max()) <= 1.0
    # bilinear with align_corners=False: output pixel i of a 4x upsampling sits at input
    # coordinate (i + 0.5) / 4 - 0.5, interpolated between its two neighbouring input pixels;
    # check one interior pixel against that formula
    i, j = 5, 9  # input coords (0.875, 1.875): rows 0,1 weights 0.125/0.875, cols 1,2 weights 0.125/0.875
    wr, wc = torch.tensor([0.125, 0.875], dtype=torch.float64), torch.tensor([0.125, 0.875], dtype=torch.float64)
    expected = torch.einsum("r,c,nrc->n", wr, wc, x8[:, 0, 0:2, 1:3])
    torch.testing.assert_close(x32[:, 0, i, j], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 7}, "resolution must be >= 8"),
        ({"resolution": 8.0}, "resolution must be an integer"),
        ({"split": "val"}, "split must be one of"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits(**kwargs)


def test_digits_rejects_integer_dtype():
    with pytest.raises(TypeError, match="floating"):
        digits(dtype=torch.int64)


# ----------------------------------------------------------------------------- procedural
def test_procedural_shape_range_and_reproducibility():
    a = procedural(64, resolution=16, channels=3, generator=_gen(0))
    b = procedural(64, resolution=16, channels=3, generator=_gen(0))
    c = procedural(64, resolution=16, channels=3, generator=_gen(1))
    assert a.shape == (64, 3, 16, 16) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_procedural_images_show_a_shape_on_a_background():
    x = procedural(200, resolution=16, channels=1, generator=_gen(3), dtype=torch.float64)
    # the corner pixel (centre (1/32, 1/32)) is pure background: a disc's centre is >= 0.309 from
    # it, beyond its radius + anti-aliased rim <= 0.25 + 1/32; a bar's width side ends >= 0.1 from
    # the edge. Shapes cover at most pi 0.25^2 = 20 % (disc) or 0.3 x 0.8 = 24 % (bar) of the
    # image, plus the one-pixel rim, so at least 40 % of the pixels equal the background exactly;
    # and every shape covers some pixel (the smallest half width, 0.06 of 16 pixels, spans a centre)
    corner = x[:, 0, 0, 0]
    flat = x.reshape(200, -1)
    n_background = (flat == corner[:, None]).sum(dim=1)
    assert bool((n_background >= 0.4 * 256).all()), int(n_background.min())
    assert bool((n_background < 256).all())
    # the two colours differ by the background's negation up to jitter: the spread is visible
    spread = flat.max(dim=1).values - flat.min(dim=1).values
    assert float(spread.median()) > 0.5


def test_procedural_requires_a_generator_and_valid_sizes():
    with pytest.raises(TypeError, match="generator"):
        procedural(4, generator=None)
    with pytest.raises(ValueError, match="n must be >= 1"):
        procedural(0, generator=_gen(0))
    with pytest.raises(ValueError, match="resolution must be >= 4"):
        procedural(2, resolution=2, generator=_gen(0))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        procedural(2, channels=0, generator=_gen(0))


# ----------------------------------------------------------------------------- cifar10
def test_cifar10_missing_folder_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py" in message and "download" in message.lower()


def test_cifar10_reads_a_local_copy(tmp_path, monkeypatch):
    # a miniature copy in CIFAR-10's pickle layout (torchvision verifies md5s of the real
    # files, which a miniature cannot match: the integrity check is patched out)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        pixels = rng.integers(0, 256, size=(2, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = pixels
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": pixels, "labels": [0, 1]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, fh)

    test = cifar10(tmp_path, train=False)
    assert test.shape == (2, 3, 32, 32)
    expected = torch.as_tensor(batches["test_batch"].reshape(2, 3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(test, expected, rtol=0, atol=0)
    train = cifar10(tmp_path, train=True)
    assert train.shape == (10, 3, 32, 32)
    assert float(train.min()) >= -1.0 and float(train.max()) <= 1.0


def test_module_lists_its_public_names():
    assert set(data.__all__) >= {"digits", "procedural", "cifar10"}
