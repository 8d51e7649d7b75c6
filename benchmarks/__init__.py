"""asv benchmarks of fluxbench (``asv run``; configuration in ../asv.conf.json).

One module per package area, as numpy and scipy keep theirs: ``bench_objectives`` (training
steps, the loss), ``bench_samplers`` (Langevin throughput), ``bench_metrics`` (W2, sliced W2,
MMD), ``bench_verify`` (the KSD and combined stationarity tests) and ``bench_quality``
(sample quality and gradient signal-to-noise of small fixed-budget models). Shared pieces
(devices, skips, fixed-seed data) are in ``common``.

Every benchmark takes a ``device`` parameter; where the device is absent, or a size is too
slow for it, ``setup`` raises ``NotImplementedError``, which asv records as skipped. Every
random draw is seeded (``common.SEED``); the data of an existing benchmark is never changed,
only new benchmarks are added, so the history stays comparable.
"""
