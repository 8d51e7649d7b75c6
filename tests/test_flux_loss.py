"""The Flux Matching loss against the reference transcription and the closed forms of SPEC section 2."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fluxbench import pairwise
from fluxbench._pairwise import blocks as pairwise_blocks
from fluxbench._pairwise import frames as pairwise_frames
from fluxbench.fields import MLPField, at_sigma
from fluxbench.objectives import flux_matching_loss
from fluxbench.objectives.flux import T_MIN
from fluxbench.objectives.batch_score import batch_score

from .reference_flux import reference_flux_loss

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_frame(monkeypatch):
    """One local frame: rows keep their order, so draws align with the reference. The fused
    backend is forced onto its attention path even where a dense block would be cheaper."""
    monkeypatch.setattr(pairwise_frames, "_MIN_GROUP", 10**9)
    monkeypatch.setattr(importlib.import_module("fluxbench.objectives.batch_kernel"), "DENSE_PAIRS", 0)


# ---------------------------------------------------------------- reference, draw for draw


@pytest.mark.parametrize("backend", ["dense", "fused"])
@pytest.mark.parametrize("d", [1, 2, 3, 6])
@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_matches_reference_transcription(one_frame, strategy, d, divergence, backend):
    torch.manual_seed(d)
    field = MLPField(d, hidden=(16, 16)).double()
    x = torch.randn(24, d, dtype=F64)
    for seed, t in [(0, None), (1, 0.0), (2, 0.7), (3, None)]:
        sigma = 0.4 + 0.3 * seed
        ours = flux_matching_loss(field, x, sigma, divergence=divergence, t=t, backend=backend, generator=gen(seed)).detach()
        ref = reference_flux_loss(field, x, sigma, divergence=divergence, t=t, generator=gen(seed))
        ref = ref.detach()
        # at t ~ 0 the transition kernel has variance ~1e-6 sigma^2 and amplifies rounding
        tol = (1e-6 if t == 0.0 else 1e-9) * float(ref.abs().max())
        assert float((ours - ref).abs().max()) <= tol, (seed, float((ours - ref).abs().max()))


@pytest.mark.parametrize("backend", ["dense", "fused"])
def test_gradient_matches_reference(one_frame, strategy, backend):
    torch.manual_seed(0)
    field = MLPField(2, hidden=(16,)).double()
    x = torch.randn(20, 2, dtype=F64)
    grads = []
    for fn in (lambda *a, **k: flux_matching_loss(*a, backend=backend, **k), reference_flux_loss):
        field.zero_grad()
        fn(field, x, 0.5, generator=gen(7)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in field.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-10 * float(grads[1].abs().max()))


# ---------------------------------------------------------------- closed forms (single Gaussian)

SPACING = 1e4  # copies of the single-Gaussian problem, far enough apart to be independent


def _copies(n: int, d: int) -> torch.Tensor:
    x = torch.zeros(n, d, dtype=F64)
    x[:, 0] = SPACING * torch.arange(n, dtype=F64)
    return x


def _affine(a: torch.Tensor, c: torch.Tensor):
    """f(z) = A (z - x_k) + c around the nearest copy x_k: the field A z + c of each problem."""

    def field(z):
        local = z.clone()
        local[:, 0] = z[:, 0] - SPACING * torch.round(z[:, 0] / SPACING)
        return local @ a.T + c

    return field


def _closed_form(a, c, sigma, horizon=4.0, t=None):
    d = a.shape[0]
    ms = 0.5 * (a + a.T) + torch.eye(d, dtype=F64) / sigma**2
    if t is not None:
        return 4 * math.exp(-2 * t) * float((ms**2).sum()) + 2 * math.exp(-t) * float((c**2).sum()) / sigma**2
    return 2 * (1 - math.exp(-2 * horizon)) * float((ms**2).sum()) + 2 * (1 - math.exp(-horizon)) * float(
        (c**2).sum()
    ) / sigma**2


def _problem(seed: int, d: int):
    g = gen(seed)
    a = 0.6 * torch.randn(d, d, generator=g, dtype=F64)
    c = torch.randn(d, generator=g, dtype=F64)
    sigma = float(0.5 + torch.rand((), generator=g, dtype=F64))
    return a, c, sigma


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_conditional_mean(divergence, seed):
    """E[loss | t] = 4 e^{-2t} ||M_s||^2 + 2 e^{-t} |c|^2 / sigma^2, within 4 standard errors."""
    d = 2
    a, c, sigma = _problem(seed, d)
    x = _copies(512, d)
    for t in (0.0, 0.4, 1.5):
        losses = torch.cat(
            [flux_matching_loss(_affine(a, c), x, sigma, t=t, divergence=divergence, generator=gen(100 * seed + k)) for k in range(4)]
        )
        mean, se = float(losses.mean()), float(losses.std() / math.sqrt(losses.numel()))
        assert abs(mean - _closed_form(a, c, sigma, t=t)) < 4 * se, (t, mean, se, _closed_form(a, c, sigma, t=t))


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_closed_form_mean_and_gradient(divergence):
    """E[loss] and E[grad_A], E[grad_c] against SPEC section 2, within 4 standard errors.

    One t is shared by a batch, so the standard error is taken over batch means.
    """
    d = 3
    a, c, sigma = _problem(5, d)
    x = _copies(128, d)
    ms = 0.5 * (a + a.T) + torch.eye(d, dtype=F64) / sigma**2
    h = 4.0
    means, grad_a, grad_c = [], [], []
    for k in range(80):
        a_p = a.clone().requires_grad_(True)
        c_p = c.clone().requires_grad_(True)
        loss = flux_matching_loss(_affine(a_p, c_p), x, sigma, divergence=divergence, generator=gen(k)).mean()
        ga, gc = torch.autograd.grad(loss, (a_p, c_p))
        means.append(float(loss.detach()))
        grad_a.append(ga)
        grad_c.append(gc)
    means_t = torch.tensor(means, dtype=F64)
    n = len(means)
    assert abs(float(means_t.mean()) - _closed_form(a, c, sigma, h)) < 4 * float(means_t.std()) / math.sqrt(n)
    ga_t, gc_t = torch.stack(grad_a), torch.stack(grad_c)
    expect_a = 2 * (1 - math.exp(-2 * h)) * ms
    expect_c = 2 * (1 - math.exp(-h)) * c / sigma**2
    assert ((ga_t.mean(0) - expect_a).abs() < 4 * ga_t.std(0) / math.sqrt(n) + 1e-12).all()
    assert ((gc_t.mean(0) - expect_c).abs() < 4 * gc_t.std(0) / math.sqrt(n) + 1e-12).all()


def test_score_field_gives_zero_loss_draw_by_draw():
    """f = s: exactly 0 at B = 1 (u = 0 bit for bit); at B > 1 zero to float64 rounding."""
    sigma = 0.7
    x1 = torch.zeros(1, 2, dtype=F64)
    for k in range(20):
        loss = flux_matching_loss(lambda z: -z / sigma**2, x1, sigma, generator=gen(k))
        assert float(loss.abs().max()) == 0.0
    x = torch.randn(32, 2, dtype=F64, generator=gen(1))
    rng = gen(2)
    for _ in range(5):
        loss = flux_matching_loss(lambda z: batch_score(z, x, sigma), x, sigma, generator=rng)
        assert float(loss.abs().max()) < 1e-8


def test_rotational_field_has_zero_mean_and_symmetric_error_positive():
    """(I + Q) s: mean loss 0 within 4 SE; (I + S) s with S symmetric: mean > 4 SE above 0."""
    d = 2
    sigma = 0.8
    q = torch.tensor([[0.0, 1.5], [-1.5, 0.0]], dtype=F64)
    sym = torch.tensor([[0.9, 0.3], [0.3, -0.6]], dtype=F64)
    x = _copies(64, d)
    for mat, expect_zero in ((q, True), (sym, False)):
        def field(z, mat=mat):
            local = z.clone()
            local[:, 0] = z[:, 0] - SPACING * torch.round(z[:, 0] / SPACING)
            s = -local / sigma**2
            return s + s @ mat.T

        batch_means = torch.tensor([float(flux_matching_loss(field, x, sigma, generator=gen(k)).mean()) for k in range(120)])
        mean, se = float(batch_means.mean()), float(batch_means.std() / math.sqrt(len(batch_means)))
        if expect_zero:
            assert abs(mean) < 4 * se
        else:
            assert mean > 4 * se
            # f = -(I + S) z / sigma^2 is affine with M_s = -S / sigma^2
            assert abs(mean - _closed_form(-(torch.eye(d, dtype=F64) + mat) / sigma**2, torch.zeros(d, dtype=F64), sigma)) < 4 * se


# ---------------------------------------------------------------- hazards


def test_t_zero_is_finite():
    field = MLPField(2)
    x = torch.randn(64, 2)
    loss = flux_matching_loss(field, x, 0.3, t=0.0, generator=gen(0))
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("use_attention", [True, None])
def test_smallest_t_in_float32_matches_the_exact_transition(use_attention):
    """t = T_MIN, d = 64, B = 1024 in float32: the transition kernel is ~1e6 times narrower
    than the frames were sized for. Every strategy setting must give the loss of the exact
    (float64-product or difference-form) blocks; attention's float32 expanded form gave NaN."""
    torch.manual_seed(0)
    field = MLPField(64)
    x = torch.randn(1024, 64, generator=gen(7))
    losses = {}
    for use in (use_attention, False):
        with pairwise.use_attention(use):
            losses[use] = flux_matching_loss(field, x, 0.3, t=T_MIN, generator=gen(8)).detach()
    assert torch.isfinite(losses[use_attention]).all()
    exact = losses[False]
    assert float((losses[use_attention] - exact).abs().max()) < 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("backend", ["dense", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [2, 8])
def test_chunked_equals_unchunked(strategy, dtype, d, backend):
    """Chunking only reorders the B-term sums. A reordered sum of n terms moves by at most
    gamma_n = n u / (1 - n u) of its absolute sum (Higham, Accuracy and Stability, 4.2), and
    one loss chains K + 2 such passes (K chain steps, the anchors' score, the transition
    sums), so the bound is (K + 2) gamma_B of the loss's scale, whatever the CPU's vector
    width or thread count (measured here: at most 140 u, against 1800 u)."""
    batch, sub_steps = 300, 4
    torch.manual_seed(0)
    field = MLPField(d).to(dtype)
    x = torch.randn(batch, d, dtype=dtype)
    full = flux_matching_loss(field, x, 0.5, backend=backend, generator=gen(3)).detach()
    chunked = flux_matching_loss(field, x, 0.5, backend=backend, generator=gen(3), chunk_size=17).detach()
    u = torch.finfo(dtype).eps / 2
    gamma = batch * u / (1 - batch * u)
    assert float((full - chunked).abs().max()) <= (sub_steps + 2) * gamma * float(full.abs().max())


def test_same_seed_same_bits():
    field = MLPField(2)
    x = torch.randn(100, 2, generator=gen(0))
    a = flux_matching_loss(field, x, 0.3, generator=gen(5))
    b = flux_matching_loss(field, x, 0.3, generator=gen(5))
    c = flux_matching_loss(field, x, 0.3, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- inference mode inside the loss


@pytest.mark.parametrize("backend", ["dense", "fused"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_what_the_loss_returns_is_ordinary_and_callers_modes_agree(backend, closed_form):
    """Steps 1-6 run in inference mode. What the loss hands back is an ordinary tensor (the
    loss in the field's graph; FluxLossInfo's x0 and x_t writable in place), and a caller's
    own inference mode or no_grad gives the same values, by the closed-form pullback or by
    autograd."""
    torch.manual_seed(0)
    model = MLPField(2, hidden=(16,))
    field = model if closed_form else (lambda z: model(z))
    x = torch.randn(300, 2, generator=gen(1))
    loss, info = flux_matching_loss(field, x, 0.3, backend=backend, generator=gen(2), return_info=True)
    assert not any(t.is_inference() for t in (loss, info.x0, info.x_t))
    loss.mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    info.x0.add_(1.0)
    info.x_t.mul_(2.0)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            again = flux_matching_loss(field, x, 0.3, backend=backend, generator=gen(2))
        assert torch.equal(again, loss.detach()), mode


def test_caches_first_filled_in_inference_mode_serve_normal_mode():
    """The pairwise block buffer and the monomial index tables are shared across calls: made
    inside the loss's inference mode, they must still be ordinary tensors, or a later call
    outside it that writes to the buffer fails."""
    bs = importlib.import_module("fluxbench.objectives.batch_fused")
    pairwise_blocks._workspace.buffers = {}
    bs._monomials.cache_clear()
    x = torch.randn(2048, 2, generator=gen(0))
    flux_matching_loss(MLPField(2), x, 0.3, backend="fused", generator=gen(1))
    buffers = list(pairwise_blocks._workspace.buffers.values())
    monomials = bs._monomials(2, x.device)
    assert buffers and not any(b.is_inference() for b in buffers)
    assert not any(t.is_inference() for t in (monomials.qa, monomials.c_full))
    batch_score(x, x, 0.3)  # writes into the shared buffer outside inference mode


def test_fused_backend_with_padding_matches_dense_in_distribution():
    """B = 203 is not a multiple of the frame count: the fused backend pads rows, which
    must never act as keys. Draws differ between backends (rows are permuted), so compare
    the mean loss of a fixed field over many batches: equal within 4 standard errors."""
    torch.manual_seed(1)
    field = MLPField(2, hidden=(16,)).double()
    x = torch.randn(203, 2, dtype=F64)
    means = {}
    for backend in ("dense", "fused"):
        vals = torch.stack([flux_matching_loss(field, x, 0.5, t=0.5, backend=backend, generator=gen(k)).mean().detach() for k in range(60)])
        means[backend] = (float(vals.mean()), float(vals.std()) / math.sqrt(len(vals)))
    (m1, s1), (m2, s2) = means["dense"], means["fused"]
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2)


def _nan_mlp() -> MLPField:
    model = MLPField(2)
    with torch.no_grad():
        model.net[-1].bias.fill_(float("nan"))
    return model


def test_finite_entries_whose_sum_overflows_are_finite():
    """The finiteness check sums first (one reduction) and settles a non-finite sum entry
    by entry: float32 entries of 3e38 overflow the sum but are finite."""
    from fluxbench._checks import all_finite, check_points

    big = torch.full((4, 2), 3e38)
    assert all_finite(big) and check_points(big) is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        big[1, 1] = bad
        assert not all_finite(big)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(5)), r"shape \(N, d\)"),
        (dict(x=torch.randn(0, 2)), "empty batch"),
        (dict(x=torch.tensor([[0.0, float("nan")]])), "NaN"),
        (dict(x=torch.tensor([[0.0, float("inf")]])), "inf"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=torch.tensor([0.1, 0.2, 0.1, 0.1])), "distinct"),
        (dict(horizon=0.0), "horizon"),
        (dict(substeps=0), "substeps"),
        (dict(divergence="bogus"), "divergence"),
        (dict(backend="bogus"), "backend"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(field=lambda z: z[:, :1]), "shape"),
        (dict(field=lambda z: z.double()), "dtype"),
        (dict(field=lambda z: z * float("nan")), "NaN"),
        (dict(field=lambda z: z.to("meta")), "device"),
        (dict(field=_nan_mlp()), "NaN"),  # the closed-form pullback path checks its output too
    ],
)
def test_bad_input_raises_named_error(kwargs, match):
    args = dict(field=lambda z: -z, x=torch.randn(4, 2), sigma=0.5)
    args.update(kwargs)
    field, x, sigma = args.pop("field"), args.pop("x"), args.pop("sigma")
    with pytest.raises(ValueError, match=match):
        flux_matching_loss(field, x, sigma, **args)


def test_equal_sigma_vector_is_accepted():
    x = torch.randn(4, 2)
    a = flux_matching_loss(lambda z: -z, x, torch.full((4,), 0.5), generator=gen(0))
    b = flux_matching_loss(lambda z: -z, x, 0.5, generator=gen(0))
    assert torch.equal(a, b)


def test_float32_under_bf16_autocast_keeps_pairwise_in_fp32():
    torch.manual_seed(0)
    field = MLPField(2)
    x = torch.randn(128, 2)
    plain = flux_matching_loss(field, x, 0.3, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = flux_matching_loss(lambda z: field(z).float(), x, 0.3, generator=gen(1))
    # the field itself runs in bf16 under autocast; the pairwise part must not, so the two
    # agree to the field's bf16 error, not to the O(1) error of a bf16 softmax
    rel = float(((plain - auto).abs().mean() / plain.abs().mean()).detach())
    assert rel < 0.1


@pytest.mark.parametrize("backend", ["dense", "fused"])
def test_chain_subsampling_keeps_the_expectation(backend):
    """chains=B/4 runs a quarter of the reference chains, reweighted by 4: the mean loss over
    seeds matches the all-chains estimator within 4 standard errors (of the difference)."""
    torch.manual_seed(2)
    field = MLPField(2, hidden=(16,)).double()
    x = torch.randn(128, 2, dtype=F64, generator=gen(3))
    stats = []
    for chains in (None, 32):
        vals = torch.stack(
            [flux_matching_loss(field, x, 0.5, t=0.4, chains=chains, backend=backend, generator=gen(k)).mean() for k in range(150)]
        ).detach()
        stats.append((float(vals.mean()), float(vals.std()) / math.sqrt(len(vals))))
    (m1, s1), (m2, s2) = stats
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2)
    assert s2 > s1  # fewer chains: more variance


@pytest.mark.parametrize("backend", ["dense", "fused"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_closed_form_field_pullback_gives_the_autograd_loss(backend, dtype, tol):
    """MLPField's closed-form defect pullback and autograd's double backward (the same field
    behind a plain lambda) give the same losses and parameter gradients, draw for draw."""
    torch.manual_seed(4)
    model = MLPField(3, hidden=(32, 32), sigma_conditioned=True).to(dtype)
    x = torch.randn(200, 3, dtype=dtype, generator=gen(5))
    fields = {"autograd": lambda z: model(z, 0.4), "closed form": at_sigma(model, 0.4)}
    assert fields["closed form"].defect_pullback(x, torch.ones_like(x)) is not None
    out = {}
    for name, field in fields.items():
        loss = flux_matching_loss(field, x, 0.4, backend=backend, generator=gen(6))
        out[name] = (loss.detach(), torch.autograd.grad(loss.mean(), list(model.parameters())))
    (l_ref, g_ref), (l_fast, g_fast) = out["autograd"], out["closed form"]
    assert float((l_fast - l_ref).abs().max()) <= tol * float(l_ref.abs().max())
    for a, b in zip(g_fast, g_ref):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.mark.parametrize("sigma", [1e-7, 1e-8])
def test_overflowing_loss_is_an_error_not_nan(sigma):
    """At sigma <= 1e-7 in float32 the loss overflowed to NaN silently (the loss grows like a
    high power of 1/sigma); it must raise and name sigma and the dtype. float64 stays finite."""
    torch.manual_seed(0)
    x = torch.randn(64, 2, generator=gen(0))
    with pytest.raises(ValueError, match=r"not finite at sigma=1e-0[78] in torch.float32"):
        flux_matching_loss(MLPField(2), x, sigma, generator=gen(1))
    loss = flux_matching_loss(MLPField(2).double(), x.double(), sigma, generator=gen(1))
    assert torch.isfinite(loss).all()


# ---------------------------------------------------------------- memory linear in B


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage (bytes) any operator returns: what was materialised."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("d", [2, 8])
def test_largest_intermediate_is_a_chunk_of_rows_not_the_batch_square(one_torch_thread, strategy, d):
    """Every pairwise pass takes at most ``chunk_size`` query rows against the B keys, so
    the largest tensor any operator returns is O(B * chunk), never B x B.

    Bound: two stacked (chunk, B) blocks (the moment pass at d > 4 weights two directions
    in one tensor; 4 MiB measured here) or one in float64 (a narrow kernel escalates its
    products): 2 * 2 * chunk * B * 4 bytes, 8x below B x B here.
    """
    b, chunk = 4096, 128
    x = torch.randn(b, d, generator=gen(0))
    field = MLPField(d, hidden=(16,))
    with _LargestTensor() as rec:
        loss = flux_matching_loss(field, x, 0.3, backend="fused", chunk_size=chunk, generator=gen(1))
    assert bool(loss.isfinite().all())
    bound = 2 * 2 * chunk * b * x.element_size()
    assert rec.nbytes <= bound < b * b * x.element_size(), (rec.nbytes, bound)
