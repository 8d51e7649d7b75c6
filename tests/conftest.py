"""Shared fixtures of the unit tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fluxbench import pairwise


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small problems (no oversubscription on shared CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["attention", "blocks"])
def strategy(request):
    """Run the test under both pairwise strategies (fused attention, materialised blocks)."""
    with pairwise.use_attention(request.param == "attention"):
        yield request.param


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool
