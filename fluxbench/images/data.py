"""Image data sets that need no download, and a CIFAR-10 loader for a local copy.

Every loader returns a float tensor of shape (N, C, R, R) with values in [-1, 1] (the
range EDM's preconditioning assumes with sigma_data = 0.5):

- :func:`digits`: scikit-learn's 8x8 handwritten digits (1797 images, bundled with
  scikit-learn), pixel p in {0, ..., 16} mapped to p / 8 - 1, upsampled bilinearly.
- :func:`procedural`: a generated shape set (one coloured disc or bar on a coloured
  background per image), drawn from a caller-supplied ``torch.Generator``.
- :func:`cifar10`: torchvision's CIFAR10 from a local folder (``download=False``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_generator, check_positive_int

__all__ = ["digits", "digit_labels", "procedural", "cifar10", "SPLITS", "TEST_EVERY"]

SPLITS = ("all", "train", "test")
# Image i is in the test split iff i % TEST_EVERY == 0: a fixed split with every digit
# class in both halves (load_digits is ordered roughly 0, 1, ..., 9, 0, 1, ...).
TEST_EVERY = 5
_DIGITS_SIDE = 8
_DIGITS_MAX = 16.0


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return split


def _split_index(n: int, split: str) -> Tensor:
    idx = torch.arange(n)
    if split == "test":
        return idx[idx % TEST_EVERY == 0]
    if split == "train":
        return idx[idx % TEST_EVERY != 0]
    return idx


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    return dtype


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits come from scikit-learn: pip install 'fluxbench[images]'") from err

    return load_digits()


def digits(
    *, resolution: int = 8, split: str = "all", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Tensor:
    """scikit-learn's handwritten digits as (N, 1, R, R) images in [-1, 1].

    Pixel p in {0, ..., 16} becomes x = 2 p / 16 - 1. For R > 8 the 8x8 images are
    upsampled by bilinear interpolation (``align_corners=False``); interpolation takes
    convex combinations, so the values stay in [-1, 1].

    Args:
        resolution: side R >= 8 of the returned images.
        split: ``"all"`` (N = 1797), ``"test"`` (images i with i % 5 == 0, N = 360) or
            ``"train"`` (the others, N = 1437). Deterministic: no randomness involved.
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        (N, 1, R, R) tensor with values in [-1, 1].
    """
    resolution = check_positive_int(resolution, "resolution", minimum=_DIGITS_SIDE)
    split = _check_split(split)
    dtype = _check_dtype(dtype)
    images = torch.as_tensor(_load_digits().images, dtype=torch.float64)  # (1797, 8, 8), 0..16
    images = images[_split_index(images.shape[0], split)].unsqueeze(1)
    images = images * (2.0 / _DIGITS_MAX) - 1.0
    if resolution > _DIGITS_SIDE:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.to(device=device, dtype=dtype)


def digit_labels(*, split: str = "all", device: torch.device | str = "cpu") -> Tensor:
    """Class labels (N,) int64 in {0, ..., 9} of the images :func:`digits` returns for ``split``."""
    split = _check_split(split)
    target = torch.as_tensor(_load_digits().target, dtype=torch.int64)
    return target[_split_index(target.shape[0], split)].to(device)


def procedural(
    n: int,
    *,
    resolution: int = 16,
    channels: int = 3,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A generated shape set: one coloured disc or bar on a coloured background per image.

    Per image, with pixel centres u, v in (0, 1) and every parameter uniform:

        disc (probability 1/2):  d = |(u, v) - c| - r,          c in [0.25, 0.75]^2, r in [0.12, 0.25]
        bar:                     d = max(|u - c_u| - w, |v - c_v| - l),  w in [0.06, 0.15],
                                 l in [0.2, 0.4], transposed with probability 1/2
        mask = clamp(1/2 - d R, 0, 1)          (one-pixel anti-aliased edge)
        x = (1 - mask) background + mask foreground,   colours in [-1, 1]^C

    so x lies in [-1, 1]. No shape reaches the corner pixels: they show the background. The foreground colour is the background's negation plus
    N(0, 0.2^2) jitter (clamped), which keeps the shape visible.

    Args:
        n: number of images, >= 1.
        resolution: side R >= 4.
        channels: C >= 1.
        generator: source of every random draw (required, for reproducibility).
        device: device of the result; default the generator's device.
        dtype: floating dtype of the result.

    Returns:
        (n, C, R, R) tensor with values in [-1, 1].
    """
    n = check_positive_int(n, "n")
    resolution = check_positive_int(resolution, "resolution", minimum=4)
    channels = check_positive_int(channels, "channels")
    dtype = _check_dtype(dtype)
    if generator is None:
        raise TypeError("procedural() needs a torch.Generator (generator=...) so that the data set is reproducible")
    device = torch.device(generator.device if device is None else device)
    generator = check_generator(generator, device)

    def uni(shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator, device=device, dtype=dtype)

    background = uni((n, channels, 1, 1), -1.0, 1.0)
    jitter = 0.2 * torch.randn((n, channels, 1, 1), generator=generator, device=device, dtype=dtype)
    foreground = (-background + jitter).clamp(-1.0, 1.0)
    is_disc = torch.rand((n, 1, 1), generator=generator, device=device) < 0.5
    transpose = torch.rand((n, 1, 1), generator=generator, device=device) < 0.5
    centre = uni((n, 2, 1, 1), 0.25, 0.75)
    radius = uni((n, 1, 1), 0.12, 0.25)
    half_width = uni((n, 1, 1), 0.06, 0.15)
    half_length = uni((n, 1, 1), 0.2, 0.4)

    grid = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution
    du = grid.view(1, -1, 1) - centre[:, 0]  # (n, R, 1): row offset
    dv = grid.view(1, 1, -1) - centre[:, 1]  # (n, 1, R): column offset
    disc = torch.sqrt(du * du + dv * dv) - radius
    along_u = torch.maximum(du.abs() - half_length, dv.abs() - half_width)
    along_v = torch.maximum(du.abs() - half_width, dv.abs() - half_length)
    bar = torch.where(transpose, along_v, along_u)
    dist = torch.where(is_disc, disc, bar)  # (n, R, R), in units of the image side
    mask = (0.5 - dist * resolution).clamp(0.0, 1.0).unsqueeze(1)
    return (1 - mask) * background + mask * foreground


def cifar10(root: str | Path, *, train: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
    """CIFAR-10 from a local folder as (N, 3, 32, 32) images in [-1, 1] (x = p / 127.5 - 1).

    Uses ``torchvision.datasets.CIFAR10(root, train=train, download=False)``: nothing is
    downloaded. ``root`` must hold ``cifar-10-batches-py/`` (the extracted python version
    of the data set).

    Raises:
        FileNotFoundError: the data are not under ``root``; the message says how to get them.
    """
    from torchvision.datasets import CIFAR10

    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool; got {type(train).__name__}")
    dtype = _check_dtype(dtype)
    root = Path(root).expanduser()
    try:
        dataset = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        raise FileNotFoundError(
            f"CIFAR-10 not found (or corrupted) under {root}: expected {root / 'cifar-10-batches-py'}. "
            "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with "
            f"internet access and extract it into {root} (or run torchvision.datasets.CIFAR10("
            f"{str(root)!r}, download=True) there), then pass that folder"
        ) from err
    pixels = torch.as_tensor(dataset.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) uint8 -> (N, 3, 32, 32)
    return pixels.to(dtype) / 127.5 - 1.0
