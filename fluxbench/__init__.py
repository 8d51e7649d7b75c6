"""fluxbench: Flux Matching, its samplers and metrics, and a harness that verifies them.

Subpackages, one concept each:

* :mod:`fluxbench.targets`: analytic distributions (Gaussians, mixtures, 2-D toys).
* :mod:`fluxbench.fields`: fields x -> f(x): MLPs, gradient fields, rotational fields.
* :mod:`fluxbench.objectives`: the Flux Matching loss, DSM, time proposals.
* :mod:`fluxbench.samplers`: Langevin, exact OU, annealed and probability-flow samplers.
* :mod:`fluxbench.train`: the training loop.
* :mod:`fluxbench.metrics`: W2, sliced W2, MMD and Gaussian closed forms.
* :mod:`fluxbench.verify`: the stationarity test, the defect, ``check_field``.
* :mod:`fluxbench.pairwise`: the fused, chunked pairwise kernels everything above uses.

The mathematics is in SPEC.md; docstrings cite its equations.
"""

__version__ = "0.1.0"

from . import divergence, fields, metrics, objectives, pairwise, samplers, targets, train, verify  # noqa: E402

__all__ = [
    "divergence",
    "fields",
    "metrics",
    "objectives",
    "pairwise",
    "samplers",
    "targets",
    "train",
    "verify",
    "__version__",
]
