"""Hypothesis property suite of SPEC.md (run by ``nox -s verify``)."""
