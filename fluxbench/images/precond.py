"""EDM preconditioning: a raw U-Net F becomes a denoiser D and a noise-conditioned field f.

SPEC section 3 (Karras et al. 2022, Table 1), with sigma_data the data's standard deviation:

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = log(sigma) / 4

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)
    f(x, sigma) = (D(x, sigma) - x) / sigma^2

For data y of variance sigma_data^2 per coordinate and x = y + sigma n, the network's input
c_in x has unit variance, and so has its regression target (y - c_skip x) / c_out (the
value of F at which D = y): the network sees unit-scale inputs and outputs at every sigma.
f estimates the score of p_sigma = p * N(0, sigma^2 I) when D estimates E[y | x] (Tweedie);
it is the sigma^2-scaled drift, the field convention of fluxbench's samplers and objectives
(``model(x, sigma)``, sigma a standard deviation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive

__all__ = ["EDMField", "edm_coefficients"]


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape, > 0), same shape."""
    var = sigma * sigma + sigma_data * sigma_data
    c_skip = sigma_data * sigma_data / var
    c_out = sigma * sigma_data * var.rsqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMField(nn.Module):
    """The EDM-preconditioned field f(x, sigma) = (D(x, sigma) - x) / sigma^2 of a U-Net.

    Called like fluxbench's other noise-conditioned fields, ``model(x, sigma)``
    (``sigma_conditioned`` is True, so :func:`fluxbench.fields.at_sigma` fixes sigma).
    The preconditioning arithmetic runs in float32 (or x's dtype if wider) outside
    autocast; only the network F runs in autocast's precision, and the output has x's dtype.

    Args:
        unet: the raw network ``unet(x, c_noise)``, x (B, C, H, W), c_noise (B,).
        sigma_data: the data's standard deviation (0.5 for images scaled to [-1, 1]).
    """

    sigma_conditioned = True

    def __init__(self, unet: nn.Module, *, sigma_data: float = 0.5):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a torch.nn.Module; got {type(unet).__name__}")
        self.unet = unet
        self.sigma_data = check_positive(sigma_data, "sigma_data")

    def _sigma(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """sigma as a (B, 1, 1, 1) tensor in the preconditioning dtype; checks it.

        A tensor sigma is checked for finiteness and positivity with one host synchronisation
        per call: negligible against a U-Net pass, and log(sigma) of a bad level would
        otherwise turn the output into NaN silently.
        """
        if x.ndim != 4:
            raise ValueError(f"EDMField expects images of shape (B, C, H, W); got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype; got {x.dtype}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        elif s.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a number, a 0-d tensor or have shape ({x.shape[0]},); got {tuple(s.shape)}")
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError("sigma must be finite and > 0 (a standard deviation)")
        return s.reshape(-1, 1, 1, 1)

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise): x (B, C, H, W) -> (B, C, H, W), x's dtype.

        sigma: a float, a 0-d tensor or a (B,) tensor of positive noise levels.
        """
        s = self._sigma(x, sigma)
        return self._denoise(x, s)

    def _denoise(self, x: Tensor, s: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        xw = x.to(s.dtype)
        out = self.unet((c_in * xw).to(x.dtype), c_noise.reshape(-1))
        # the network's output may be bf16 under autocast: the skip sum is done in fp32
        return (c_skip * xw + c_out * out.to(s.dtype)).to(x.dtype)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """f(x, sigma) = (D(x, sigma) - x) / sigma^2: x (B, C, H, W) -> (B, C, H, W), x's dtype."""
        s = self._sigma(x, sigma)
        d = self._denoise(x, s).to(s.dtype)
        return ((d - x.to(s.dtype)) / (s * s)).to(x.dtype)
