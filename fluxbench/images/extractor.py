"""A digit-classifier feature extractor for FID/KID/IS through torch-fidelity.

Inception-v3 weights cannot be downloaded everywhere, and Inception features of 8x8 digits
say little. This module trains a small CNN classifier on the train split of scikit-learn's
digits (:func:`fluxbench.images.data.digits`), deterministically (fixed seed, one thread,
fixed number of steps, on the CPU), caches it on disk, reports its accuracy on the held-out
test split, and registers it with torch-fidelity under :data:`EXTRACTOR_NAME` so that
``torch_fidelity.calculate_metrics(feature_extractor="fluxbench-digits", ...)`` computes FID,
KID and IS in its feature space:

- ``"features"`` (FID/KID/PRC): the penultimate layer, a (B, 64) pre-activation,
  standardised per dimension with the train split's mean and standard deviation (so FID is
  in units of the features' spread and KID's cubic kernel sees inner products of order 1);
- ``"logits_unbiased"`` / ``"logits"`` (IS): the (B, 10) class logits.

The extractor takes what torch-fidelity feeds every extractor: uint8 images (B, 3, H, W) in
[0, 255]; it averages the channels to grey, maps to [-1, 1] and resizes (bilinear,
anti-aliased when shrinking) to the classifier's resolution.

Cache: ``$FLUXBENCH_CACHE`` or ``~/.cache/fluxbench``, file ``digits-classifier-<key>.pt``
where the key hashes the training config, the torch version and the file format, so a
change of any of them trains afresh. A file that does not load or does not hold what its
name promises is reported by a warning naming it and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .data import digit_labels, digits

__all__ = [
    "EXTRACTOR_NAME",
    "ClassifierConfig",
    "DigitClassifier",
    "DigitsFeatureExtractor",
    "cache_dir",
    "digit_classifier",
    "load_digit_classifier",
    "train_digit_classifier",
]

EXTRACTOR_NAME = "fluxbench-digits"
_FORMAT = "fluxbench-digits-classifier/1"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines the trained classifier (hashed into the cache key).

    resolution: side of the classifier's input (digits upsampled from 8x8).
    width: channels of the three conv layers are width, 2 width, 4 width.
    features: size of the penultimate layer (the FID feature space).
    steps, batch_size, lr: Adam on the cross-entropy, constant learning rate.
    shift: random translations by up to ``shift`` pixels (augmentation).
    seed: seeds the initialisation and every minibatch/augmentation draw.
    """

    resolution: int = 16
    width: int = 16
    features: int = 64
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 1
    seed: int = 0


class DigitClassifier(nn.Module):
    """Small CNN: (B, 1, R, R) in [-1, 1] -> (features (B, F), logits (B, 10)).

    conv3x3(1->w) ReLU, conv3x3(w->2w) ReLU, maxpool2, conv3x3(2w->4w) ReLU, maxpool2,
    linear(4w R^2/16 -> F) = h, ReLU, linear(F -> 10) = logits; the returned features are
    (h - feature_mean) / feature_std, buffers set after training from the train split.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        w, r = config.width, config.resolution
        self.config = config
        self.trunk = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w * (r // 4) ** 2, config.features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(config.features, 10))
        self.register_buffer("feature_mean", torch.zeros(config.features))
        self.register_buffer("feature_std", torch.ones(config.features))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return (h - self.feature_mean) / self.feature_std, self.head(h)


def _shifted(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, 1, R, R) by integers in [-shift, shift], padding with -1 (background)."""
    b, _, r, _ = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(r)  # (B, R)
    cols = offsets[:, 1:] + torch.arange(r)
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _accuracy(model: DigitClassifier, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x)[1].argmax(dim=1) == y).double().mean())


def train_digit_classifier(config: ClassifierConfig = ClassifierConfig()) -> tuple[DigitClassifier, dict]:
    """Train the classifier on the digits' train split, deterministically, on the CPU.

    One intra-op thread (CPU reductions then run in a fixed order) and a private RNG state
    (the caller's global RNG is untouched): the same config and torch version give the same
    weights bit for bit on the same kind of CPU.

    Returns:
        The model (eval mode, CPU) and ``{"train_accuracy", "test_accuracy"}`` on the
        train split and on the held-out test split (every 5th image, never trained on).
    """
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig; got {type(config).__name__}")
    x_train, y_train = digits(resolution=config.resolution, split="train"), digit_labels(split="train")
    x_test, y_test = digits(resolution=config.resolution, split="test"), digit_labels(split="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = DigitClassifier(config)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        for _ in range(config.steps):
            idx = torch.randint(0, x_train.shape[0], (config.batch_size,), generator=generator)
            batch = _shifted(x_train[idx], config.shift, generator) if config.shift else x_train[idx]
            loss = F.cross_entropy(model(batch)[1], y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            h = model.trunk(x_train)
            model.feature_mean.copy_(h.mean(dim=0))
            model.feature_std.copy_(h.std(dim=0).clamp_min(1e-6))  # a dead unit must not divide by 0
        info = {"train_accuracy": _accuracy(model, x_train, y_train), "test_accuracy": _accuracy(model, x_test, y_test)}
    finally:
        torch.set_num_threads(threads)
    return model, info


def cache_dir() -> Path:
    """``$FLUXBENCH_CACHE`` if set, else ``~/.cache/fluxbench``."""
    return Path(os.environ.get("FLUXBENCH_CACHE") or Path.home() / ".cache" / "fluxbench").expanduser()


def _cache_key(config: ClassifierConfig) -> str:
    blob = {"format": _FORMAT, "torch": str(torch.__version__), "config": dataclasses.asdict(config)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def load_digit_classifier(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[DigitClassifier, dict]:
    """Load a classifier file written by :func:`digit_classifier`.

    Returns:
        The model (eval mode, on ``device``, no gradients) and its info dict (accuracies,
        config, torch version, cache key).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a complete fluxbench digit-classifier file (truncated,
            foreign, or of another format version).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no digit-classifier file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch/pickle raise many types
        raise ValueError(f"{path} is not a readable digit-classifier file ({type(err).__name__}: {err})") from err
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fluxbench digit-classifier file of format {_FORMAT!r}")
    try:
        config = ClassifierConfig(**blob["config"])
        model = DigitClassifier(config)
        model.load_state_dict(blob["state_dict"])
        info = {key: blob[key] for key in ("train_accuracy", "test_accuracy", "torch", "key")}
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path} is an incomplete or mismatched digit-classifier file: {err}") from err
    info["config"] = dataclasses.asdict(config)
    model.eval().requires_grad_(False)
    return model.to(device), info


def digit_classifier(
    config: ClassifierConfig = ClassifierConfig(), *, cache: str | Path | None = None
) -> tuple[Path, dict]:
    """The cached classifier file for ``config``, trained and written first when missing.

    Args:
        config: the training config.
        cache: cache folder (default :func:`cache_dir`).

    Returns:
        (path of the classifier file, info dict with "train_accuracy", "test_accuracy",
        "config", "torch", "key", "path").
    """
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig; got {type(config).__name__}")
    key = _cache_key(config)
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    path = folder / f"digits-classifier-{key}.pt"
    if path.exists():
        try:
            _, info = load_digit_classifier(path)
            if info["key"] == key:
                return path, {**info, "path": str(path)}
            problem = f"its key {info['key']} is not {key}"
        except ValueError as err:
            problem = str(err)
        warnings.warn(f"rebuilding the digit classifier cache {path}: {problem}", stacklevel=2)
    model, info = train_digit_classifier(config)
    blob = {
        "format": _FORMAT,
        "key": key,
        "torch": str(torch.__version__),
        "config": dataclasses.asdict(config),
        "state_dict": model.state_dict(),
        **info,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return path, {key_: blob[key_] for key_ in ("train_accuracy", "test_accuracy", "config", "torch", "key")} | {
        "path": str(path)
    }


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor backed by a :class:`DigitClassifier` file.

    torch-fidelity constructs it as ``cls(name, features_list, **kwargs)`` with every
    keyword of ``calculate_metrics``; the classifier file comes in
    ``feature_extractor_weights_path`` (:func:`fluxbench.images.fid.image_metrics` passes
    the cached file of :func:`digit_classifier`).
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"the {EXTRACTOR_NAME!r} extractor needs feature_extractor_weights_path: the classifier file "
                "from fluxbench.images.extractor.digit_classifier()"
            )
        self.classifier, self.info = load_digit_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: uint8 (B, 3, H, W) in [0, 255] -> the requested features, each float32 (B, k)."""
        if not (isinstance(x, Tensor) and x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images of shape (B, 3, H, W); got {getattr(x, 'shape', type(x))}")
        r = self.classifier.config.resolution
        grey = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        if grey.shape[-2:] != (r, r):
            shrink = grey.shape[-1] > r or grey.shape[-2] > r
            grey = F.interpolate(grey, size=(r, r), mode="bilinear", align_corners=False, antialias=shrink)
        features, logits = self.classifier(grey)
        out = {"features": features, "logits_unbiased": logits, "logits": logits}
        return tuple(out[name].float() for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # a module reload must not register twice
    register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
