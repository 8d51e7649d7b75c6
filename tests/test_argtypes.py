"""fluxbench.argtypes: the command lines' argument types turn bad values into usage errors."""

from __future__ import annotations

import argparse

import pytest
import torch

from fluxbench.argtypes import device_arg, positive_float, positive_int


def test_good_values_parse():
    assert positive_int(0)("0") == 0 and positive_int()("7") == 7
    assert positive_float("0.25") == 0.25
    assert device_arg("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_int(1), "0", "must be >= 1, got 0"),
        (positive_int(0), "-1", "must be >= 0, got -1"),
        (positive_int(1), "2.5", "expected an integer, got '2.5'"),
        (positive_float, "0", "must be a finite number > 0"),
        (positive_float, "inf", "must be a finite number > 0"),
        (positive_float, "nan", "must be a finite number > 0"),
        (positive_float, "x", "expected a number, got 'x'"),
        (device_arg, "nonsense", "not a device: 'nonsense'"),
    ],
)
def test_bad_values_are_argument_type_errors(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_is_named():
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available"):
        device_arg("cuda")
