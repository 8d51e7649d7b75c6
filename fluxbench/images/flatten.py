"""Image batches for the package's (B, d) objectives: a flattening adapter, and the objectives.

fluxbench's losses (:func:`fluxbench.objectives.flux_matching_loss`, ``dsm_loss``) work on
points x (B, d). An image field takes (B, C, H, W). :class:`ImageObjective` wraps one of the
package's objectives so that callers pass image batches and image fields unchanged: it
flattens the batch to (B, C*H*W) and hands the objective :class:`FlatField`, the same field
seen on flattened points, f_flat(z, sigma) = f(z.view(B, C, H, W), sigma).view(B, C*H*W).
Flattening is a linear isometry, so every quantity of SPEC section 2 (distances, the batch
score, divergences) is the same on either side.

:func:`image_objective` builds the two image objectives with EDM's log-normal sigma
distribution, log sigma ~ N(P_mean, P_std^2) (P_mean = -1.2, P_std = 1.2):

* ``"flux"``: noise-annealed Flux Matching (:class:`fluxbench.objectives.FluxMatching`)
  with the learned time proposal and the loss normaliser (SPEC section 2);
* ``"dsm"``: denoising score matching (:class:`fluxbench.objectives.DenoisingScoreMatching`,
  plain target) with EDM's weighting (:class:`EDMWeighting`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..objectives import DenoisingScoreMatching, FluxMatching, LogNormalSigma, TrainingOutput

__all__ = ["FlatField", "ImageObjective", "EDMWeighting", "image_objective", "METHODS"]

METHODS = ("flux", "dsm")


class FlatField(nn.Module):
    """An image field seen on flattened points: (N, C*H*W) -> (N, C*H*W).

    Args:
        field: ``field(x, sigma)`` on images x (N, C, H, W).
        shape: the image shape (C, H, W).
    """

    sigma_conditioned = True

    def __init__(self, field, shape: tuple[int, ...]):
        super().__init__()
        self.field = field
        self.shape = tuple(int(s) for s in shape)

    def forward(self, z: Tensor, sigma) -> Tensor:
        n = z.shape[0]
        return self.field(z.reshape(n, *self.shape), sigma).reshape(n, -1)


class ImageObjective(nn.Module):
    """``objective(model, images, generator)`` for images (B, C, H, W) via a (B, d) objective.

    The inner objective's own parameters (time proposal, loss normaliser) are this module's.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, model, x: Tensor, generator: torch.Generator | None = None):
        if x.ndim < 2:
            raise ValueError(f"an image batch has shape (B, C, H, W); got {tuple(x.shape)}")
        return self.inner(FlatField(model, x.shape[1:]), x.reshape(x.shape[0], -1), generator)


class EDMWeighting(nn.Module):
    """EDM's loss weight for DSM: lambda(sigma) |D - y|^2, lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    The package's :class:`DenoisingScoreMatching` returns sigma^2 |f - s|^2, which for the
    EDM field f = (D - x) / sigma^2 and s = (y - x) / sigma^2 is |D - y|^2 / sigma^2. Multiplying
    by (sigma^2 + sigma_data^2) / sigma_data^2 gives EDM's weighting, under which the
    network's regression error has unit weight at every sigma (lambda = 1 / c_out^2).
    """

    def __init__(self, inner: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.inner = inner
        self.sigma_data = float(sigma_data)

    def forward(self, model, x: Tensor, generator: torch.Generator | None = None) -> TrainingOutput:
        out = self.inner(model, x, generator)
        sigma = float(out.logs["sigma"])
        w = (sigma * sigma + self.sigma_data**2) / self.sigma_data**2
        model_loss = None if out.model_loss is None else out.model_loss * w
        return TrainingOutput(out.loss * w, out.logs, model_loss=model_loss)


def image_objective(
    method: str,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    learn_proposal: bool = True,
    normalise: bool = True,
    horizon: float = 4.0,
    substeps: int = 4,
    chains: int | None = None,
) -> ImageObjective:
    """The image objective ``method`` ("flux" or "dsm") with log sigma ~ N(p_mean, p_std^2).

    Flux options (``learn_proposal``, ``normalise``, ``horizon``, ``substeps``, ``chains``)
    are those of :class:`fluxbench.objectives.FluxMatching`; DSM ignores them.
    """
    noise = LogNormalSigma(p_mean, p_std)
    if method == "flux":
        inner = FluxMatching(
            noise,
            horizon=horizon,
            substeps=substeps,
            learn_proposal=learn_proposal,
            normalise=normalise,
            chains=chains,
        )
    elif method == "dsm":
        inner = EDMWeighting(DenoisingScoreMatching(noise, target="plain"), sigma_data)
    else:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return ImageObjective(inner)
