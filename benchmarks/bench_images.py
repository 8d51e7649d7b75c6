"""Image sample quality at a fixed small budget: FID in the digit classifier's features.

A small EDM U-Net field (``fluxbench.images.small_unet``, 16 channels) is trained on the
8x8 digits (``fluxbench.images.digits``, train split) by noise-annealed Flux Matching and by
DSM, ``STEPS`` steps of ``BATCH`` images each, seed 0, then sampled (``N_SAMPLES`` images,
seed 1) by

* ``heun-18``: EDM's Heun sampler, 18 levels (35 network evaluations per image);
* ``pc-L``: the predictor-corrector sampler over L levels with one corrector step per level
  (2L - 1 evaluations), for L in ``PC_LEVELS``: FID against the number of evaluations.

Tracked: FID (``fluxbench.images.image_metrics``, extractor ``fluxbench-digits``) of the
samples against the test split. Lower is better; seeds are fixed, so a change is a change
of code or of the torch build. The fits are a smoke budget, not a converged model: compare
commits, not methods.
"""

from __future__ import annotations

import torch

from .common import DEVICES, SEED, generator, require, setup_device, skip_if
from .common import available_devices as _available_devices  # setup_cache's source, hence asv's version, unchanged

STEPS = 200
BATCH = 64
CHAINS = 16
N_SAMPLES = 500
PC_LEVELS = [5, 10, 20, 40]
METHODS = ["flux", "dsm"]
SAMPLERS = ["heun-18"] + [f"pc-{levels}" for levels in PC_LEVELS]


def _fids(method: str, device: torch.device) -> dict[str, float]:
    """Train one field by ``method`` on ``device`` and score every sampler of ``SAMPLERS``."""
    images = require("fluxbench.images", "EDMField", "small_unet", "train_images", "sample_images", "digits")
    metrics = require("fluxbench.images.fid", "image_metrics")
    train = images.digits(split="train")
    test = images.digits(split="test")
    torch.manual_seed(SEED)
    field = images.EDMField(images.small_unet(1))
    options = {"chains": CHAINS} if method == "flux" else None
    images.train_images(
        field, train, method=method, steps=STEPS, batch_size=BATCH, lr=1e-3, ema_decay=0.99,
        objective_options=options, seed=SEED, device=device,
    )
    field.eval()
    scores = {}
    for name in SAMPLERS:
        kind, levels = name.split("-")
        fake = images.sample_images(
            field, N_SAMPLES, tuple(test.shape[1:]), sampler=kind, steps=int(levels),
            generator=generator(device, SEED + 1), device=device,
        )
        scores[name] = float(metrics.image_metrics(test, fake, kid=False, device=device)["fid"])
    return scores


class DigitsFID:
    """FID of fixed-budget digit models, by method and sampler (``setup_cache`` trains each
    method once per commit and device; about a minute per method on one core of the reference CPU)."""

    params = [DEVICES, METHODS, SAMPLERS]
    param_names = ["device", "method", "sampler"]
    timeout = 900

    def setup_cache(self):
        try:
            return {(dev.type, method): _fids(method, dev) for dev in _available_devices() for method in METHODS}
        except NotImplementedError as exc:
            # a commit without fluxbench.images: setup skips every benchmark with the reason
            return {"skip": str(exc)}

    def setup(self, cache, device, method, sampler):
        skip_if("skip" in cache, cache.get("skip", ""))
        setup_device(device)

    def track_fid(self, cache, device, method, sampler):
        return cache[(device, method)][sampler]

    track_fid.unit = "FID (digit features)"
