"""Tests of fluxbench.images.fid (FID/KID/IS through torch-fidelity) and the ``images fid`` command.

Sanity thresholds with the digit extractor, in units of tr(S), the total variance of the
real images' features (S their covariance; tr(S) ~ 63 here since the features are
standardised on the train split):

- two real halves (the 360 test digits against 360 train digits): FID / tr(S) < 0.1, i.e.
  the two fitted Gaussians differ by under a tenth of the features' own spread (finite-sample
  bias alone is ~ (1/n_1 + 1/n_2) (tr S + O(d) tr S / 8) for d = 64 features; measured 0.034);
- real against noise (uniform pixels): FID / tr(S) > 1, farther than the digits' own spread
  (measured 4.8);
- so FID(real, noise) > 10 FID(real, real') by a wide margin; KID likewise.

The Inception path is run end to end with a randomly initialised Inception-v3 state dict
(the real weights cannot be downloaded here), which checks the plumbing, not the numbers.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install 'fluxbench[images]')")
pytest.importorskip("torch_fidelity", reason="FID needs torch-fidelity (pip install 'fluxbench[images]')")

import torch  # noqa: E402
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception  # noqa: E402

from fluxbench.images import fid_cli  # noqa: E402
from fluxbench.images.data import digit_labels, digits  # noqa: E402
from fluxbench.images.extractor import EXTRACTOR_NAME, DigitsFeatureExtractor  # noqa: E402
from fluxbench.images.fid import WEIGHTS_ENV, image_metrics, to_uint8  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_torch_thread):
    return tmp_path_factory.mktemp("fluxbench-cache")


@pytest.fixture(autouse=True)
def _private_cache(cache, monkeypatch):
    monkeypatch.setenv("FLUXBENCH_CACHE", str(cache))  # the CLI's classifier goes there too


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _feature_trace(images: torch.Tensor, classifier_path: str) -> float:
    fe = DigitsFeatureExtractor(EXTRACTOR_NAME, ["features"], feature_extractor_weights_path=classifier_path)
    with torch.no_grad():
        (f,) = fe(to_uint8(images))
    return float(torch.cov(f.T.double()).trace())


def test_fid_small_between_real_halves_and_large_against_noise():
    real, other = digits(split="test"), digits(split="train")[:360]
    same = image_metrics(real, other)
    noise = image_metrics(real, _noise(360, 0))
    trace = _feature_trace(real, same["classifier_path"])
    assert same["fid"] / trace < 0.1, (same["fid"], trace)
    assert noise["fid"] / trace > 1.0, (noise["fid"], trace)
    assert noise["fid"] > 10 * same["fid"]
    assert noise["kid_mean"] > 10 * same["kid_mean"]
    for result in (same, noise):
        assert result["extractor"].startswith(EXTRACTOR_NAME)
        assert result["classifier_test_accuracy"] >= 0.95
        assert result["n_real"] == 360 and result["n_fake"] == 360


def test_metrics_are_reproducible_and_inception_score_sees_classes():
    real, fake = digits(split="test"), digits(split="train")
    first = image_metrics(real, fake, isc=True, kid_subsets=20)
    assert first == image_metrics(real, fake, isc=True, kid_subsets=20)
    # IS = exp(E KL(p(y|x) || p(y))) <= 10 classes; balanced, confidently classified digits
    # come close to 10, images of a single class close to 1
    assert 9.0 < first["isc_mean"] <= 10.0
    zeros = fake[digit_labels(split="train") == 0]
    assert image_metrics(real, zeros, isc=True, kid=False)["isc_mean"] < 1.5
    # the higher-resolution samples are scored in the same feature space
    up = image_metrics(real, digits(split="train", resolution=32)[:360], kid=False)
    assert up["fid"] < 0.2 * image_metrics(real, _noise(360, 1), kid=False)["fid"]


def test_to_uint8_quantises_clips_and_replicates_grey():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 5)
    assert u[0, 0, 0].tolist() == [0, 0, 128, 255, 255]  # round(127.5) = 128 (half to even)
    assert torch.equal(u[:, 0], u[:, 2])
    rgb = torch.zeros(2, 3, 4, 4)
    assert to_uint8(rgb).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_uint8(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((2, 1, 4, 4), float("nan")))


def test_image_metrics_rejects_bad_arguments():
    real = digits(split="test")[:20]
    with pytest.raises(ValueError, match="extractor must be one of"):
        image_metrics(real, real, extractor="vgg")
    with pytest.raises(ValueError, match="at least 2 images"):
        image_metrics(real, real[:1])
    with pytest.raises(ValueError, match="10 fake images"):
        image_metrics(real, real[:5], isc=True)
    with pytest.raises(ValueError, match="device"):
        image_metrics(real, real, device="meta")


def test_missing_inception_weights_fail_clearly_without_download(tmp_path, monkeypatch, no_download):
    real = digits(split="test")[:4]
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        image_metrics(real, real, extractor="inception")
    assert WEIGHTS_ENV in str(info.value) and "--weights" in str(info.value)
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        image_metrics(real, real, extractor="inception", weights_path=missing)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError) as info:
        image_metrics(real, real, extractor="inception")
    assert str(missing) in str(info.value) and WEIGHTS_ENV in str(info.value)  # the path came from the variable


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 state dict in torch-fidelity's layout (not the real weights)."""
    cls = tf_inception.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, tf_inception.load_state_dict_from_url
    cls.load_state_dict = lambda self, state_dict, *a, **k: None
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = cls("inception-v3-compat", ["2048"]).state_dict()
    finally:
        cls.load_state_dict, tf_inception.load_state_dict_from_url = original_load, original_url
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return path


def test_inception_path_runs_end_to_end(random_inception_weights, no_download):
    real, fake = digits(split="test")[:6], _noise(6, 2)
    result = image_metrics(real, fake, extractor="inception", weights_path=random_inception_weights, kid_subsets=3)
    assert result["extractor"].startswith("inception-v3-compat")
    assert result["weights_path"] == str(random_inception_weights)
    assert result["fid"] > 0 and result["kid_subset_size"] == 6
    assert "classifier_test_accuracy" not in result


# ---------------------------------------------------------------------------- the command
def test_fid_command_writes_json(tmp_path, capsys):
    fake = tmp_path / "samples.pt"
    torch.save(digits(split="train", resolution=16)[:200], fake)
    out = tmp_path / "out"
    assert fid_cli.main(["--real", "digits-test", "--fake", str(fake), "--out", str(out), "--kid-subsets", "5"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert result["extractor"].startswith(EXTRACTOR_NAME) and result["n_real"] == 360 and result["n_fake"] == 200
    assert result["fid"] == image_metrics(digits(split="test", resolution=16), torch.load(fake), kid_subsets=5)["fid"]
    assert "FID" in capsys.readouterr().out


def test_fid_command_with_weights_path(tmp_path, random_inception_weights, no_download):
    fake, real = tmp_path / "fake.pt", tmp_path / "real.pt"
    torch.save({"samples": _noise(5, 3)}, fake)
    torch.save(digits(split="test")[:5], real)
    out = tmp_path / "out"
    args = ["--real", str(real), "--fake", str(fake), "--extractor", "inception", "--out", str(out), "--no-kid"]
    assert fid_cli.main([*args, "--weights", str(random_inception_weights)]) == 0
    assert json.loads((out / "fid.json").read_text())["extractor"].startswith("inception-v3-compat")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--real", "digits", "--fake", "MISSING"], "no file"),
        (["--real", "digits", "--fake", "FAKE", "--extractor", "inception"], WEIGHTS_ENV),
        (["--real", "digits", "--fake", "FAKE", "--extractor", "vgg"], "invalid choice"),
        (["--real", "digits", "--fake", "FAKE", "--device", "nonsense"], "not a device"),
        (["--real", "digits", "--fake", "BAD"], "floating \\(N, C, H, W\\) tensor"),
        (["--real", "digits", "--fake", "RECT"], "square"),
    ],
)
def test_fid_command_usage_errors(tmp_path, capsys, monkeypatch, argv, message, no_download):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "fake.pt")
    torch.save(torch.zeros(4, 8, 8), tmp_path / "bad.pt")
    torch.save(torch.zeros(4, 1, 8, 12), tmp_path / "rect.pt")
    names = {"MISSING": tmp_path / "missing.pt", "FAKE": tmp_path / "fake.pt", "BAD": tmp_path / "bad.pt",
             "RECT": tmp_path / "rect.pt"}
    argv = [str(names.get(a, a)) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        fid_cli.main(argv)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
