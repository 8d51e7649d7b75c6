"""The result record of :func:`fluxbench.verify.stationarity_test`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StationarityReport"]


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


@dataclass
class StationarityReport:
    """Outcome of a stationarity test of H0: "the law of the samples is stationary for f".

    Attributes:
        method: ``"ksd"``, ``"rollout"`` or ``"combined"``.
        statistic: the test statistic. ksd: the largest standardised KSD^2 U-statistic
            over the lengthscales; rollout: the largest standardised paired MMD^2 over
            the lengthscales (design ``"paired"``), or the unbiased MMD^2 between the end
            cloud and the held-out half (design ``"split"``; with
            ``mmd_lengthscale_factors`` the smallest per-lengthscale permutation p-value
            of the aggregated test); combined: the smaller of the two sub-test p-values.
        p_value: p-value in (0, 1] (combined: the Bonferroni-adjusted
            ``min(1, 2 min(p_ksd, p_rollout))``).
        alpha: the level of the test.
        passed: ``p_value >= alpha`` (H0 not rejected).
        n: number of samples N.
        d: dimension.
        seed: the seed every random draw of the test came from.
        lengthscales: ksd: the RBF lengthscales used.
        median_lengthscale: ksd: the median heuristic the grid is scaled from (None if the
            lengthscales were given).
        n_bootstrap: ksd, and rollout with design ``"paired"``: number of wild-bootstrap draws.
        ksd2: ksd: the U-statistic KSD^2 at each lengthscale.
        ksd2_sd: ksd: the null standard deviation of each (exact wild-bootstrap value).
        eps: rollout: the sampler's step size (None for a user sampler that was given none).
        n_steps: rollout: the number of sampler steps.
        total_time: rollout: ``eps * n_steps``.
        mmd2: rollout: the unbiased MMD^2 at ``mmd_lengthscale`` (None for an aggregated
            test whose grid leaves the median out).
        mmd_lengthscale: rollout: the median-heuristic MMD lengthscale (or the one given).
        n_permutations: rollout with design ``"split"``: permutations of the MMD test.
        w2: rollout: W2 between chain ends and samples independent of them (None if not
            computed; see :func:`fluxbench.verify.rollout_test`).
        w2_noise_floor: rollout: W2 between two independent halves of the samples.
        sub_reports: combined: ``{"ksd": report, "rollout": report}`` (each at level alpha/2).
        details: further method-specific numbers (documented by the method).
        elapsed_s: wall-clock seconds.
    """

    method: str
    statistic: float
    p_value: float
    alpha: float
    passed: bool
    n: int
    d: int
    seed: int
    lengthscales: tuple[float, ...] | None = None
    median_lengthscale: float | None = None
    n_bootstrap: int | None = None
    ksd2: tuple[float, ...] | None = None
    ksd2_sd: tuple[float, ...] | None = None
    eps: float | None = None
    n_steps: int | None = None
    total_time: float | None = None
    mmd2: float | None = None
    mmd_lengthscale: float | None = None
    n_permutations: int | None = None
    w2: float | None = None
    w2_noise_floor: float | None = None
    sub_reports: dict[str, "StationarityReport"] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None

    @property
    def rejected(self) -> bool:
        """``not passed``: H0 (stationarity) rejected at level alpha."""
        return not self.passed

    @property
    def step_size(self) -> float | None:
        """Alias of ``eps``."""
        return self.eps

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (sub-reports included)."""
        out = dataclasses.asdict(self)
        return out

    def __str__(self) -> str:
        verdict = "PASSED (stationarity not rejected)" if self.passed else "FAILED (stationarity rejected)"
        lines = [
            f"Stationarity test [{self.method}]: {verdict}",
            f"  p-value {self.p_value:.4g} vs alpha {self.alpha:g}; statistic {_fmt(self.statistic)}; "
            f"N = {self.n}, d = {self.d}, seed = {self.seed}",
        ]
        if self.lengthscales is not None:
            ells = ", ".join(_fmt(v, ".3g") for v in self.lengthscales)
            med = f" (median heuristic {_fmt(self.median_lengthscale, '.3g')})" if self.median_lengthscale else ""
            lines.append(f"  KSD lengthscales [{ells}]{med}; {self.n_bootstrap} wild-bootstrap draws")
            if self.ksd2 is not None and self.ksd2_sd is not None:
                z = ", ".join(
                    _fmt(u / s if s > 0 else 0.0, ".3g") for u, s in zip(self.ksd2, self.ksd2_sd)
                )
                lines.append(f"  standardised KSD^2 per lengthscale [{z}]")
        if self.method == "rollout":
            lines.append(
                f"  rollout: eps = {_fmt(self.eps, '.3g')}, n_steps = {_fmt(self.n_steps, 'd') if self.n_steps is not None else 'n/a'}, "
                f"total time {_fmt(self.total_time, '.3g')} (ULA bias is O(eps): report eps with the result)"
            )
            resampling = (
                f"{self.n_permutations} permutations"
                if self.n_permutations is not None
                else f"{self.n_bootstrap} wild-bootstrap draws"
            )
            design = self.details.get("design", "n/a")
            lines.append(
                f"  {design} MMD^2 = {_fmt(self.mmd2)} (lengthscale {_fmt(self.mmd_lengthscale, '.3g')}, "
                f"{resampling}); W2 = {_fmt(self.w2)} vs noise floor {_fmt(self.w2_noise_floor)}"
            )
            if "mmd_lengthscales" in self.details:
                ells = ", ".join(f"{v:.3g}" for v in self.details["mmd_lengthscales"])
                ps = ", ".join(f"{v:.3g}" for v in self.details["mmd_p_value_per_lengthscale"])
                lines.append(f"  over lengthscales [{ells}]: p per lengthscale [{ps}] ({self.details['mmd_rule']})")
        if self.sub_reports:
            lines.append(f"  Bonferroni: each sub-test at alpha/2 = {self.alpha / 2:g}; reject if either rejects")
            for name, rep in self.sub_reports.items():
                sub = str(rep).splitlines()
                lines.append(f"  - {name}: " + sub[0])
                lines.extend("    " + s for s in sub[1:])
        if self.elapsed_s is not None and not self.sub_reports:
            lines.append(f"  ({self.elapsed_s:.2f} s)")
        return "\n".join(lines)
