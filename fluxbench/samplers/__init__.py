"""Samplers for generative fields (SPEC section 3).

- ``langevin``: unadjusted Langevin (Euler-Maruyama of SPEC eq. (1)), chunked over particles.
- ``edm_sigmas`` / ``edm_heun``: EDM's rho noise schedule and Heun sampler (Algorithms 1
  and 2 of Karras et al. 2022), for states of any event shape (images included).
- ``ExactOU``: exact Ornstein-Uhlenbeck transitions for linear fields (SPEC sections 3, 4).
- ``annealed_langevin``: annealed reverse-VE Euler-Maruyama with an optional
  predictor-corrector Langevin corrector.
- ``probability_flow`` / ``probability_flow_nll``: the VE probability-flow ODE and its
  likelihood by the instantaneous change of variables.
- ``langevin_rollout`` / ``log_spaced``: long batched Langevin rollouts keeping the states
  at (log-spaced) checkpoints and an optional trace of observables.
"""

from .annealed import annealed_langevin
from .edm import edm_heun, edm_sigmas
from .langevin import langevin
from .ode import probability_flow, probability_flow_nll
from .ou import ExactOU
from .rollout import Rollout, langevin_rollout, log_spaced

__all__ = [
    "langevin",
    "ExactOU",
    "annealed_langevin",
    "edm_sigmas",
    "edm_heun",
    "probability_flow",
    "probability_flow_nll",
    "langevin_rollout",
    "log_spaced",
    "Rollout",
]
