"""Tests of fluxbench.recipes: one-call annealed and single-sigma recipes (issue 14)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fluxbench.fields import MLPField
from fluxbench.metrics import gaussian_w2
from fluxbench.recipes import AnnealedRecipe, Fitted, SingleSigmaRecipe, TrainingOptions, fit, sigma_grid
from fluxbench.targets import Gaussian, make_target

TINY = dict(steps=20, batch_size=32, hidden=(16,), sample_levels=20)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", ["flux", "dsm"])
def test_fit_runs_and_samples(method):
    target = make_target("triangle")
    fitted = fit(method, target.sample, AnnealedRecipe(**TINY), seed=1)
    assert isinstance(fitted, Fitted) and fitted.method == method and fitted.steps == 20
    assert fitted.sigma_eval == 0.02 and fitted.train_seconds > 0
    assert list(fitted.log["step"]) == list(range(1, 21))
    assert not any(p.requires_grad for p in fitted.model.parameters())  # the EMA copy
    x = fitted.sample(50, generator=gen(0))
    assert x.shape == (50, 2) and torch.isfinite(x).all()
    f = fitted.field(0.5)(x)
    assert f.shape == (50, 2)
    # field() at sigma_eval is the sigma-conditioned model at sigma_min
    torch.testing.assert_close(fitted.field()(x), fitted.model(x, torch.tensor(0.02)))


def test_fit_is_reproducible_bit_for_bit():
    data = make_target("ring").sample(500, generator=gen(3))
    recipe = AnnealedRecipe(**TINY, learn_proposal=True, normalise=True, chains=8)
    a = fit("flux", data, recipe, seed=4)
    b = fit("flux", data, recipe, seed=4)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.log.drop(columns="seconds").equals(b.log.drop(columns="seconds"))
    assert torch.equal(a.sample(30, generator=gen(1)), b.sample(30, generator=gen(1)))
    c = fit("flux", data, recipe, seed=5)
    assert not torch.equal(a.model.net[0].weight, c.model.net[0].weight)
    # the global random state is neither used nor changed
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    fit("dsm", data, AnnealedRecipe(**TINY), seed=4)
    assert torch.equal(before, torch.random.get_rng_state())


def test_sigma_grid_is_geometric():
    grid = sigma_grid(2.0, 0.02, 5, dtype=torch.float64)
    assert grid[0] == 2.0 and grid[-1] == 0.02
    ratios = grid[1:] / grid[:-1]
    torch.testing.assert_close(ratios, torch.full((4,), 0.01**0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="levels"):
        sigma_grid(2.0, 0.02, 1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        sigma_grid(0.02, 2.0, 5)


GAUSS_MEAN = torch.tensor([0.5, -0.3])
GAUSS_COV = torch.tensor([[1.0, 0.4], [0.4, 0.5]])


@pytest.mark.parametrize(
    ("method", "overrides", "tolerance"),
    [
        # measured at seeds 0, 1, 2: DSM (batch target, 2000 steps) 0.033, 0.033 (seeds 0, 1);
        # flux (800 steps, 64 chains) 0.058, 0.055, 0.093; untrained 3.1-3.5
        ("dsm", dict(steps=2000, dsm_target="batch"), 0.1),
        ("flux", dict(steps=800, chains=64), 0.15),
    ],
)
def test_annealed_model_lands_near_a_gaussian(method, overrides, tolerance):
    """Target N(m, S) in 2-D, so p_{sigma_min} = N(m, S + 0.02^2 I) is known exactly. Fit, draw 4000
    samples, and compare the Gaussian with their mean and covariance to it by the closed-form W2
    (sampling SE of that W2 ~0.015; the rest is the model's error). An untrained network scores
    ~3; the exact score through the same sampler 0.01."""
    target = Gaussian(GAUSS_MEAN, GAUSS_COV)
    recipe = AnnealedRecipe(hidden=(64, 64), sample_levels=200, **overrides)
    fitted = fit(method, target.sample, recipe, seed=0)
    x = fitted.sample(4000, generator=gen(1)).double()
    truth = target.smoothed(fitted.sigma_eval)
    dist = float(gaussian_w2(x.mean(0), torch.cov(x.T), truth.mean.double(), truth.covariance.double()))
    assert dist < tolerance, dist


class ZeroField(torch.nn.Module):
    sigma_conditioned = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma):
        return x * self.w


def test_annealed_sampler_starts_from_the_moments_of_p_sigma_max():
    """With f = 0 and two levels the sampler is x0 + sqrt(sigma_max^2 - sigma_min^2) xi, x0 ~
    N(data_mean, data_var + sigma_max^2): mean data_mean and variance data_var + 2 sigma_max^2 -
    sigma_min^2 per coordinate. 20000 draws; 4 standard errors (variance SE = var sqrt(2 / n))."""
    recipe = AnnealedRecipe(sigma_min=0.1, sigma_max=1.5, sample_levels=2)
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    fitted = Fitted(ZeroField(), recipe, "dsm", None, 0.0, 0, 0.1, mean, var)
    x = fitted.sample(20000, generator=gen(0)).double()
    expect_var = var.double() + 2 * 1.5**2 - 0.1**2
    n = x.shape[0]
    assert ((x.mean(0) - mean.double()).abs() < 4 * (expect_var / n).sqrt()).all()
    assert ((x.var(0) - expect_var).abs() < 4 * expect_var * math.sqrt(2 / n)).all()


def test_single_sigma_recipe():
    target = make_target("triangle")
    recipe = SingleSigmaRecipe(steps=10, batch_size=32, hidden=(16,), langevin_steps=5)
    fitted = fit("flux", target.sample, recipe, seed=0)
    assert fitted.sigma_eval == 0.1 and not getattr(fitted.model, "sigma_conditioned")
    x = fitted.sample(40, generator=gen(2))
    assert x.shape == (40, 2)
    # 5 Langevin steps of eps = 0.01 from N(0, I), with the fitted field
    x0 = torch.randn(40, 2, generator=gen(2))
    g = gen(2)
    torch.randn(40, 2, generator=g)
    xs = x0.clone()
    with torch.no_grad():
        for _ in range(5):
            noise = torch.randn(40, 2, generator=g)
            xs = xs + 0.01 * fitted.model(xs) + math.sqrt(0.02) * noise
    torch.testing.assert_close(x, xs)
    with pytest.raises(ValueError, match="trained at sigma=0.1"):
        fitted.field(0.3)


def test_user_model():
    data = torch.randn(200, 3, generator=gen(0))
    model = MLPField(3, hidden=(8, 8), sigma_conditioned=True)
    fitted = fit("dsm", data, AnnealedRecipe(**TINY), model=model)
    assert fitted.model.net[0].in_features == 4
    assert fitted.sample(10, generator=gen(1)).shape == (10, 3)
    with pytest.raises(ValueError, match="sigma_conditioned"):
        fit("dsm", data, AnnealedRecipe(**TINY), model=MLPField(3, hidden=(8,)))


def test_bad_input_errors():
    data = torch.randn(100, 2, generator=gen(0))
    for kwargs, match in [
        (dict(sigma_min=2.0, sigma_max=1.0), "sigma_min < sigma_max"),
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(ema_decay=1.5), "ema_decay"),
        (dict(ema_warmup=-1), "ema_warmup"),
        (dict(hidden=()), "hidden"),
        (dict(hidden=[16]), "hidden"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(sample_levels=1), "sample_levels"),
        (dict(dsm_target="exact"), "dsm_target"),
        (dict(chains=0), "chains"),
        (dict(grad_clip=0.0), "grad_clip"),
    ]:
        with pytest.raises(ValueError, match=match):
            AnnealedRecipe(**kwargs)
    with pytest.raises(ValueError, match="sigma"):
        SingleSigmaRecipe(sigma=-0.1)
    with pytest.raises(ValueError, match="langevin_step"):
        SingleSigmaRecipe(langevin_step=0.0)
    with pytest.raises(ValueError, match="method"):
        fit("score", data, AnnealedRecipe(**TINY))
    with pytest.raises(ValueError, match="recipe"):
        fit("dsm", data, dict(TINY))
    with pytest.raises(ValueError, match="seed"):
        fit("dsm", data, AnnealedRecipe(**TINY), seed=-1)
    with pytest.raises(ValueError, match="data"):
        fit("dsm", "points", AnnealedRecipe(**TINY))
    bad = data.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="data"):
        fit("dsm", bad, AnnealedRecipe(**TINY))
    with pytest.raises(ValueError, match="device"):
        fit("dsm", data, AnnealedRecipe(**TINY), device="nonsense")
    fitted = fit("dsm", data, AnnealedRecipe(**TINY))
    with pytest.raises(ValueError, match="generator"):
        fitted.sample(10, generator=None)
    with pytest.raises(ValueError, match="n"):
        fitted.sample(0, generator=gen(0))
    with pytest.raises(ValueError, match="sigma"):
        fitted.field(-1.0)


def test_recipes_share_one_definition_of_their_training_options():
    """The training options are declared and checked once (TrainingOptions) with each
    recipe's own defaults; every field is keyword-only (19 positional fields invited
    silent mix-ups)."""
    shared = {f.name for f in dataclasses.fields(TrainingOptions)}
    assert {"steps", "lr", "grad_clip", "ema_decay", "hidden", "chains", "horizon", "dsm_target"} <= shared
    for cls, defaults in ((AnnealedRecipe, dict(steps=20000, lr_schedule="cosine", ema_warmup=10, chains=64)),
                          (SingleSigmaRecipe, dict(steps=3000, lr_schedule="constant", ema_warmup=0, chains=None))):
        recipe = cls()
        assert isinstance(recipe, TrainingOptions)
        assert {k: getattr(recipe, k) for k in defaults} == defaults
        with pytest.raises(ValueError, match="horizon"):
            cls(horizon=0.0)
        with pytest.raises(TypeError, match="positional"):
            cls(0.1)

