"""Random draws through an optional caller-supplied ``torch.Generator``.

Every random number in fluxbench goes through these helpers so that the same seed gives
the same numbers (bit for bit on CPU) and the caller controls the stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_seed

__all__ = ["normal", "rademacher", "uniform", "generator_from_seed"]


def normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal draws with ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform[0, 1) draws with ``like``'s device and dtype."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Independent +-1 signs with probability 1/2 each (Hutchinson probes)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return bits.to(like.dtype).mul_(2).sub_(1)


def generator_from_seed(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A fresh generator seeded with ``seed`` on ``device``, or ``None`` when ``seed`` is None."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(check_seed(seed))
    return gen
