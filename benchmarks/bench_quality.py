"""Sample quality at a fixed budget, and the flux gradient's signal-to-noise ratio against DSM's.

Quality: a small annealed model (``fluxbench.recipes.AnnealedRecipe`` with ``STEPS`` steps
and ``LEVELS`` sampler levels, everything else the recipe's defaults) fitted by Flux
Matching and by DSM, seed 0, on

* ``mixture2d``: the 3-mode triangle mixture (``fluxbench.targets.triangle``, SPEC section 6);
* ``anisotropic8d``: a randomly rotated 8-D Gaussian of condition number 10 (rotation seed 0).

Tracked: W2 of ``N_EVAL`` samples of the fitted sampler to ``N_EVAL`` exact samples of
p_{sigma_min} (the law the sampler approximates), beside its noise floor (W2 between two
independent exact samples of that size), and the p-value of the combined stationarity test
of the learned field at ``SIGMA_TEST`` on ``N_TEST`` exact samples of p_{SIGMA_TEST}. A
higher W2 or a lower p-value at the same budget is a regression in training or sampling.
The figures vary between seeds (the README's demo: paired SE of W2 ~0.015 at 20000 steps);
the benchmark fixes seed 0, so a change is a change of code or of the torch build.
"""

from __future__ import annotations

import torch

from .common import DEVICES, SEED, generator, require, setup_device, skip_if
from .common import available_devices as _available_devices  # setup_cache's source, hence asv's version, unchanged

STEPS = 1000
LEVELS = 200
N_EVAL = 2000
SIGMA_TEST = 1.0
N_TEST = 1000
TARGETS = ["mixture2d", "anisotropic8d"]
METHODS = ["flux", "dsm"]
SNR_DRAWS = 200
SNR_BATCH = 256


def _target(name: str, device: torch.device):
    targets = require("fluxbench.targets", "triangle", "anisotropic_gaussian")
    target = targets.triangle() if name == "mixture2d" else targets.anisotropic_gaussian(8, 10.0, seed=SEED)
    return target.to(device, torch.float32)


def _score(target_name: str, method: str, device: torch.device) -> dict[str, float]:
    """Fit, sample and score one (target, method) on ``device``: W2, its floor, the p-value."""
    recipes = require("fluxbench.recipes", "AnnealedRecipe", "fit")
    metrics = require("fluxbench.metrics", "w2")
    verify = require("fluxbench.verify", "stationarity_test")
    target = _target(target_name, device)
    recipe = recipes.AnnealedRecipe(steps=STEPS, sample_levels=LEVELS)
    fitted = recipes.fit(method, target.sample, recipe, seed=SEED, device=device)
    samples = fitted.sample(N_EVAL, generator=generator(device, SEED + 2), device=device)
    p_eval = target.smoothed(recipe.sigma_min)
    ref_gen = generator(device, SEED + 1)
    reference, second = p_eval.sample(N_EVAL, generator=ref_gen), p_eval.sample(N_EVAL, generator=ref_gen)
    test_x = target.smoothed(SIGMA_TEST).sample(N_TEST, generator=generator(device, SEED + 3))
    report = verify.stationarity_test(fitted.field(SIGMA_TEST), test_x, method="combined", seed=SEED)
    return {
        "w2": float(metrics.w2(samples, reference)),
        "w2_floor": float(metrics.w2(second, reference)),
        "p_value": float(report.p_value),
    }


class AnnealedQuality:
    """W2 to the target, its noise floor and the stationarity p-value of a fixed-budget model.

    ``setup_cache`` fits every (target, method) once per commit on each available device
    (asv shares its result between the three tracks); each fit and its scores take under
    two minutes on one core of the reference CPU.
    """

    params = [DEVICES, TARGETS, METHODS]
    param_names = ["device", "target", "method"]
    timeout = 900

    def setup_cache(self):
        try:
            return {
                (dev.type, name, method): _score(name, method, dev)
                for dev in _available_devices()
                for name in TARGETS
                for method in METHODS
            }
        except NotImplementedError as exc:
            # a commit without the recipes: asv counts an exception here as a failure, so the
            # reason is passed on and setup skips each benchmark with it
            return {"skip": str(exc)}

    def setup(self, cache, device, target, method):
        skip_if("skip" in cache, cache.get("skip", ""))
        setup_device(device)

    def track_w2(self, cache, device, target, method):
        return cache[(device, target, method)]["w2"]

    track_w2.unit = "W2"

    def track_w2_noise_floor(self, cache, device, target, method):
        return cache[(device, target, method)]["w2_floor"]

    track_w2_noise_floor.unit = "W2"

    def track_stationarity_p_value(self, cache, device, target, method):
        return cache[(device, target, method)]["p_value"]

    track_stationarity_p_value.unit = "p-value"


class GradientSNR:
    """|E g|^2 / tr Cov g of one step's gradient at a freshly initialised ``MLPField(2)``
    (seed 0) on the triangle mixture, B = 256, ``SNR_DRAWS`` draws (SPEC section 7:
    flux 0.029, 0.20, 0.54 against DSM 0.205, 1.84, 14.0 at sigma 0.1, 0.3, 1)."""

    params = [DEVICES, [0.1, 0.3, 1.0]]
    param_names = ["device", "sigma"]
    timeout = 300

    def setup(self, device, sigma):
        self.device = setup_device(device)
        self.gradient_snr = require("fluxbench.diagnostics", "gradient_snr").gradient_snr
        fields = require("fluxbench.fields", "MLPField")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            self.model = fields.MLPField(2).to(self.device)
        self.sample = _target("mixture2d", self.device).sample

    def _snr(self, method: str, sigma: float) -> float:
        est = self.gradient_snr(
            method, self.model, self.sample, sigma, batch_size=SNR_BATCH, n_draws=SNR_DRAWS, generator=generator(self.device)
        )
        return float(est.value)

    def track_flux_snr(self, device, sigma):
        return self._snr("flux", sigma)

    track_flux_snr.unit = "SNR"

    def track_dsm_snr(self, device, sigma):
        return self._snr("dsm", sigma)

    track_dsm_snr.unit = "SNR"

    def track_flux_over_dsm_snr(self, device, sigma):
        return self._snr("flux", sigma) / self._snr("dsm", sigma)

    track_flux_over_dsm_snr.unit = "flux/DSM"
