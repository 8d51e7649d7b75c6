"""Samplers: unadjusted Langevin throughput (particles x steps per second)."""

from __future__ import annotations

import time

import torch

from .common import DEVICES, SEED, generator, require, setup_device, synchronize

N_STEPS = 50


class LangevinThroughput:
    """Particle-steps per second of ``fluxbench.samplers.langevin`` on an ``MLPField(d)``
    (d -> 128 -> 128 -> d, fixed-seed weights), N particles from N(0, I), step 1e-3."""

    params = [DEVICES, [2000, 20000], [2, 64]]
    param_names = ["device", "N", "d"]
    timeout = 300
    unit = "particle-steps/s"

    def setup(self, device, n, dim):
        self.device = setup_device(device)
        self.langevin = require("fluxbench.samplers", "langevin").langevin
        fields = require("fluxbench.fields", "MLPField")
        torch.manual_seed(SEED)
        self.field = fields.MLPField(dim).to(self.device).eval()
        self.gen = generator(self.device)
        self.x0 = torch.randn(n, dim, generator=self.gen, device=self.device)
        self.langevin(self.field, self.x0, step_size=1e-3, n_steps=2, generator=self.gen)

    def track_particle_steps_per_second(self, device, n, dim):
        synchronize(self.device)
        t0 = time.perf_counter()
        self.langevin(self.field, self.x0, step_size=1e-3, n_steps=N_STEPS, generator=self.gen)
        synchronize(self.device)
        return n * N_STEPS / (time.perf_counter() - t0)
