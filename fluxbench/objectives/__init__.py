"""Training objectives (SPEC section 2).

* :mod:`.flux`: :func:`flux_matching_loss`, the per-sample Flux Matching loss.
* :mod:`.batch_score`: the batch score s_hat of SPEC eq. (5) and its derivatives; the
  pairwise backends behind it (:mod:`.batch_kernel`, :mod:`.batch_dense`, :mod:`.batch_fused`).
* :mod:`.dsm`: :func:`dsm_loss`, the denoising score matching baseline.
* :mod:`.proposal`: the learned time proposal and loss normaliser.
* :mod:`.noise`: distributions of sigma for noise annealing.
* :mod:`.training`: the objectives as modules for :func:`fluxbench.train.train`, and
  :class:`TrainingOutput` (an output that names the model's own loss apart from surrogate terms).
"""

from .base import Objective, ObjectiveOutput
from .batch_score import batch_score
from .dsm import dsm_loss
from .flux import FluxLossInfo, flux_matching_loss
from .noise import FixedSigma, LogNormalSigma, LogUniformSigma, as_noise
from .proposal import ExponentialTimeProposal, LossNormaliser
from .training import DenoisingScoreMatching, FluxMatching, TrainingOutput

__all__ = [
    "Objective",
    "ObjectiveOutput",
    "flux_matching_loss",
    "FluxLossInfo",
    "batch_score",
    "dsm_loss",
    "ExponentialTimeProposal",
    "LossNormaliser",
    "FixedSigma",
    "LogUniformSigma",
    "LogNormalSigma",
    "as_noise",
    "FluxMatching",
    "DenoisingScoreMatching",
    "TrainingOutput",
]
