"""Training recipes in one call: noise-annealed (the default) and single-sigma.

    fitted = fit("flux", target.sample)                  # AnnealedRecipe()
    x = fitted.sample(2000, generator=torch.Generator().manual_seed(0))
    # compare x with target.smoothed(fitted.sigma_eval).sample(2000, ...)

:class:`AnnealedRecipe` (SPEC section 2, "Noise annealing"; section 3, annealed reverse-VE
sampler) trains a sigma-conditioned field f(x, sigma) with log sigma ~ Uniform[log sigma_min,
log sigma_max], one sigma per batch, with gradient clipping, a cosine learning-rate decay and
an EMA with warm-up, and samples it by annealing from sigma_max down to sigma_min. It is the
same recipe for Flux Matching and for DSM. :class:`SingleSigmaRecipe` is the earlier demo: one
sigma, a plain field, unadjusted Langevin from N(0, I); for Flux Matching it is biased towards
too-sharp fields at finite batch size (SPEC section 7: W2 0.44 or more against DSM's 0.31 on
the triangle at sigma = 0.1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Union

import pandas as pd
import torch
from torch import Tensor, nn

from ._checks import check_generator, check_points, check_positive, check_positive_int
from .fields import MLPField, at_sigma, is_sigma_conditioned
from .objectives import DenoisingScoreMatching, FluxMatching
from .samplers import annealed_langevin, langevin
from .train import LR_SCHEDULES, train

__all__ = ["AnnealedRecipe", "SingleSigmaRecipe", "TrainingOptions", "Fitted", "fit", "METHODS", "sigma_grid", "recipe_fields"]

METHODS = ("flux", "dsm")


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """The training options both recipes share; every recipe field is keyword-only.

    Adam at ``lr`` with the ``lr_schedule`` of :func:`fluxbench.train.train`, the model's
    gradient clipped at ``grad_clip`` (None: no clipping), an EMA of decay ``ema_decay``
    warmed up over ``ema_warmup`` steps, ``steps`` steps of ``batch_size`` points, the field
    an MLP of widths ``hidden``. Flux Matching's ``learn_proposal``, ``chains`` (None: every
    point anchors a chain), ``horizon`` and ``substeps``; DSM's ``dsm_target`` ("plain" or
    "batch"). The defaults that differ between the recipes (``steps``, ``lr_schedule``,
    ``ema_warmup``, ``chains``) are set by each recipe.
    """

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: int
    hidden: tuple[int, ...] = (128, 128)
    learn_proposal: bool = False
    chains: int | None
    horizon: float = 4.0
    substeps: int = 4
    dsm_target: str = "plain"

    def _check_training(self) -> None:
        """Validate the shared options (each recipe calls it after its noise level's check)."""
        check_positive_int(self.steps, "steps")
        check_positive_int(self.batch_size, "batch_size")
        check_positive(self.lr, "lr")
        if self.grad_clip is not None:
            check_positive(self.grad_clip, "grad_clip")
        if not 0.0 <= float(self.ema_decay) <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1]; got {self.ema_decay}")
        check_positive_int(self.ema_warmup, "ema_warmup", minimum=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ValueError(f"hidden must be a non-empty tuple of layer widths; got {self.hidden!r}")
        for width in self.hidden:
            check_positive_int(width, "hidden width")
        if self.chains is not None:
            check_positive_int(self.chains, "chains")
        if self.dsm_target not in ("plain", "batch"):
            raise ValueError(f"dsm_target must be 'plain' or 'batch'; got {self.dsm_target!r}")
        check_positive(self.horizon, "horizon")
        check_positive_int(self.substeps, "substeps")


@dataclass(frozen=True, kw_only=True)
class AnnealedRecipe(TrainingOptions):
    """Noise-annealed training and sampling (the default recipe).

    Training (SPEC section 2, "Noise annealing"): one sigma per batch with log sigma ~
    Uniform[log ``sigma_min``, log ``sigma_max``]; the field is ``MLPField(d, hidden,
    sigma_conditioned=True)``, f(x, sigma) = net([x, log sigma]) / sigma. Adam at ``lr``
    (cosine decay by default), the model's gradient clipped at ``grad_clip``; the EMA decay
    at step k is min(``ema_decay``, (1 + k) / (``ema_warmup`` + k)). Flux Matching options:
    ``learn_proposal`` (exponential time proposal trained by REINFORCE), ``normalise``
    (loss normaliser c(sigma)), ``chains`` (reference chains from this many anchors per
    batch, Horvitz-Thompson reweighted; cheaper steps, same expectation), ``horizon``,
    ``substeps``; DSM ignores them. DSM uses the ``dsm_target`` target ("plain" or "batch"),
    weighted by sigma^2.

    Sampling (SPEC section 3): annealed reverse-VE Euler-Maruyama over the geometric grid
    :func:`sigma_grid` of ``sample_levels`` levels from ``sigma_max`` to ``sigma_min``
    (the step at level i is sigma_i^2 - sigma_{i+1}^2, a fixed fraction 1 - r^2 of
    sigma_i^2), with ``corrector_steps`` Langevin corrector steps (signal-to-noise ``snr``)
    per level, started from the Gaussian with the mean and per-coordinate variance of
    p_{sigma_max} (those of the data plus sigma_max^2). The samples approximate
    p_{sigma_min} = p * N(0, sigma_min^2 I).

    Defaults, measured with ``fluxbench demo --seed 0/1/2`` (triangle, 2000 samples; table
    by ``tools/recipe_ablation.py``): 20000 steps, B = 256, lr 1e-3 with cosine decay, model
    gradient clipped at 1, EMA 0.999 with warm-up 10, the loss normaliser on, the time proposal
    off, 64 chains per batch (a flux step costs ~2.7 ms instead of ~8 ms on one core of this
    CPU), 500 sampler levels. Mean W2 flux 0.251, DSM 0.236, noise floor 0.237 (seeds 3-5:
    flux 0.207, DSM 0.242, floor 0.211). With the normaliser off flux scored 0.267; with the
    proposal 0.272 (proposal alone) and 0.266 (with the normaliser), all within the seeds'
    spread (paired SE ~0.015). Without the EMA warm-up a short run keeps much of its random
    initialisation in the average (0.999^2000 = 0.14 after 2000 steps).
    """

    sigma_min: float = 0.02
    sigma_max: float = 2.0
    steps: int = 20000
    lr_schedule: str = "cosine"
    ema_warmup: int = 10
    normalise: bool = True
    chains: int | None = 64
    sample_levels: int = 500
    corrector_steps: int = 0
    snr: float = 0.16

    def __post_init__(self) -> None:
        check_positive(self.sigma_min, "sigma_min")
        check_positive(self.sigma_max, "sigma_max")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max; got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        self._check_training()
        check_positive_int(self.sample_levels, "sample_levels", minimum=2)
        check_positive_int(self.corrector_steps, "corrector_steps", minimum=0)
        check_positive(self.snr, "snr")

    @property
    def sigma_eval(self) -> float:
        """The noise level the samples approximate: ``sigma_min``."""
        return float(self.sigma_min)


@dataclass(frozen=True, kw_only=True)
class SingleSigmaRecipe(TrainingOptions):
    """One noise level, a plain (not sigma-conditioned) field, Langevin sampling.

    The earlier demo: train ``MLPField(d, hidden)`` at the single ``sigma``, sample by
    unadjusted Langevin (step ``langevin_step``, ``langevin_steps`` steps) from N(0, I). The
    samples approximate p_sigma up to the O(step) bias of Langevin. For Flux Matching this
    recipe is biased at finite batch size towards too-sharp fields (SPEC section 7: on the
    triangle at sigma = 0.1, B = 256, the expected loss over f = c s is minimised at c = 1.38;
    no lever tried brings flux's mean W2 over three seeds below 0.44, DSM 0.31, noise floor
    0.24). Fields as for :class:`AnnealedRecipe` (``ema_warmup`` 0 and a constant learning
    rate reproduce the old demo).
    """

    sigma: float = 0.1
    steps: int = 3000
    lr_schedule: str = "constant"
    ema_warmup: int = 0
    chains: int | None = None
    langevin_step: float = 0.01
    langevin_steps: int = 2000

    def __post_init__(self) -> None:
        check_positive(self.sigma, "sigma")
        self._check_training()
        check_positive(self.langevin_step, "langevin_step")
        check_positive_int(self.langevin_steps, "langevin_steps", minimum=0)

    @property
    def sigma_eval(self) -> float:
        """The noise level the samples approximate: ``sigma``."""
        return float(self.sigma)


Recipe = Union[AnnealedRecipe, SingleSigmaRecipe]


def sigma_grid(sigma_max: float, sigma_min: float, levels: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Geometric grid sigma_i = sigma_max r^(i - 1), i = 1..levels, r = (sigma_min / sigma_max)^(1 / (levels - 1)).

    Returns:
        (levels,) strictly decreasing, first ``sigma_max``, last ``sigma_min``.
    """
    sigma_max = check_positive(sigma_max, "sigma_max")
    sigma_min = check_positive(sigma_min, "sigma_min")
    levels = check_positive_int(levels, "levels", minimum=2)
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), levels, dtype=torch.float64)
    grid[0], grid[-1] = sigma_max, sigma_min
    return grid.to(device=device, dtype=dtype)


@dataclass
class Fitted:
    """A fitted model with its sampler (returned by :func:`fit`).

    Attributes:
        model: the EMA network, in eval mode; ``model(x, sigma)`` for the annealed recipe,
            ``model(x)`` for the single-sigma one.
        recipe: the recipe used.
        method: ``"flux"`` or ``"dsm"``.
        log: the training log (see :func:`fluxbench.train.train`).
        train_seconds: wall-clock seconds of training.
        steps: optimiser steps done.
        sigma_eval: the noise level the samples approximate (``recipe.sigma_eval``).
        data_mean, data_var: (d,) mean and per-coordinate variance of the training data
            (start of the annealed sampler).
    """

    model: nn.Module
    recipe: Recipe
    method: str
    log: pd.DataFrame
    train_seconds: float
    steps: int
    sigma_eval: float
    data_mean: Tensor
    data_var: Tensor

    @property
    def annealed(self) -> bool:
        return isinstance(self.recipe, AnnealedRecipe)

    def field(self, sigma: float | None = None) -> Callable[[Tensor], Tensor]:
        """The plain field x -> f(x) at ``sigma`` (default ``sigma_eval``); (N, d) -> (N, d).

        Raises:
            ValueError: sigma <= 0, or a sigma other than the trained one for the single-sigma recipe.
        """
        sigma = self.sigma_eval if sigma is None else check_positive(sigma, "sigma")
        if not self.annealed and sigma != self.sigma_eval:
            raise ValueError(f"this model was trained at sigma={self.sigma_eval} only; got sigma={sigma}")
        return at_sigma(self.model, sigma)

    def sample(self, n: int, *, generator: torch.Generator, device=None) -> Tensor:
        """Draw n samples approximating p_{sigma_eval} (SPEC section 3).

        Annealed recipe: x ~ N(data_mean, data_var + sigma_max^2) per coordinate, then the
        annealed reverse-VE sampler over ``sigma_grid(sigma_max, sigma_min, sample_levels)``.
        Single sigma: x ~ N(0, I), then ``langevin_steps`` unadjusted Langevin steps.

        Args:
            n: number of samples, >= 1.
            generator: the source of every draw, on ``device``.
            device: where to sample; default the model's device.

        Returns:
            (n, d) float32 samples on ``device``.
        """
        n = check_positive_int(n, "n")
        dev = next(self.model.parameters()).device if device is None else torch.device(device)
        if generator is None:
            raise ValueError("generator is required (a torch.Generator on the sampling device)")
        check_generator(generator, dev)
        self.model.to(dev)
        d = self.data_mean.shape[0]
        r = self.recipe
        if not self.annealed:
            x0 = torch.randn(n, d, generator=generator, device=dev)
            return langevin(self.field(), x0, step_size=r.langevin_step, n_steps=r.langevin_steps, generator=generator)
        std = (self.data_var.to(dev) + r.sigma_max**2).sqrt()
        x0 = self.data_mean.to(dev) + std * torch.randn(n, d, generator=generator, device=dev)
        grid = sigma_grid(r.sigma_max, r.sigma_min, r.sample_levels, device=dev)
        return annealed_langevin(self.model, x0, grid, generator=generator, corrector_steps=r.corrector_steps, snr=r.snr)


def _data_moments(data, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(d,) mean and variance of a data tensor, or of 4096 draws of a sampler (with a generator
    of its own on ``device``: the training stream is untouched); on the CPU in float32."""
    if isinstance(data, Tensor):
        x = check_points(data, "data").detach()
    elif callable(data):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + 7919)
        x = check_points(data(4096, generator=gen), "data sample")
    else:
        raise ValueError(
            "data must be an (N, d) tensor or a callable sample(n, generator=...) -> (n, d); " f"got {type(data).__name__}"
        )
    x = x.to("cpu", torch.float64)
    var = x.var(0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=torch.float64)
    return x.mean(0).float(), var.float()


def _objective(method: str, recipe: Recipe) -> nn.Module:
    noise = (recipe.sigma_min, recipe.sigma_max) if isinstance(recipe, AnnealedRecipe) else recipe.sigma
    if method == "dsm":
        return DenoisingScoreMatching(noise, target=recipe.dsm_target)
    return FluxMatching(
        noise,
        horizon=recipe.horizon,
        substeps=recipe.substeps,
        learn_proposal=recipe.learn_proposal,
        normalise=getattr(recipe, "normalise", False),
        chains=recipe.chains,
    )


def fit(
    method: str,
    data: Tensor | Callable[..., Tensor],
    recipe: Recipe = AnnealedRecipe(),
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
) -> Fitted:
    """Train a field with ``method`` under ``recipe`` and return it with its sampler.

    The network (unless ``model`` is given) is initialised from ``seed`` without touching
    the global random state, and training draws everything from a generator seeded with
    ``seed`` on ``device``: the same call gives bit-identical weights on the CPU.

    Args:
        method: ``"flux"`` (Flux Matching, SPEC section 2) or ``"dsm"`` (denoising score matching).
        data: an (N, d) tensor, or a callable ``sample(n, generator=...) -> (n, d)`` that
            returns batches on ``device`` for a generator on ``device`` (e.g.
            ``target.to(device).sample``).
        recipe: an :class:`AnnealedRecipe` (default) or a :class:`SingleSigmaRecipe`.
        seed: >= 0.
        device: training device (default: the model's, else CPU).
        model: optional network, called ``model(x, sigma)`` (annealed) or ``model(x)``
            (single sigma); trained in place. Default ``MLPField(d, recipe.hidden)``,
            sigma-conditioned for the annealed recipe.
        progress: show a progress bar.

    Returns:
        A :class:`Fitted` holding the EMA model.

    Raises:
        ValueError: an unknown method, a recipe of another type, bad data, seed < 0, a
            model whose output does not match its input.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(recipe, (AnnealedRecipe, SingleSigmaRecipe)):
        raise ValueError(f"recipe must be an AnnealedRecipe or a SingleSigmaRecipe; got {type(recipe).__name__}")
    seed = check_positive_int(seed, "seed", minimum=0)
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    annealed = isinstance(recipe, AnnealedRecipe)
    if device is not None:
        try:
            dev = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string; got {device!r}") from exc
    else:
        dev = next((p.device for p in model.parameters()), torch.device("cpu")) if model is not None else torch.device("cpu")
    if model is not None and annealed and not is_sigma_conditioned(model):
        raise ValueError(
            "the annealed recipe needs a noise-conditioned model called model(x, sigma) with the attribute "
            "sigma_conditioned = True (e.g. MLPField(d, sigma_conditioned=True))"
        )
    mean, var = _data_moments(data, seed, dev)
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MLPField(mean.shape[0], hidden=recipe.hidden, sigma_conditioned=annealed)
    start = time.perf_counter()
    result = train(
        model,
        _objective(method, recipe),
        data,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        lr_schedule=recipe.lr_schedule,
        ema_decay=recipe.ema_decay,
        ema_warmup=recipe.ema_warmup,
        grad_clip=recipe.grad_clip,
        seed=seed,
        progress=progress,
        device=dev,
    )
    seconds = time.perf_counter() - start
    return Fitted(
        model=result.ema_model.eval(),
        recipe=recipe,
        method=method,
        log=result.log,
        train_seconds=seconds,
        steps=result.steps_done,
        sigma_eval=recipe.sigma_eval,
        data_mean=mean,
        data_var=var,
    )


def recipe_fields(recipe: Recipe) -> dict[str, object]:
    """The recipe's fields as a plain dict (for records)."""
    return {f.name: getattr(recipe, f.name) for f in fields(recipe)}
