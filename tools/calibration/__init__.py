"""Measure the size and power of fluxbench's stationarity tests (SPEC section 5: "measured, never assumed").

    python -m tools.calibration [--seeds 100] [--n 2000] [--quick] [--jobs 1] [--threads 1]
                                [--device cpu] [--cases PATTERN[,PATTERN...]] [--out DIR]
                                [--rerun-ksd | --rerun-rollout] [--refresh-w2]

Run from the repository root (``tools`` is a directory of the repository, not part of the
installed package); it uses fluxbench's public API only. For every case (a target, a field,
and whether the target is stationary for the field: :mod:`.cases`) and every seed, N exact
samples of the target are tested with ``method="ksd"`` and ``method="rollout"``, and
``"combined"`` is derived from the two p-values (:mod:`.run`). The W2 between the target
and the perturbed field's stationary law says which perturbations a test must detect
(:mod:`.perturbation`).

Outputs (in ``--out``, default ``results/calibration``; :mod:`.storage`, :mod:`.markdown`):

* ``calibration.csv``: one row per case x method x alpha (alpha = 0.01, the default
  level, and 0.05): rejections, rate, se = sqrt(rate (1 - rate) / n_seeds), the W2 of the
  perturbation, the requirement and whether it is met. Requirements: stationary cases,
  ``rate <= alpha + 2 se``; perturbed cases with W2 >= 0.1, ``rate >= 0.9``.
* ``pvalues.csv``: every p-value of every seed (the raw material of the table).
* ``README.md``: the summary, the command, date, machine, device and torch threads.
* ``commands.log``: every command run into the directory.

Results are appended per case with atomic writes: an interrupted run loses at most the
case in progress, and a rerun skips the cases already in the CSV with the same N and number
of seeds. ``--rerun-rollout`` recomputes the rollout p-values of every selected case on the
same samples, reusing the stored KSD p-values (after a change to the rollout test only);
``--rerun-ksd`` does the converse. ``--refresh-w2`` recomputes the W2 columns of the cases
already in the CSV (from ``pvalues.csv``, without rerunning the seeds).
"""
