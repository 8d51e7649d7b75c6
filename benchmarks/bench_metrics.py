"""Metrics: exact W2, sliced W2 and the unbiased MMD^2 between two point clouds.

The clouds are two independent fixed-seed samples of N(0, I_d) of N points each.
"""

from __future__ import annotations

import torch

from .common import DEVICES, generator, require, setup_device, skip_if, synchronize

METRICS = {"w2": "w2", "sliced_w2": "sliced_w2", "mmd": "mmd2_unbiased"}


class Distances:
    """Seconds of one metric evaluation."""

    params = [DEVICES, list(METRICS), [2000, 10000], [2, 64]]
    param_names = ["device", "metric", "N", "d"]
    timeout = 300
    number = 1
    repeat = (2, 10, 10.0)
    rounds = 1

    def setup(self, device, metric, n, dim):
        self.device = setup_device(device)
        metrics = require("fluxbench.metrics", METRICS[metric])
        # fluxbench refuses an exact W2 with N * M above W2_MAX_PAIRS (25e6; N = 10000 is 1e8)
        skip_if(metric == "w2" and n * n > getattr(metrics, "W2_MAX_PAIRS", 25_000_000), "N^2 above W2_MAX_PAIRS")
        self.fn = getattr(metrics, METRICS[metric])
        gen = generator(self.device)
        self.x = torch.randn(n, dim, generator=gen, device=self.device)
        self.y = torch.randn(n, dim, generator=gen, device=self.device)

    def time_distance(self, device, metric, n, dim):
        self.fn(self.x, self.y)
        synchronize(self.device)
