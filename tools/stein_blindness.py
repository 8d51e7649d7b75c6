"""Why the KSD test misses ``triangle-weights``: which Stein test functions could see it.

    python -m tools.stein_blindness                    # population figures, about 1 min here
    python -m tools.stein_blindness --learned 100      # plus a learned test on 100 seeds (about 5 min)

For the generator L_f g = f . grad g + Lap g (SPEC section 1) every test function g gives
a Stein test: under H0, E_p[L_f g] = 0, and with N samples the statistic
z = sqrt(N) mean(L_f g) / sd(L_f g) is asymptotically N(0, 1). Under ``triangle-weights``
(samples from the equal-weight triangle mixture, f the score of the mixture with weights
(0.5, 0.25, 0.25)) its mean is E_p[(f - s_p) . grad g], non-zero only where modes overlap.
This tool measures, by Monte Carlo on ``--mc`` exact samples, the signal-to-noise ratio
sqrt(N) E[L_f g] / sd(L_f g) at N = 2000 of two families:

* RBF bumps g = k(., v) at J random locations v and lengthscale l (what the KSD's witness
  is made of), alone and in the best linear combination of the J (the Hotelling
  noncentrality lambda = N mu^T Sigma^-1 mu, which bounds any test built on them);
* mode responsibilities r_k(x) = softmax_k(-|x - c_k|^2 / (2 tau^2)) at the true centres
  c_k: flat inside each mode, so L_p r_k is small there, with their gradient where
  f - s_p lives (closed form in ``fluxbench.verify.modes``).

With ``--learned S`` it also runs, on seeds 0..S-1 of the calibration samples, the mode
test functions of ``ksd_test`` alone (``fluxbench.verify.modes``: k-means centres for
K in {2, 3, 4, 6}, tau in {1, 1.41, 2} x the within-cluster standard deviation, Hotelling
statistics, one Rademacher multiplier bootstrap of their maximum) and reports their
rejection rate on ``triangle-weights`` and on stationary cases. Writes
``OUT/population.csv``, ``OUT/learned.csv`` and ``OUT/README.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from fluxbench.fileio import write_text
from fluxbench.kernels import median_bandwidth
from fluxbench.ustat import max_p_value, rademacher_multipliers
from fluxbench.verify.modes import hotelling, mode_statistics, responsibility_generator

from tools.calibration.cases import CASE_BY_NAME, make_case, seed_samples

N_TEST = 2000
ALPHA = 0.01
BUMP_FACTORS = (0.125, 0.25, 0.5, 1.0)
BUMP_LOCATIONS = (10, 40)
TAU_FACTORS = (0.7, 1.0, 1.41, 2.0, 2.8)
NULL_CASES = ("triangle-score", "triangle-rot_scalar", "ring-score", "iso20-rot_scalar")


def bump_features(x: Tensor, f: Tensor, locations: Tensor, ell: float) -> Tensor:
    """(N, J) L_f k(., v_j)(x_i) for k(x, v) = exp(-|x - v|^2 / (2 l^2))."""
    a = 1.0 / ell**2
    delta = x[:, None, :] - locations[None]
    r2 = delta.square().sum(-1)
    return torch.exp(-0.5 * a * r2) * (-a * (f[:, None, :] * delta).sum(-1) + a * a * r2 - a * x.shape[1])


def _snr(feats: Tensor) -> Tensor:
    """(J,) sqrt(N_TEST) mean / sd of each column."""
    return math.sqrt(N_TEST) * feats.mean(0) / feats.std(0)


def population(n_mc: int, seed: int) -> pd.DataFrame:
    """SNRs and Hotelling noncentralities at N = 2000 of both families on triangle-weights."""
    target, field, _ = make_case(CASE_BY_NAME["triangle-weights"])
    gen = torch.Generator().manual_seed(seed)
    x = target.sample(n_mc, generator=gen).double()
    f = field(x)
    med = median_bandwidth(x[:2000])
    std = float(target.covariances[0, 0, 0]) ** 0.5
    rows = []

    def row(family: str, scale: str, j: int, feats: Tensor) -> None:
        stat, k, _ = hotelling(feats)
        lam = float(stat) * N_TEST / x.shape[0]
        power = float(stats.ncx2.sf(stats.chi2.isf(ALPHA, k), k, lam))
        rows.append({"family": family, "scale": scale, "functions": j, "rank": k,
                     "best_single_snr": float(_snr(feats).abs().max()),
                     "hotelling_noncentrality": lam, "hotelling_power": power})

    for j in BUMP_LOCATIONS:
        loc = target.sample(j, generator=gen).double()
        for c in BUMP_FACTORS:
            row("rbf bumps at sample points", f"l = {c} x median ({c * med:.2f})", j, bump_features(x, f, loc, c * med))
    for c in TAU_FACTORS:
        feats = responsibility_generator(x, f, target.means.double(), c * std)[:, :-1]  # they sum to 0
        row("responsibilities, true centres", f"tau = {c} x std ({c * std:.2f})", feats.shape[1], feats)
    return pd.DataFrame(rows)


def learned_test(x: Tensor, f: Tensor, seed: int, n_bootstrap: int = 1000) -> float:
    """p-value of the mode test functions alone (``fluxbench.verify.modes``, the defaults of
    ``ksd_test``) on one sample: the maximum of their standardised Hotelling statistics."""
    w = rademacher_multipliers(x.shape[0], n_bootstrap, torch.Generator().manual_seed(seed), x.device)
    res = mode_statistics(x, f, w, seed=seed)
    return max_p_value(res.z, res.z_boot)


def learned(n_seeds: int) -> pd.DataFrame:
    rows = []
    for name in ("triangle-weights", *NULL_CASES):
        target, field, _ = make_case(CASE_BY_NAME[name])
        p = np.array([learned_test(x := seed_samples(target, s, N_TEST).double(), field(x), s) for s in range(n_seeds)])
        rate = float((p < ALPHA).mean())
        rows.append({"case": name, "seeds": n_seeds, "rejections": int((p < ALPHA).sum()), "rate": rate,
                     "se": math.sqrt(rate * (1 - rate) / n_seeds)})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mc", type=int, default=200_000, help="Monte Carlo samples of the population figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learned", type=int, default=0, metavar="S", help="also run the learned test on S seeds")
    parser.add_argument("--out", type=Path, default=Path("results/calibration/stein-blindness"))
    args = parser.parse_args(argv)
    pop = population(args.mc, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "population.csv", pop.to_csv(index=False))
    fmt = {"best_single_snr": "{:.2f}".format, "hotelling_noncentrality": "{:.1f}".format,
           "hotelling_power": "{:.3f}".format}
    text = [
        "# Stein test functions on `triangle-weights` (N = 2000, alpha = 0.01)\n",
        f"`python {' '.join(['tools/stein_blindness.py', *sys.argv[1:]])}` "
        f"({platform.machine()}, torch {torch.__version__}; "
        f"{args.mc} Monte Carlo samples, seed {args.seed}). See the tool's docstring for the definitions.\n",
        "```", pop.to_string(index=False, formatters=fmt), "```",
    ]
    print(pop.to_string(index=False, formatters=fmt))
    if args.learned:
        lr = learned(args.learned)
        write_text(args.out / "learned.csv", lr.to_csv(index=False))
        text += ["\n## Learned responsibilities (k-means), rejection rate at alpha = 0.01\n",
                 "```", lr.to_string(index=False), "```"]
        print(lr.to_string(index=False))
    write_text(args.out / "README.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
