"""Images end to end: EDM U-Net fields, their training, sampling and FID.

* :mod:`.unet`: :class:`UNet`, the raw network F(x, c_noise) (EDM's layout), and :func:`small_unet`.
* :mod:`.precond`: :class:`EDMField`, f(x, sigma) = (D(x, sigma) - x) / sigma^2 with EDM's
  preconditioning D = c_skip x + c_out F(c_in x, log(sigma) / 4) (SPEC section 3).
* :mod:`.flatten`: the package's (B, d) objectives on (B, C, H, W) batches; EDM's log-normal sigma.
* :mod:`.train`: :func:`train_images` (Flux Matching or DSM; torchrun/DDP, bf16 autocast, resume).
* :mod:`.distributed`: process-group set-up and the gathered-batch field.
* :mod:`.checkpoint`: :func:`save_checkpoint`, :func:`load_field`.
* :mod:`.data`: :func:`digits`, :func:`procedural`, :func:`cifar10`.
* :mod:`.sample_cli`: :func:`sample_images` (EDM Heun, predictor-corrector, probability-flow ODE).
* :mod:`.fid`, :mod:`.extractor`: :func:`image_metrics` (FID, KID, IS through torch-fidelity) and
  :func:`digit_classifier`, the cached digit classifier behind the "digits" extractor.
* the commands ``fluxbench images train|sample|fid`` (:mod:`.cli`).

The metrics need the ``images`` extra (torch-fidelity, torchvision, scikit-learn): they are
imported on first use, so the models, training and samplers work without it.
"""

import importlib

from .checkpoint import load_field, save_checkpoint
from .data import cifar10, digit_labels, digits, procedural
from .flatten import FlatField, ImageObjective, image_objective
from .precond import EDMField, edm_coefficients
from .sample_cli import sample_images
from .train import train_images
from .unet import UNet, small_unet

__all__ = [
    "UNet",
    "small_unet",
    "EDMField",
    "edm_coefficients",
    "FlatField",
    "ImageObjective",
    "image_objective",
    "train_images",
    "save_checkpoint",
    "load_field",
    "sample_images",
    "digits",
    "digit_labels",
    "procedural",
    "cifar10",
    "image_metrics",
    "digit_classifier",
]

# name -> module that needs the images extra; loaded on first access (PEP 562)
_OPTIONAL = {"image_metrics": ".fid", "digit_classifier": ".extractor"}


def __getattr__(name: str):
    if name not in _OPTIONAL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_OPTIONAL[name], __name__)
    except ImportError as err:
        raise ImportError(
            f"fluxbench.images.{name} needs the images extra ({err.name} is missing): "
            "pip install 'fluxbench[images]'"
        ) from err
    return getattr(module, name)
