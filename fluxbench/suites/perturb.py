"""Models with a prescribed rotation, and deliberate breakages of a field for the gate's tests.

* :class:`RotationalModel` -- f(x, sigma) = (I + A) g_theta(x, sigma) with a constant
  antisymmetric A (SPEC eq. (4) with s replaced by a learned g): if g is the score of p_sigma,
  f keeps p_sigma stationary whatever A is.
* :func:`rotation_matrix` -- A = a J, J block-diagonal with 2 x 2 blocks [[0, -1], [1, 0]].
* :func:`parse_perturb` / :func:`perturb_field` -- "temperature:c" (f -> c f),
  "drop-rotation" (a rotational field loses its A term), "sign:i" (component i flipped).
  Each breaks stationarity (except drop-rotation of (I + A) s, which leaves s: it breaks the
  claims about the rotation itself, its coefficient and the mixing speed-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fluxbench.fields import MLPField, RotationalField

__all__ = ["RotationalModel", "rotation_matrix", "Perturbation", "parse_perturb", "perturb_field", "strip_rotation"]


def rotation_matrix(dim: int, a: float, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A = a J with J block-diagonal [[0, -1], [1, 0]] on coordinate pairs (0, 1), (2, 3), ...

    The last coordinate of an odd dimension is left alone. A^T = -A.

    Args:
        dim: d >= 2.
        a: the rotation strength.
        device, dtype: of the result.

    Returns:
        (d, d) antisymmetric tensor.
    """
    if dim < 2:
        raise ValueError(f"a rotation needs dim >= 2; got {dim}")
    A = torch.zeros(dim, dim, device=device, dtype=dtype)
    for i in range(0, dim - 1, 2):
        A[i, i + 1] = -a
        A[i + 1, i] = a
    return A


class RotationalModel(nn.Module):
    """f(x, sigma) = (I + A) g_theta(x, sigma), g a sigma-conditioned :class:`MLPField`.

    Args:
        dim: d.
        rotation: a, with A = :func:`rotation_matrix` (d, a) (a buffer: never trained).
        hidden: hidden widths of g.
    """

    sigma_conditioned = True

    def __init__(self, dim: int, rotation: float, hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        self.base = MLPField(dim, hidden=tuple(hidden), sigma_conditioned=True)
        self.register_buffer("A", rotation_matrix(dim, float(rotation)))

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """(N, d), sigma -> (N, d): g + g A^T (row vectors), i.e. (I + A) g per point."""
        g = self.base(x, sigma)
        return g + g @ self.A.to(g.dtype).T


@dataclass(frozen=True)
class Perturbation:
    """A parsed perturbation: ``kind`` in {"temperature", "drop-rotation", "sign"} and its argument."""

    kind: str
    arg: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "temperature":
            return f"temperature:{self.arg:g}"
        if self.kind == "sign":
            return f"sign:{int(self.arg)}"
        return self.kind


def parse_perturb(text: str | Perturbation | None) -> Perturbation | None:
    """"temperature:c" (c > 0), "drop-rotation", "sign:i" (i >= 0) -> :class:`Perturbation`; None -> None.

    Raises:
        ValueError: anything else (the message lists the forms).
    """
    if text is None or isinstance(text, Perturbation):
        return text
    forms = "temperature:C (C > 0), drop-rotation, sign:I (I >= 0)"
    if not isinstance(text, str):
        raise ValueError(f"perturb must be a string ({forms}); got {text!r}")
    if text == "drop-rotation":
        return Perturbation("drop-rotation")
    kind, _, arg = text.partition(":")
    try:
        if kind == "temperature":
            c = float(arg)
            if not c > 0 or c == float("inf"):
                raise ValueError
            return Perturbation("temperature", c)
        if kind == "sign":
            i = int(arg)
            if i < 0:
                raise ValueError
            return Perturbation("sign", float(i))
    except ValueError:
        pass
    raise ValueError(f"unknown perturbation {text!r}; forms: {forms}")


def strip_rotation(model: object) -> object | None:
    """The non-rotational part of a rotational model or field (None if it has none).

    :class:`RotationalModel` -> its ``base`` g (a sigma-conditioned model);
    :class:`fluxbench.fields.RotationalField` -> its ``score``.
    """
    if isinstance(model, RotationalModel):
        return model.base
    if isinstance(model, RotationalField):
        return model.score
    return None


def perturb_field(field: Callable[[Tensor], Tensor], perturbation: Perturbation | None, *, dim: int) -> Callable[[Tensor], Tensor]:
    """``field`` broken as ``perturbation`` says (temperature or sign; drop-rotation is the caller's).

    Args:
        field: x (N, d) -> (N, d).
        perturbation: from :func:`parse_perturb`, or None (returns ``field``).
        dim: d, to check the sign's component.

    Raises:
        ValueError: a sign component >= d.
    """
    if perturbation is None or perturbation.kind == "drop-rotation":
        return field
    if perturbation.kind == "temperature":
        c = perturbation.arg
        return lambda x: c * field(x)
    i = int(perturbation.arg)
    if i >= dim:
        raise ValueError(f"perturbation sign:{i} needs a component < d = {dim}")

    def flipped(x: Tensor) -> Tensor:
        out = field(x).clone()
        out[:, i] = -out[:, i]
        return out

    return flipped
