"""An EDM-style U-Net F(x, c_noise) for image fields (SPEC section 3).

The raw network that :class:`fluxbench.images.EDMField` preconditions: it maps an image x
(B, C, R, R) and a noise label c_noise = log(sigma) / 4 (B,) to an image of the same shape.
The layout follows the U-Nets of Karras et al. (2022, "EDM"; their DDPM++ SongUNet):

* noise embedding: sinusoidal features of c_noise, e_k = [cos(c w_k), sin(c w_k)] with
  w_k = (1 / 10000)^(k / (n/2)) scaled by 1000 (EDM's positional embedding), then an MLP
  n -> 4n -> 4n (SiLU); the result is added (as a per-channel scale and shift) to every
  residual block;
* residual block: GroupNorm, SiLU, 3x3 conv, then GroupNorm modulated by the embedding
  (h <- norm(h) (1 + scale) + shift), SiLU, dropout, 3x3 conv (zero-initialised, so
  every block starts as the identity on its skip path), skip (1x1 conv when the channel
  count changes), sum scaled by 1/sqrt(2);
* self-attention (GroupNorm, 1x1 qkv, multi-head attention, 1x1 projection initialised
  at zero, residual) after the blocks whose feature map has a resolution listed in
  ``attention_resolutions``; the softmax runs in float32 with autocast disabled;
* levels of ``channels * multipliers[i]`` channels at resolution R / 2^i, ``num_blocks``
  blocks each on the way down (2x2 average-pool downsampling between levels) and
  ``num_blocks + 1`` on the way up (nearest-neighbour upsampling), each up block taking
  the matching encoder activation concatenated on the channel axis;
* output: GroupNorm, SiLU, 3x3 conv initialised at zero (F = 0 at initialisation, so the
  preconditioned denoiser starts as D = c_skip x).

The paper's CIFAR-10 network is ``UNet(3, channels=128, multipliers=(1, 2, 2, 2),
resolution=32)`` (EDM's DDPM++ layout: 4 blocks per level, attention at 16x16; about 56M
parameters); :func:`small_unet` is a tiny one for tests and CPU runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive, check_positive_int
from ..kernels import no_autocast

__all__ = ["UNet", "small_unet"]


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (EDM's choice)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> (B, 4n): sinusoidal features of width n, then a two-layer SiLU MLP."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"the noise embedding needs an even number of channels; got {channels}")
        half = channels // 2
        freqs = (1.0 / 10000.0) ** (torch.arange(half, dtype=torch.float32) / half)
        # a buffer, not a parameter: fixed frequencies (moved with the module's device)
        self.register_buffer("freqs", 1000.0 * freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention over the R*R positions of a (B, C, R, R) map, residual."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} attention heads")
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].float() for i in range(3))  # (B, heads, C/heads, HW)
        # written out rather than F.scaled_dot_product_attention: Flux Matching differentiates
        # the field twice (grad of a Jacobian-vector product), which the fused CPU kernels do
        # not support; the softmax over positions stays in float32 even under bf16 autocast
        with no_autocast(x.device):
            weights = torch.softmax(torch.einsum("bhci,bhcj->bhij", q, k) / math.sqrt(q.shape[2]), dim=-1)
            out = torch.einsum("bhij,bhcj->bhci", weights, v)
        out = out.to(qkv.dtype).reshape(b, c, h, w)
        return x + self.proj(out)


class ResBlock(nn.Module):
    """Residual block with the noise embedding as a scale and shift after the second norm."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, dropout: float, attention: bool):
        super().__init__()
        self.norm0 = _norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attention = Attention(out_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        # 1/sqrt(2) keeps the activations' scale as blocks are stacked (EDM's skip_scale)
        x = (h + self.skip(x)) * (1 / math.sqrt(2))
        return x if self.attention is None else self.attention(x)


class UNet(nn.Module):
    """F(x, c_noise): (B, C, R, R) images and (B,) noise labels -> (B, C_out, R, R).

    Args:
        in_channels: C, the image channels.
        channels: base width n; level i has n * multipliers[i] channels.
        multipliers: channel multiplier per resolution level (R, R/2, R/4, ...).
        num_blocks: residual blocks per level on the way down (one more on the way up).
        resolution: R, the (square) image size; must be divisible by 2^(levels - 1).
        attention_resolutions: feature-map sizes after whose blocks self-attention runs.
        dropout: dropout probability inside the residual blocks.
        out_channels: output channels (default ``in_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int = 128,
        multipliers: tuple[int, ...] = (1, 2, 2, 2),
        num_blocks: int = 4,
        resolution: int = 32,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels if out_channels is not None else in_channels, "out_channels")
        channels = check_positive_int(channels, "channels")
        multipliers = tuple(multipliers)
        if not multipliers:
            raise ValueError("multipliers must name at least one level")
        for m in multipliers:
            check_positive_int(m, "channel multiplier")
        num_blocks = check_positive_int(num_blocks, "num_blocks")
        self.resolution = check_positive_int(resolution, "resolution")
        if resolution % 2 ** (len(multipliers) - 1):
            raise ValueError(
                f"resolution {resolution} cannot be halved {len(multipliers) - 1} times (one per level after the "
                f"first, multipliers={multipliers}); use fewer levels or another resolution"
            )
        dropout = check_positive(dropout, "dropout", allow_zero=True)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.config = {
            "in_channels": self.in_channels,
            "channels": channels,
            "multipliers": list(multipliers),
            "num_blocks": num_blocks,
            "resolution": self.resolution,
            "attention_resolutions": list(attention_resolutions),
            "dropout": dropout,
            "out_channels": self.out_channels,
        }

        emb = 4 * channels
        self.embedding = NoiseEmbedding(channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels]
        ch, res = channels, resolution
        for level, mult in enumerate(multipliers):
            if level > 0:
                self.down.append(nn.AvgPool2d(2))
                res //= 2
                skips.append(ch)
            for _ in range(num_blocks):
                block = ResBlock(ch, channels * mult, emb, dropout=dropout, attention=res in attention_resolutions)
                self.down.append(block)
                ch = channels * mult
                skips.append(ch)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(multipliers))):
            for _ in range(num_blocks + 1):
                block = ResBlock(ch + skips.pop(), channels * mult, emb, dropout=dropout, attention=res in attention_resolutions)
                self.up.append(block)
                ch = channels * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """x (B, C, R, R), c_noise (B,) -> (B, C_out, R, R) in the compute dtype (autocast's under autocast)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"UNet expects images of shape (B, {self.in_channels}, {self.resolution}, {self.resolution}); "
                f"got {tuple(x.shape)}"
            )
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), one label per image; got {tuple(c_noise.shape)}")
        emb = self.embedding(c_noise)
        h = self.conv_in(x)
        stack = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            stack.append(h)
        for layer in self.up:
            h = layer(torch.cat([h, stack.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def small_unet(in_channels: int, *, resolution: int = 8, channels: int = 16) -> UNet:
    """A tiny U-Net for tests and CPU runs: two levels (1, 2), one block each, attention at R/2.

    At the defaults (C = 1, R = 8) it has 128,945 parameters.
    """
    return UNet(
        in_channels,
        channels=channels,
        multipliers=(1, 2),
        num_blocks=1,
        resolution=resolution,
        attention_resolutions=(resolution // 2,),
    )
