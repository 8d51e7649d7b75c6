"""``fluxbench images train|sample|fid``: dispatch, help, usage errors, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn", reason="needs the images extra: pip install 'fluxbench[images]'")
pytest.importorskip("torchvision", reason="needs the images extra: pip install 'fluxbench[images]'")
pytest.importorskip("torch_fidelity", reason="needs the images extra: pip install 'fluxbench[images]'")
import torch

from fluxbench import cli as top
from fluxbench.images import cli
from fluxbench.images.sample_cli import evaluations, sample_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--channels", "8", "--steps", "2", "--batch-size", "8", "--no-progress"]


def test_top_level_command_lists_images(capsys):
    with pytest.raises(SystemExit) as exc:
        top.main(["--help"])
    assert exc.value.code == 0 and "images" in capsys.readouterr().out


def test_images_without_subcommand_prints_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "sample", "fid")) and "example" in out


@pytest.mark.parametrize("sub", ["train", "sample", "fid"])
def test_subcommands_have_help_with_an_example_and_a_device(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "example" in out and "--device" in out and "--out" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--steps", "0"], "must be >= 1"),
        (["train", "--data", "cifar10"], "--data-root"),
        (["train", "--data", "digits", "--data-root", "x"], "applies to cifar10"),
        (["train", "--method", "dsm", "--no-proposal"], "apply to --method flux"),
        (["train", "--multipliers", "1", "2", "2", "2", "2"], "cannot be halved"),
        (["train", "--device", "tpu9"], "device"),
        (["sample", "--checkpoint", "missing.pt"], "no checkpoint"),
        (["sample", "--checkpoint", "x.pt", "--sigma-min", "90"], "below --sigma-max"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_cifar10_folder_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", "cifar10", "--data-root", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_train_then_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert top.main(["images", "train", "--method", "dsm", *TINY, "--out", str(run)]) is None
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "log.csv", "config.json"}
    assert json.loads((run / "config.json").read_text())["steps_done"] == 2
    for sampler in ("heun", "pc", "ode"):
        out = tmp_path / sampler
        code = cli.main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--sampler", sampler, "--steps", "3",
                         "--n", "5", "--batch-size", "2", "--out", str(out), "--no-progress"])
        assert code == 0
        x = torch.load(out / "samples.pt")
        assert x.shape == (5, 1, 8, 8) and bool(torch.isfinite(x).all())
        assert (out / "grid.png").stat().st_size > 0
        meta = json.loads((out / "samples.json").read_text())
        assert meta["evaluations_per_image"] == evaluations(sampler, 3)


def test_deterministic_samples_do_not_depend_on_the_batch_size():
    from fluxbench.images import EDMField, small_unet

    field = EDMField(small_unet(1, channels=8)).eval()
    a = sample_images(field, 5, (1, 8, 8), steps=3, batch_size=5, generator=torch.Generator().manual_seed(0))
    b = sample_images(field, 5, (1, 8, 8), steps=3, batch_size=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_evaluation_counts():
    assert evaluations("heun", 18) == 35  # EDM's CIFAR-10 setting: 35 NFE
    assert evaluations("ode", 10, ode_method="euler") == 10
    assert evaluations("pc", 10, corrector_steps=1) == 19
