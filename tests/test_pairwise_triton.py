"""The fused Triton kernel of the attention form (``fluxbench._pairwise.triton_attend``)
against the PyTorch path (``scaled_dot_product_attention`` in ``attend``), forward and
backward, in float32 and float64.

On the CPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, set per
test; the kernels are built on first use, so the setting takes effect). The module is
skipped with its reason where Triton is not importable. Tests marked ``cuda`` run the
compiled kernel and the dispatch of ``attend``; they skip without a CUDA device.

Rounding bounds (u the unit roundoff of the dtype, gamma_n ~ n u, Higham 3.1): a score
s = q.k + b computed from e products errs by at most gamma_(e+1) S, S = max_ij
(sum_a |q_ia k_ja| + |b_j|); an exp of a score perturbed by delta moves by a factor
e^delta, and the weights of a softmax by at most 2 (e^(2 delta) - 1) ~ 4 delta in l1
norm; the online rescaling multiplies by one factor per key block and the sums over M
keys add gamma_M. Hence

    |out - exact| <= (4 (e + 1) S + M + 2 M / BK + 10) u max|v|                  (F)

per implementation, and the two implementations differ by at most twice that. The
gradients are sums of |ds_ij| <= 2 p_ij D, D = max_i |dout_i|_1 max_j |v_j|_inf, against
k (over keys, sum_j p_ij = 1) or q (over up to L queries), each with the relative error
of (F) plus gamma_M for delta_i and gamma_(L or M) for the outer sum (see ``_grad_bounds``).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernel needs Triton (pip install triton)")

from fluxbench._pairwise import attention  # noqa: E402
from fluxbench._pairwise.triton_attend import fused_attend, triton_usable  # noqa: E402

F64 = torch.float64
# keys per inner step of the kernel (one online rescaling per step): at most this many
# rescalings are counted in the bounds for a block size of at least this
_MIN_BK = 16


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_usable(torch.zeros(1))


def _inputs(g, l, m, e, ev, dtype, shared_keys, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, l, e, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(1 if shared_keys else g, m, e, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(1 if shared_keys else g, m, ev, generator=gen, dtype=F64).to(dtype)
    bias = (-0.5 * k.double().square().sum(-1)).expand(g, m).to(dtype).contiguous()
    if m > 3:
        bias[:, 3] = float("-inf")  # an excluded key, as padding keys are
    return q, k, v, bias


def _score_scale(q, k, bias) -> float:
    """S = max_ij sum_a |q_ia k_ja| + |b_j| (finite b)."""
    b = bias.double().abs().masked_fill(torch.isinf(bias), 0.0)
    return float((q.double().abs() @ k.double().abs().transpose(1, 2) + b[:, None, :]).max())


def _relative(q, k, bias) -> float:
    """The relative error of a softmax weight row (F) without its max|v| factor, in units of u."""
    e, m = q.shape[-1], k.shape[1]
    return 4 * (e + 1) * _score_scale(q, k, bias) + m + 2 * m / _MIN_BK + 10


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 45, 3, 5), (1, 16, 200, 8, 2), (3, 5, 1, 1, 1)])
def test_forward_matches_the_pytorch_path(interpreter, dtype, shared_keys, shape):
    q, k, v, bias = _inputs(*shape, dtype, shared_keys)
    ours = fused_attend(q, k, v, bias)
    ref = attention.attend(q, k, v, bias)  # CPU tensors: scaled_dot_product_attention
    assert ours.shape == ref.shape and ours.dtype == dtype
    u = torch.finfo(dtype).eps / 2
    bound = 2 * _relative(q, k, bias) * u * float(v.abs().max())
    assert float((ours - ref).abs().max()) <= bound


def _grad_bounds(q, k, v, bias, dout) -> list[float]:
    """Bounds on |d(ours) - d(ref)| for q, k, v, bias (see the module docstring), per implementation."""
    u = torch.finfo(q.dtype).eps / 2
    g, l, _ = q.shape
    m = k.shape[1]
    rel = (_relative(q, k, bias) + 2 * m + l) * u
    d = float(dout.abs().sum(-1).max()) * float(v.abs().max())
    kq = float(k.abs().max()), float(q.abs().max())
    return [2 * d * kq[0] * rel, 2 * d * kq[1] * l * g * rel, float(dout.abs().max()) * l * g * rel, 2 * d * l * rel]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shared_keys", [True, False])
def test_backward_matches_the_pytorch_path(interpreter, dtype, shared_keys):
    q, k, v, bias = _inputs(2, 70, 45, 3, 5, dtype, shared_keys, seed=1)
    dout = torch.randn(2, 70, 5, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    grads = []
    for fn in (fused_attend, attention.attend):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = fn(*leaves)
        grads.append(torch.autograd.grad(out, leaves, dout))
    for name, ours, ref, bound in zip("qkvb", *grads, _grad_bounds(q, k, v, bias, dout)):
        assert ours.shape == ref.shape, name
        err = float((ours - ref).abs().max())
        assert err <= 2 * bound, (name, err, 2 * bound)


def test_bad_inputs_raise_named_errors(interpreter):
    q, k, v, bias = _inputs(2, 8, 8, 3, 2, torch.float32, False)
    with pytest.raises(ValueError, match="bias"):
        fused_attend(q, k, v, bias[:1])
    with pytest.raises(ValueError, match="do not match"):
        fused_attend(q, k[..., :2], v, bias)
    with pytest.raises(ValueError, match="widths up to"):
        fused_attend(q.new_zeros(2, 8, 40), k.new_zeros(2, 8, 40), v, bias)
    with pytest.raises(ValueError, match="one dtype"):
        fused_attend(q.double(), k, v, bias)


def test_interpreter_is_needed_on_cpu(monkeypatch):
    """Without the interpreter, CPU tensors never take the kernel (``attend`` keeps SDPA)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_usable(torch.zeros(1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_attend_on_cuda_takes_the_kernel_and_matches_the_cpu(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, bias = _inputs(4, 1000, 3000, 3, 4, dtype, True, seed=3)
    calls = []
    monkeypatch.setattr(attention, "fused_attend", lambda *a: calls.append(1) or fused_attend(*a))
    dev = [t.cuda() for t in (q, k, v, bias)]
    ours = attention.attend(*dev).cpu()
    assert calls == [1]
    ref = attention.attend(q, k, v, bias)
    u = torch.finfo(dtype).eps / 2
    assert float((ours - ref).abs().max()) <= 2 * _relative(q, k, bias) * u * float(v.abs().max())
    assert math.isfinite(float(ours.sum()))


def test_the_pairwise_sums_through_the_kernel_match_the_pytorch_path(interpreter, monkeypatch):
    """Every caller of ``attend`` (posterior means, the moment features, log-partitions,
    transposed sums) gives the SDPA result when routed through the kernel (CUDA's route,
    forced here on the CPU under the interpreter), in float64 within bound (F) of the
    widest pass (e <= d + 2 query columns, M + 1 keys, values of max|v| <= R^3 for the
    cubic moment features, R the largest coordinate)."""
    from fluxbench import pairwise

    gen = torch.Generator().manual_seed(5)
    n, d, var = 70, 2, 0.3
    x = torch.randn(n, d, generator=gen, dtype=F64)
    z = x + 0.5 * torch.randn(n, d, generator=gen, dtype=F64)
    g = torch.randn(n, 3, generator=gen, dtype=F64)
    cubes = lambda k: torch.cat([k, k.square(), k.pow(3)], -1)  # noqa: E731

    def sums():
        frames = pairwise.Frames(x)
        keys = pairwise.KeyFrame(frames, x, var, F64)
        zq = frames.permute(z)
        ref = torch.arange(frames.padded) % n
        logz = pairwise.kernel_logsumexp(zq, x, var, ref, frames=frames)
        return [
            pairwise.kernel_mean(zq, keys, var),
            pairwise.kernel_mean(zq, keys, var, cubes)[0],
            logz,
            pairwise.kernel_transpose_sum(frames.permute(x), z, var, logz[: n], g, frames=frames),
        ]

    with pairwise.use_attention(True):
        expect = sums()
        calls = []
        monkeypatch.setattr(attention, "_takes_triton", lambda *a: calls.append(1) or True)
        got = sums()
    assert len(calls) >= 4
    r = float(torch.cat([x, z]).abs().max())
    s = (r * r + r * r) / var * 2 + r * r / var  # |q.k| + |bias| for one frame, coordinates <= 2R
    bound = 2 * (4 * (d + 2) * s + n + 1 + 10) * torch.finfo(F64).eps / 2 * max(8 * r**3, float(g.abs().max()), 1.0)
    for name, a, b in zip(["mean", "moments", "logsumexp", "transpose"], got, expect):
        assert a.shape == b.shape, name
        assert float((a - b).abs().max()) <= bound * max(1.0, float(b.abs().max())), name
