"""SPEC section 5: the Stein kernel formula is the generator applied in x and in y to k.

Runs without ``fluxbench.verify``: it checks the SPEC's formula (as transcribed in
``properties._helpers.stein_kernel_formula``, the reference the verify tests compare the
library against) by deriving L_f^x L_f^y k again with autograd.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.fields import MLPField

from ._helpers import F64, examples, gen, stein_kernel_autograd, stein_kernel_formula


@examples(1.0)
@given(fst.dims(1, 4), st.floats(0.3, 3.0), fst.seeds())
def test_stein_kernel_formula_is_the_generator_applied_twice(d, ell, seed):
    """h(x, y) of SPEC section 5 equals L_f^x L_f^y exp(-|x - y|^2 / (2 l^2)) by autograd, for a
    random MLP field f and random pairs (1e-10 relative to 1 + max |h|)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        field = MLPField(d, hidden=(8,)).double()
    x = torch.randn(12, d, dtype=F64, generator=gen(seed))
    y = x + ell * torch.randn(12, d, dtype=F64, generator=gen(seed + 1))
    with torch.no_grad():
        fx, fy = field(x), field(y)
    formula = torch.diagonal(stein_kernel_formula(x, y, fx, fy, ell))
    auto = stein_kernel_autograd(field, x, y, ell)
    assert float((formula - auto).abs().max()) <= 1e-10 * (1 + float(auto.abs().max()))
    # symmetric in (x, fx) <-> (y, fy)
    swapped = torch.diagonal(stein_kernel_formula(y, x, fy, fx, ell))
    assert float((formula - swapped).abs().max()) <= 1e-12 * (1 + float(auto.abs().max()))
