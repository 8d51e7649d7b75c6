"""EDM preconditioning: the coefficients, f = (D - x) / sigma^2, sigma's forms, precision."""

from __future__ import annotations

import math

import pytest
import torch

from fluxbench.fields import at_sigma
from fluxbench.images.precond import EDMField, edm_coefficients
from fluxbench.images.unet import small_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_field(dtype=torch.float32, seed: int = 0) -> EDMField:
    field = EDMField(small_unet(1)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return field


@pytest.mark.parametrize("sigma", [0.01, 0.5, 5.0, 80.0])
def test_network_input_and_target_have_unit_variance(sigma):
    """For y ~ N(0, sigma_data^2) and x = y + sigma n: Var(c_in x) = 1 and the regression target
    (y - c_skip x) / c_out has variance 1. 400k draws: the sample variance's SE is
    sqrt(2 / 400k) = 0.0022; tolerance 5 SE."""
    sd = 0.5
    gen = torch.Generator().manual_seed(1)
    y = sd * torch.randn(400_000, generator=gen, dtype=torch.float64)
    x = y + sigma * torch.randn(400_000, generator=gen, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sd)
    tol = 5 * math.sqrt(2 / 400_000)
    assert float((c_in * x).var()) == pytest.approx(1.0, abs=tol)
    assert float(((y - c_skip * x) / c_out).var()) == pytest.approx(1.0, abs=tol)
    assert float(c_noise) == pytest.approx(math.log(sigma) / 4, rel=1e-12)


def test_field_is_denoiser_minus_input_over_sigma_squared():
    field = _random_field(torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 12.0], dtype=torch.float64)
    expected = (field.denoise(x, sigma) - x) / sigma.reshape(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(field(x, sigma), expected, rtol=1e-12, atol=0)


def test_denoiser_is_the_preconditioned_network():
    field = _random_field(torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.3, 3.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(s.reshape(-1, 1, 1, 1), 0.5)
    expected = c_skip * x + c_out * field.unet(c_in * x, c_noise.reshape(-1))
    torch.testing.assert_close(field.denoise(x, s), expected, rtol=1e-12, atol=1e-14)


def test_initial_field_is_the_exact_score_of_gaussian_data():
    """F = 0 at initialisation, so f = (c_skip - 1) x / sigma^2 = -x / (sigma^2 + sigma_data^2):
    the score of N(0, (sigma_data^2 + sigma^2) I), i.e. of Gaussian data of std sigma_data.
    Tolerance: D - x cancels to a relative size sigma^2 / (sigma^2 + sigma_data^2), so a few
    float64 roundings of D are amplified by the inverse of that."""
    field = EDMField(small_unet(1), sigma_data=0.5).double()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for sigma in (0.002, 0.3, 80.0):
        rtol = 4 * torch.finfo(torch.float64).eps * (sigma**2 + 0.25) / sigma**2
        torch.testing.assert_close(field(x, sigma), -x / (sigma**2 + 0.25), rtol=rtol, atol=0)


def test_sigma_as_number_zero_d_tensor_or_vector_agree():
    field = _random_field()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = field(x, 0.4)
    torch.testing.assert_close(field(x, torch.tensor(0.4)), a, rtol=0, atol=0)
    torch.testing.assert_close(field(x, torch.full((3,), 0.4)), a, rtol=0, atol=0)
    # per-image levels: row i equals a call with that image's sigma alone
    s = torch.tensor([0.1, 1.0, 10.0])
    rows = torch.cat([field(x[i:i + 1], float(s[i])) for i in range(3)])
    torch.testing.assert_close(field(x, s), rows, rtol=1e-5, atol=1e-6)


def test_works_as_a_package_field_through_at_sigma():
    field = _random_field()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(at_sigma(field, 0.3)(x), field(x, 0.3), rtol=0, atol=0)


def test_bf16_autocast_keeps_a_float32_output():
    """Under bf16 autocast only the U-Net runs in bf16; f comes back in x's dtype (float32), as the
    package's field checks require, and close to the float32 result (bf16 keeps 8 significant
    bits, ~0.4% per rounding; 5% bounds a few dozen layers of such errors)."""
    field = _random_field()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = field.denoise(x, 0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = field.denoise(x, 0.5)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_gradient_reaches_the_network():
    field = EDMField(small_unet(1))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    field(x, 0.5).square().sum().backward()
    assert float(field.unet.conv_out.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "x, sigma, error, message",
    [
        (torch.zeros(2, 64), 0.5, ValueError, r"\(B, C, H, W\)"),
        (torch.zeros(2, 1, 8, 8), -1.0, ValueError, "> 0"),
        (torch.zeros(2, 1, 8, 8), torch.ones(3), ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.int64), 0.5, TypeError, "floating"),
    ],
)
def test_bad_inputs_are_rejected(x, sigma, error, message):
    with pytest.raises(error, match=message):
        EDMField(small_unet(1))(x, sigma)


def test_bad_construction_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        EDMField(lambda x, c: x)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMField(small_unet(1), sigma_data=0.0)
