"""``python -m tools.calibration``: see :mod:`tools.calibration.cli`."""

from .cli import main

# guarded: the spawned worker processes import this module again (as __mp_main__)
if __name__ == "__main__":
    raise SystemExit(main())
