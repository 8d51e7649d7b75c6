"""Verification: the KSD stationarity test and the combined (KSD + rollout) test.

The field is the exact score of N(0, I_d) and the samples N fixed-seed draws of it (H0
true): the cost of a test a user gates on. KSD is O(N^2 d); at N = 20000 it runs on CUDA
only (about 100 s on one CPU core, extrapolated from 0.95 s at N = 2000).
"""

from __future__ import annotations

import torch

from .common import DEVICES, generator, require, setup_device, skip_if

CPU_MAX_N = 2000


class StationarityTest:
    """Seconds of one ``fluxbench.verify.stationarity_test`` call (default options, seed 0)."""

    params = [DEVICES, ["ksd", "combined"], [2000, 20000], [2, 64]]
    param_names = ["device", "method", "N", "d"]
    timeout = 600
    number = 1
    repeat = (2, 5, 20.0)
    rounds = 1

    def setup(self, device, method, n, dim):
        self.device = setup_device(device)
        skip_if(self.device.type == "cpu" and n > CPU_MAX_N, f"N={n}: minutes on the CPU; runs on CUDA only")
        verify = require("fluxbench.verify", "stationarity_test")
        targets = require("fluxbench.targets", "Gaussian")
        self.test = verify.stationarity_test
        self.method = method
        self.target = targets.Gaussian.isotropic(dim).to(self.device, torch.float32)
        self.x = self.target.sample(n, generator=generator(self.device))

    def time_test(self, device, method, n, dim):
        self.test(self.target.score, self.x, method=self.method, seed=0)
