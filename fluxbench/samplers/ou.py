"""Exact Ornstein-Uhlenbeck transitions for linear fields (SPEC sections 3 and 4)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_generator, check_points, check_positive, check_positive_int
from .._random import normal
from ._common import check_thin, n_saved_states

__all__ = ["ExactOU"]


def _check_matrix(m: object, name: str, d: int | None = None) -> Tensor:
    if not isinstance(m, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (d, d); got {type(m).__name__}")
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"{name} must be a square (d, d) matrix with d >= 1; got shape {tuple(m.shape)}")
    if d is not None and m.shape[0] != d:
        raise ValueError(f"{name} must have shape ({d}, {d}); got {tuple(m.shape)}")
    if not m.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {m.dtype}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} contains NaN or inf entries")
    return m


def _default_rtol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-4


def _check_spd(m64: Tensor, name: str, rtol: float) -> None:
    asym = float((m64 - m64.T).abs().max())
    scale = max(1.0, float(m64.abs().max()))
    if asym > rtol * scale:
        raise ValueError(f"{name} must be symmetric; max |M - M^T| = {asym:.3g} (tolerance {rtol * scale:.3g})")
    _, info = torch.linalg.cholesky_ex(0.5 * (m64 + m64.T))
    if int(info) != 0:
        raise ValueError(f"{name} must be positive definite (its Cholesky factorisation failed)")


class ExactOU:
    """Exact transitions of the linear Langevin SDE ``dX = -Bmat (X - m) dt + sqrt(2) dW``.

    When N(m, Sigma) is stationary, i.e. (SPEC section 4)

        Bmat Sigma + Sigma Bmat^T = 2 I,

    the transition over a time t >= 0 is exactly Gaussian (SPEC section 3):

        X_t | x0 ~ N(m + E_t (x0 - m), C_t),   E_t = exp(-Bmat t),
        C_t = Sigma - E_t Sigma E_t^T.

    Transition matrices are computed in float64 with ``torch.linalg.matrix_exp`` and
    cast to the points' dtype. C_t is factorised by Cholesky; when that fails (C_t is
    PSD only up to rounding, e.g. for very small t, where C_t ~ 2 t I is computed by a
    cancellation) the factor falls back to the symmetric eigendecomposition with negative
    eigenvalues clamped to 0: L = V diag(sqrt(max(lambda, 0))), so L L^T = C_t
    up to rounding.

    Attributes:
        bmat: (d, d) drift matrix Bmat.
        covariance: (d, d) stationary covariance Sigma.
        mean: (d,) stationary mean m.
        dim: d.

    Args:
        bmat: (d, d) matrix Bmat.
        covariance: (d, d) symmetric positive definite Sigma.
        mean: (d,) vector m, or None for 0.
        rtol: tolerance of the stationarity check: the constructor raises if
            max |Bmat Sigma + Sigma Bmat^T - 2 I| > rtol * max(1, ||Bmat||_F ||Sigma||_F).
            Default 1e-8 for float64 inputs, 1e-4 otherwise.

    Raises:
        ValueError: non-square or mismatched shapes, non-finite entries, Sigma not
            symmetric positive definite, or N(m, Sigma) not stationary for Bmat (the
            message gives the residual).
    """

    def __init__(self, bmat: Tensor, covariance: Tensor, mean: Tensor | None = None, *, rtol: float | None = None):
        bmat = _check_matrix(bmat, "bmat")
        d = bmat.shape[0]
        covariance = _check_matrix(covariance, "covariance", d)
        if covariance.device != bmat.device:
            raise ValueError(f"covariance is on {covariance.device} but bmat is on {bmat.device}")
        if mean is None:
            mean = torch.zeros(d, dtype=bmat.dtype, device=bmat.device)
        if not isinstance(mean, Tensor) or mean.shape != (d,) or not mean.is_floating_point():
            raise ValueError(f"mean must be a floating tensor of shape ({d},) or None; got {mean!r}")
        if mean.device != bmat.device:
            raise ValueError(f"mean is on {mean.device} but bmat is on {bmat.device}")
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("mean contains NaN or inf entries")
        if rtol is None:
            rtol = _default_rtol(torch.promote_types(bmat.dtype, covariance.dtype))
        rtol = check_positive(rtol, "rtol")

        b64 = bmat.detach().to(torch.float64)
        c64 = covariance.detach().to(torch.float64)
        _check_spd(c64, "covariance", rtol)
        c64 = 0.5 * (c64 + c64.T)
        eye = torch.eye(d, dtype=torch.float64, device=b64.device)
        residual = float((b64 @ c64 + c64 @ b64.T - 2 * eye).abs().max())
        scale = max(1.0, float(torch.linalg.matrix_norm(b64) * torch.linalg.matrix_norm(c64)))
        if residual > rtol * scale:
            raise ValueError(
                "N(mean, covariance) is not stationary for bmat: max |Bmat Sigma + Sigma Bmat^T - 2 I| = "
                f"{residual:.3g} > tolerance {rtol * scale:.3g} (SPEC section 4; Bmat = (I + J) Sigma^-1 "
                "with J antisymmetric is stationary)"
            )
        self.bmat = bmat
        self.covariance = covariance
        self.mean = mean
        self.dim = d
        self._b64 = b64
        self._c64 = c64
        self._m64 = mean.detach().to(torch.float64)

    @classmethod
    def from_precision(
        cls,
        precision: Tensor,
        antisymmetric: Tensor | None = None,
        mean: Tensor | None = None,
        *,
        rtol: float | None = None,
    ) -> ExactOU:
        """The linear field ``f(x) = -(I + J) S (x - m)`` that leaves N(m, S^-1) stationary.

        SPEC section 4: for S = Sigma^-1 symmetric positive definite and J antisymmetric,
        Bmat = (I + J) S satisfies Bmat Sigma + Sigma Bmat^T = (I + J) + (I - J) = 2 I.

        Args:
            precision: (d, d) symmetric positive definite S.
            antisymmetric: (d, d) J with J^T = -J, or None for 0 (reversible dynamics).
            mean: (d,) m, or None for 0.
            rtol: tolerance of the symmetry / antisymmetry checks (relative to
                max(1, max |entry|)) and of the stationarity check; defaults as in the
                constructor.

        Returns:
            An ``ExactOU`` with bmat = (I + J) S and covariance = S^-1 in the precision's
            dtype.

        Raises:
            ValueError: S not symmetric positive definite, or J not antisymmetric.
        """
        precision = _check_matrix(precision, "precision")
        d = precision.shape[0]
        if rtol is None:
            rtol = _default_rtol(precision.dtype)
        s64 = precision.detach().to(torch.float64)
        _check_spd(s64, "precision", rtol)
        s64 = 0.5 * (s64 + s64.T)
        eye = torch.eye(d, dtype=torch.float64, device=s64.device)
        j64 = torch.zeros_like(s64)
        if antisymmetric is not None:
            antisymmetric = _check_matrix(antisymmetric, "antisymmetric", d)
            if antisymmetric.device != precision.device:
                raise ValueError(f"antisymmetric is on {antisymmetric.device} but precision is on {precision.device}")
            j64 = antisymmetric.detach().to(torch.float64)
            sym = float((j64 + j64.T).abs().max())
            scale = max(1.0, float(j64.abs().max()))
            if sym > rtol * scale:
                raise ValueError(
                    f"antisymmetric must satisfy J^T = -J; max |J + J^T| = {sym:.3g} (tolerance {rtol * scale:.3g})"
                )
            j64 = 0.5 * (j64 - j64.T)
        bmat = (eye + j64) @ s64
        cov = torch.cholesky_inverse(torch.linalg.cholesky(s64))
        cov = 0.5 * (cov + cov.T)
        return cls(bmat.to(precision.dtype), cov.to(precision.dtype), mean, rtol=rtol)

    # ------------------------------------------------------------------ field
    def drift(self, x: Tensor) -> Tensor:
        """The linear field f(x) = -Bmat (x - m), row-wise.

        Args:
            x: (N, d) points.

        Returns:
            (N, d) tensor ``-(x - m) Bmat^T`` in ``x``'s dtype and device.
        """
        x = check_points(x, "x", dim=self.dim, finite=False)
        b = self.bmat.to(dtype=x.dtype, device=x.device)
        m = self.mean.to(dtype=x.dtype, device=x.device)
        return -(x - m) @ b.T

    __call__ = drift

    # ------------------------------------------------------------ transitions
    def transition(self, t: float) -> tuple[Tensor, Tensor]:
        """The transition matrices of a step of length t (SPEC section 3).

        Args:
            t: time >= 0.

        Returns:
            ``(E, C)``: E = exp(-Bmat t) and C = Sigma - E Sigma E^T (symmetrised), both
            (d, d), in bmat's dtype and device.
        """
        e64, c64 = self._transition64(check_positive(t, "t", allow_zero=True))
        return e64.to(self.bmat.dtype), c64.to(self.bmat.dtype)

    def conditional(self, x0: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """Mean and covariance of X_t given X_0 = x0.

        Args:
            x0: (N, d) starting points.
            t: time >= 0.

        Returns:
            ``(mean, cov)``: mean = m + (x0 - m) E^T of shape (N, d) and cov = C of shape
            (d, d), in ``x0``'s dtype.
        """
        x0 = self._check_x(x0, "x0")
        e64, c64 = self._transition64(check_positive(t, "t", allow_zero=True))
        e, m = e64.to(x0.dtype), self._m64.to(x0.dtype)
        return m + (x0 - m) @ e.T, c64.to(x0.dtype)

    def step(self, x: Tensor, t: float, *, generator: torch.Generator | None = None) -> Tensor:
        """One exact transition of length t: x' = m + (x - m) E^T + xi L^T, L L^T = C.

        Args:
            x: (N, d) current points.
            t: time >= 0 (t = 0 returns a copy of ``x`` and draws no noise).
            generator: source of the (N, d) standard normal draw xi.

        Returns:
            (N, d) tensor, exact samples of X_t given X_0 = x.
        """
        x = self._check_x(x, "x")
        t = check_positive(t, "t", allow_zero=True)
        generator = check_generator(generator, x.device)
        if t == 0:
            return x.detach().clone()
        e, m, factor = self._factors(t, x)
        with torch.no_grad():
            return self._apply(x.detach(), e, m, factor, generator)

    def sample(
        self,
        x0: Tensor,
        t: float,
        n_steps: int,
        *,
        generator: torch.Generator | None = None,
        thin: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """``n_steps`` exact transitions of length t each (total time n_steps * t).

        Args:
            x0: (N, d) starting points.
            t: step length >= 0.
            n_steps: number of transitions K >= 0 (0 returns a copy of ``x0``).
            generator: source of the Gaussian draws, one (N, d) draw per transition.
            thin: as in ``langevin``: return the states x_0, x_k, x_{2k}, ...
                (``K // k + 1`` states) instead of the end state.
            progress: show a tqdm progress bar.

        Returns:
            (N, d) end state, or (K // thin + 1, N, d) trajectory.
        """
        x = self._check_x(x0, "x0")
        t = check_positive(t, "t", allow_zero=True)
        n_steps = check_positive_int(n_steps, "n_steps", minimum=0)
        thin = check_thin(thin)
        generator = check_generator(generator, x.device)
        e, m, factor = self._factors(t, x)
        with torch.no_grad():
            x = x.detach().clone()
            traj = None
            if thin is not None:
                traj = x.new_empty((n_saved_states(n_steps, thin), *x.shape))
                traj[0] = x
            for k in tqdm(range(1, n_steps + 1), disable=not progress, desc="exact OU", leave=False):
                if t > 0:
                    x = self._apply(x, e, m, factor, generator)
                if traj is not None and k % thin == 0:
                    traj[k // thin] = x
        return traj if traj is not None else x

    # ---------------------------------------------------------------- private
    def _check_x(self, x: Tensor, name: str) -> Tensor:
        x = check_points(x, name, dim=self.dim)
        if x.device != self.bmat.device:
            raise ValueError(f"{name} is on {x.device} but the OU matrices are on {self.bmat.device}")
        return x

    def _transition64(self, t: float) -> tuple[Tensor, Tensor]:
        e = torch.linalg.matrix_exp(-t * self._b64)
        c = self._c64 - e @ self._c64 @ e.T
        return e, 0.5 * (c + c.T)

    def _factors(self, t: float, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e64, c64 = self._transition64(t)
        factor, info = torch.linalg.cholesky_ex(c64)
        if int(info) != 0:  # C is PSD only up to rounding: eigh fallback with clamped eigenvalues
            evals, evecs = torch.linalg.eigh(c64)
            factor = evecs * evals.clamp_min(0).sqrt()
        return e64.to(like.dtype), self._m64.to(like.dtype), factor.to(like.dtype)

    @staticmethod
    def _apply(x: Tensor, e: Tensor, m: Tensor, factor: Tensor, generator: torch.Generator | None) -> Tensor:
        xi = normal(x.shape, x, generator)
        return m + (x - m) @ e.T + xi @ factor.T

    def __repr__(self) -> str:
        return f"ExactOU(dim={self.dim}, dtype={self.bmat.dtype}, device={self.bmat.device})"
