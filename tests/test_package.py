"""The top-level package presents its subpackages as attributes."""

from __future__ import annotations

import subprocess
import sys


def test_subpackages_are_attributes_after_a_plain_import():
    """`import fluxbench; fluxbench.verify` raised AttributeError; checked in a fresh
    interpreter so that no other test's import can make it pass."""
    code = "import fluxbench\nfor name in fluxbench.__all__:\n    getattr(fluxbench, name)\nfluxbench.verify.stationarity_test"
    subprocess.run([sys.executable, "-c", code], check=True)
