"""Training objectives: one training step of Flux Matching and DSM, the loss alone, ratios.

A step is loss, backward and an Adam update on a fixed-seed standard-normal batch (B, d)
at sigma = 0.3, on ``MLPField(d)`` (d -> 128 -> 128 -> d, SiLU; closed-form pullback) or on
a plain ``torch.nn.Sequential`` of the same shape (a user's own network: autograd
fallback). Sizes whose flux step takes more than a few seconds on the CPU run on CUDA only
(``common.CPU_MAX_B2D``).
"""

from __future__ import annotations

import os

import torch

from .common import (
    DEVICES,
    SEED,
    call_on_device,
    cuda_peak_bytes,
    generator,
    require,
    setup_device,
    skip_if,
    skip_slow_flux_on_cpu,
    synchronize,
    training_steps,
)

BATCHES = [256, 1024, 4096, 16384]
DIMS = [2, 64, 784]
METHODS = ["flux", "dsm"]
NETWORKS = ["mlp", "sequential"]
SIGMA = 0.3


class TrainingStep:
    """Seconds and peak process memory (RSS) of one training step."""

    params = [DEVICES, METHODS, NETWORKS, BATCHES, DIMS]
    param_names = ["device", "method", "network", "B", "d"]
    timeout = 600
    number = 1  # one step per sample: steps mutate the model, and a big one takes seconds
    repeat = (3, 10, 10.0)
    warmup_time = 0.0  # setup already ran one step (caches, allocator)
    rounds = 1

    def setup(self, device, method, network, batch, dim):
        self.device = setup_device(device)
        skip_slow_flux_on_cpu(self.device, batch, dim)
        self.step = training_steps(network, batch, dim, self.device)[method]
        self.step()
        synchronize(self.device)

    def time_step(self, device, method, network, batch, dim):
        self.step()
        synchronize(self.device)

    def peakmem_step(self, device, method, network, batch, dim):
        self.step()


class TrainingStepDeviceMemory:
    """Peak bytes allocated on the accelerator during one training step (torch's allocator)."""

    params = TrainingStep.params
    param_names = TrainingStep.param_names
    timeout = 600
    unit = "bytes"

    def setup(self, device, method, network, batch, dim):
        self.device = setup_device(device)
        skip_if(self.device.type == "cpu", "process memory on the CPU is TrainingStep.peakmem_step")
        self.step = training_steps(network, batch, dim, self.device)[method]
        self.step()

    def track_peak_bytes(self, device, method, network, batch, dim):
        return cuda_peak_bytes(self.step, self.device)


class StepRatio:
    """Flux step time over DSM step time, measured in one process, interleaved (median)."""

    params = [DEVICES, NETWORKS, BATCHES, DIMS]
    param_names = ["device", "network", "B", "d"]
    timeout = 600
    unit = "flux/DSM"

    def setup(self, device, network, batch, dim):
        self.device = setup_device(device)
        skip_slow_flux_on_cpu(self.device, batch, dim)
        self.bench = require("fluxbench.bench", "time_steps")
        self.steps = training_steps(network, batch, dim, self.device)
        # fewer repeats for steps that take a second or more (B^2 d above 1e8)
        self.repeats, self.warmup = (15, 3) if batch * batch * dim <= 1e8 else (3, 1)

    def track_flux_over_dsm(self, device, network, batch, dim):
        t = call_on_device(self.bench.time_steps, self.steps, repeats=self.repeats, warmup=self.warmup, device=self.device)
        return t["flux"] / t["dsm"]


class FluxLoss:
    """Seconds of the per-sample flux loss alone (forward, as in training: the graph is built)."""

    params = [DEVICES, BATCHES, DIMS]
    param_names = ["device", "B", "d"]
    timeout = 600
    number = 1
    repeat = (3, 10, 10.0)
    rounds = 1

    def setup(self, device, batch, dim):
        self.device = setup_device(device)
        skip_slow_flux_on_cpu(self.device, batch, dim)
        objectives = require("fluxbench.objectives", "flux_matching_loss")
        fields = require("fluxbench.fields", "MLPField")
        self.loss_fn = objectives.flux_matching_loss
        self.gen = generator(self.device)
        self.x = torch.randn(batch, dim, generator=self.gen, device=self.device)
        torch.manual_seed(SEED)
        self.model = fields.MLPField(dim).to(self.device)
        self.time_loss(device, batch, dim)

    def time_loss(self, device, batch, dim):
        self.loss_fn(self.model, self.x, SIGMA, generator=self.gen).mean()
        synchronize(self.device)


class PublishedLoss:
    """Seconds of the published reference implementation's loss on the same data and network.

    Optional: set ``FLUXBENCH_PUBLISHED_LOSS=FILE:FUNCTION``, the same spec as
    ``python -m fluxbench.bench --published`` (FILE the published ``src/loss.py`` or its
    checkout; ``FUNCTION(model, x, sigma**2)`` returns the loss). Skipped when unset.
    """

    params = [DEVICES, [256, 1024, 4096], [2, 64]]
    param_names = ["device", "B", "d"]
    timeout = 600
    number = 1
    repeat = (3, 10, 10.0)
    rounds = 1

    def setup(self, device, batch, dim):
        spec = os.environ.get("FLUXBENCH_PUBLISHED_LOSS")
        skip_if(not spec, "FLUXBENCH_PUBLISHED_LOSS is not set (FILE:FUNCTION of the published loss)")
        self.loss_fn = require("fluxbench.bench", "load_published").load_published(spec)
        self.device = setup_device(device)
        skip_slow_flux_on_cpu(self.device, batch, dim)
        fields = require("fluxbench.fields", "MLPField")
        self.x = torch.randn(batch, dim, generator=generator(self.device), device=self.device)
        torch.manual_seed(SEED)
        self.model = fields.MLPField(dim).to(self.device)
        self.time_loss(device, batch, dim)

    def time_loss(self, device, batch, dim):
        self.loss_fn(self.model, self.x, SIGMA**2)
        synchronize(self.device)

