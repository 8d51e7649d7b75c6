"""FID, KID and IS of image samples through torch-fidelity (no hand-written Frechet distance).

:func:`image_metrics` hands two sets of images to ``torch_fidelity.calculate_metrics`` with
one of two feature extractors, and every result names the one it used:

- ``"inception"``: torch-fidelity's ``inception-v3-compat`` (the standard FID/KID/IS
  network). Its weights are never downloaded here: they come from ``weights_path`` or the
  environment variable :data:`WEIGHTS_ENV` (torch-fidelity's ``feature_extractor_weights_path``,
  the ``weights-inception-2015-12-05-6726825d.pth`` file of its releases); without one the call
  fails with a message saying how to provide it.
- ``"digits"``: the digit classifier of :mod:`fluxbench.images.extractor` (trained
  deterministically and cached; its held-out accuracy is part of the result). Numbers from
  the two extractors are on different scales and never comparable.

Images are (N, C, H, W) floats in [-1, 1] with C = 1 or 3, as the models produce them; they
are clipped to [-1, 1], quantised to uint8 as torch-fidelity expects (p = round(127.5 (x + 1)))
and grey images are replicated to 3 channels.

FID = |m_1 - m_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) of the feature means and
covariances; KID = the unbiased MMD^2 of the features with the cubic polynomial kernel
k(a, b) = (a.b / dim + 1)^3, averaged over ``kid_subsets`` random subsets (mean and std
reported); IS = exp E KL(p(y|x) || p(y)) over 10 splits (mean and std).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import check_batch, check_positive_int, check_seed
from .extractor import EXTRACTOR_NAME, ClassifierConfig, digit_classifier

__all__ = ["image_metrics", "to_uint8", "UInt8Images", "EXTRACTORS", "WEIGHTS_ENV", "INCEPTION_NAME"]

EXTRACTORS = ("digits", "inception")
WEIGHTS_ENV = "FLUXBENCH_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-compat"
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def to_uint8(images: Tensor, name: str = "images") -> Tensor:
    """(N, C, H, W) floats in [-1, 1], C in {1, 3} -> uint8 (N, 3, H, W) in [0, 255] on the CPU.

    Values outside [-1, 1] (a sampler's overshoot) are clipped; p = round(127.5 (x + 1)).
    """
    images = check_batch(images, name)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, C, H, W) with C = 1 or 3; got {tuple(images.shape)}")
    pixels = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


class UInt8Images(Dataset):
    """A torch Dataset over a uint8 (N, 3, H, W) tensor, item i = the (3, H, W) image."""

    def __init__(self, pixels: Tensor):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W); got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.pixels[i]


def _inception_weights(weights_path: str | Path | None) -> Path:
    source = "weights_path"
    if weights_path is None:
        weights_path, source = os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}"
    if weights_path is None:
        raise FileNotFoundError(
            "the inception extractor needs the Inception-v3 weights file, which is not downloaded here: "
            f"pass weights_path= (command line: --weights PATH) or set {WEIGHTS_ENV}=PATH. The file is "
            f"torch-fidelity's {_INCEPTION_FILE} (from its GitHub releases, on a machine with internet "
            "access); or use extractor='digits', which needs no download"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path} (from {source}) is not a file; it should be torch-fidelity's "
            f"{_INCEPTION_FILE}"
        )
    return path


def _device_flag(device: torch.device | str) -> tuple[bool, torch.device]:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"torch-fidelity runs on cpu or cuda; got device {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device.type == "cuda", device


def image_metrics(
    real: Tensor,
    fake: Tensor,
    *,
    extractor: str = "digits",
    weights_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    kid: bool = True,
    isc: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 256,
    seed: int = 2020,
    classifier: ClassifierConfig = ClassifierConfig(),
    cache: str | Path | None = None,
) -> dict:
    """FID (always), KID and IS of ``fake`` against ``real`` through torch-fidelity.

    Args:
        real: (N1, C, H, W) reference images in [-1, 1], C in {1, 3}.
        fake: (N2, C', H', W') generated images in [-1, 1] (N1, N2 >= 2: FID needs covariances).
        extractor: ``"digits"`` (the cached digit classifier) or ``"inception"``.
        weights_path: Inception weights file (``extractor="inception"``; default
            ``$FLUXBENCH_INCEPTION_WEIGHTS``). Ignored by the digit extractor.
        device: ``"cpu"`` or a CUDA device, where the features are computed.
        kid: also compute KID (subsets of min(kid_subset_size, N1, N2) images).
        isc: also compute the Inception Score of ``fake`` (its classifier's class logits).
        kid_subsets: number of KID subsets.
        kid_subset_size: KID subset size, capped by the sample sizes (when it covers both
            sets every subset is the whole set and ``kid_std`` is 0).
        batch_size: images per forward pass.
        seed: torch-fidelity's ``rng_seed`` (KID subsets and IS splits): same inputs and
            seed, same numbers.
        classifier: config of the digit classifier.
        cache: its cache folder (default ``$FLUXBENCH_CACHE`` or ``~/.cache/fluxbench``).

    Returns:
        ``{"fid", "kid_mean", "kid_std" (with kid), "isc_mean", "isc_std" (with isc),
        "extractor", "feature_layer", "n_real", "n_fake"}``; with the digit extractor also
        ``"classifier_test_accuracy"`` (its accuracy on the held-out digits) and
        ``"classifier_path"``; with Inception ``"weights_path"``.

    Raises:
        FileNotFoundError: Inception weights missing (the message says how to provide them).
        ValueError: bad images or arguments.
    """
    import torch_fidelity

    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}; got {extractor!r}")
    real_px, fake_px = to_uint8(real, "real"), to_uint8(fake, "fake")
    n_real, n_fake = real_px.shape[0], fake_px.shape[0]
    if min(n_real, n_fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {n_real} real and {n_fake} fake")
    if not isinstance(kid, bool) or not isinstance(isc, bool):
        raise TypeError("kid and isc must be bools")
    kid_subsets = check_positive_int(kid_subsets, "kid_subsets")
    kid_subset_size = min(check_positive_int(kid_subset_size, "kid_subset_size", minimum=2), n_real, n_fake)
    batch_size = check_positive_int(batch_size, "batch_size")
    seed = check_seed(seed)
    if isc and n_fake < 10:
        raise ValueError(f"the Inception Score uses 10 splits and needs >= 10 fake images; got {n_fake}")
    cuda, device = _device_flag(device)

    result: dict = {}
    if extractor == "inception":
        path = _inception_weights(weights_path)
        name, layer = INCEPTION_NAME, "2048"
        result.update(extractor=f"{INCEPTION_NAME} ({path.name})", weights_path=str(path))
    else:
        path, info = digit_classifier(classifier, cache=cache)
        name, layer = EXTRACTOR_NAME, "features"
        result.update(
            extractor=f"{EXTRACTOR_NAME} (key {info['key']}, test accuracy {info['test_accuracy']:.4f})",
            classifier_test_accuracy=info["test_accuracy"],
            classifier_path=str(path),
        )
    # fake first: IS is computed on input1
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        metrics = torch_fidelity.calculate_metrics(
            input1=UInt8Images(fake_px),
            input2=UInt8Images(real_px),
            cuda=cuda,
            fid=True,
            kid=kid,
            isc=isc,
            feature_extractor=name,
            feature_extractor_weights_path=str(path),
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            batch_size=batch_size,
            rng_seed=seed,
            cache=False,  # nothing written under ~/.cache/torch
            save_cpu_ram=True,  # no DataLoader worker processes
            verbose=False,
        )
    result["fid"] = float(metrics["frechet_inception_distance"])
    if kid:
        result["kid_mean"] = float(metrics["kernel_inception_distance_mean"])
        result["kid_std"] = float(metrics["kernel_inception_distance_std"])
        result["kid_subset_size"] = kid_subset_size
    if isc:
        result["isc_mean"] = float(metrics["inception_score_mean"])
        result["isc_std"] = float(metrics["inception_score_std"])
    result.update(feature_layer=layer, n_real=n_real, n_fake=n_fake, seed=seed)
    return result
