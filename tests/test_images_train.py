"""Image training: the flattening adapter, EDM's DSM weighting and sigma law, the loop's
checkpoint/resume and errors (one process; the multi-process checks are in
test_images_distributed.py), and image checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from fluxbench.images.checkpoint import load_field, read_checkpoint
from fluxbench.images.flatten import ImageObjective, image_objective
from fluxbench.images.precond import EDMField, edm_coefficients
from fluxbench.images.train import step_seed, train_images
from fluxbench.images.unet import small_unet
from fluxbench.objectives import FluxMatching

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _field(seed: int = 0) -> EDMField:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMField(small_unet(1, channels=8))


def _data(n: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_image_objective_is_the_vector_objective_on_flattened_images():
    """A field that mixes pixels, f(x) = A vec(x): the image objective on (B, 1, 4, 4) images
    and FluxMatching on the (B, 16) vectors with f(z) = A z give the same loss, draw for draw."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4
    images = torch.randn(32, 1, 4, 4, generator=gen, dtype=torch.float64)

    class Images(torch.nn.Module):
        sigma_conditioned = True

        def forward(self, x, sigma):
            return (x.reshape(x.shape[0], -1) @ a.T).reshape(x.shape) / (1 + sigma**2)

    class Vectors(torch.nn.Module):
        sigma_conditioned = True

        def forward(self, z, sigma):
            return z @ a.T / (1 + sigma**2)

    inner = FluxMatching(0.4, learn_proposal=False, normalise=False)
    got = ImageObjective(inner)(Images(), images, torch.Generator().manual_seed(2)).loss
    want = inner(Vectors(), images.reshape(32, 16), torch.Generator().manual_seed(2)).loss
    assert float(got) == float(want)
    # the check can fail: a transposed flattening changes the loss
    transposed = inner(Vectors(), images.transpose(2, 3).reshape(32, 16), torch.Generator().manual_seed(2)).loss
    assert float(transposed) != float(want)


def test_dsm_has_edm_weighting():
    """loss = mean_i lambda(sigma) |D(x0_i) - y_i|^2, lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    recomputed by hand from the same draws (sigma first, then the noise)."""
    field = _field().double()
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.1)
    y = _data(16).double()
    objective = image_objective("dsm")
    out = objective(field, y, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    sigma = math.exp(-1.2 + 1.2 * float(torch.randn((), generator=gen, dtype=torch.float64)))
    xi = torch.randn(16, 64, generator=gen, dtype=torch.float64).reshape(y.shape)
    d = field.denoise(y + sigma * xi, sigma)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam * (d - y).square().sum((1, 2, 3)).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(out.logs["sigma"]) == pytest.approx(sigma, rel=1e-12)


def test_lambda_is_one_over_c_out_squared():
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    c_out = edm_coefficients(s, 0.5)[1]
    torch.testing.assert_close((s**2 + 0.25) / (s * 0.5) ** 2, 1 / c_out**2, rtol=1e-14, atol=0)


def test_sigma_follows_edms_log_normal():
    """log sigma ~ N(-1.2, 1.2^2): 4000 draws, SE of the mean 1.2 / sqrt(4000) = 0.019 and of the
    std about 1.2 / sqrt(8000) = 0.013; tolerance 4 SE."""
    noise = image_objective("flux").inner.noise
    gen = torch.Generator().manual_seed(4)
    like = torch.zeros((), dtype=torch.float64)
    logs = torch.tensor([math.log(noise.sample(like, gen)) for _ in range(4000)])
    assert float(logs.mean()) == pytest.approx(-1.2, abs=4 * 1.2 / math.sqrt(4000))
    assert float(logs.std()) == pytest.approx(1.2, abs=4 * 1.2 / math.sqrt(8000))


def test_flux_objective_has_proposal_and_normaliser():
    inner = image_objective("flux").inner
    assert inner.proposal is not None and inner.normaliser is not None
    bare = image_objective("flux", learn_proposal=False, normalise=False).inner
    assert bare.proposal is None and bare.normaliser is None


def test_step_seeds_are_deterministic_and_distinct():
    assert step_seed(0, 1, "data/0") == step_seed(0, 1, "data/0")
    seeds = {step_seed(s, k, f"data/{r}") for s in range(3) for k in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("method", ["flux", "dsm"])
def test_resume_is_bit_identical(tmp_path, method):
    kwargs = dict(method=method, batch_size=8, lr=1e-3, objective_options={"chains": 4} if method == "flux" else None)
    whole = train_images(_field(), _data(), steps=4, **kwargs)
    ckpt = tmp_path / "ckpt.pt"
    train_images(_field(), _data(), steps=2, checkpoint=ckpt, **kwargs)
    resumed = train_images(_field(seed=5), _data(), steps=4, checkpoint=ckpt, resume=True, **kwargs)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    # rows: the first run's last step (2), then step 4
    assert list(resumed.log["step"]) == [2, 4] and read_checkpoint(ckpt)["step"] == 4


def test_resume_refuses_other_settings(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train_images(_field(), _data(), method="dsm", steps=1, batch_size=8, checkpoint=ckpt)
    with pytest.raises(ValueError, match="lr="):
        train_images(_field(), _data(), method="dsm", steps=2, batch_size=8, lr=5e-4, checkpoint=ckpt, resume=True)


def test_load_field_gives_the_ema_or_the_trained_weights(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    result = train_images(_field(), _data(), method="dsm", steps=3, batch_size=8, lr=1e-2, ema_decay=0.5, checkpoint=ckpt)
    ema, config = load_field(ckpt)
    raw, _ = load_field(ckpt, ema=False)
    assert config["method"] == "dsm" and config["image_shape"] == [1, 8, 8]
    for k, v in result.ema_model.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    for k, v in result.model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
    assert not ema.training


def test_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_field(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_field(bad)
    other = tmp_path / "other.pt"
    torch.save({"step": 1}, other)
    with pytest.raises(ValueError, match="missing version"):
        load_field(other)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"method": "sm"}, ValueError, "method"),
        ({"precision": "fp16"}, ValueError, "precision"),
        ({"steps": 0}, ValueError, "steps"),
        ({"resume": True}, ValueError, "checkpoint path"),
        ({"data": torch.zeros(4, 64)}, ValueError, r"\(N, C, H, W\)"),
        ({"data": torch.full((4, 1, 8, 8), float("nan"))}, ValueError, "finite"),
        ({"field": torch.nn.Linear(2, 2)}, TypeError, "EDMField"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    args = {"field": _field(), "data": _data(), "steps": 1, "batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        train_images(args.pop("field"), args.pop("data"), **args)
