"""Tests of fluxbench.images.extractor: the digit classifier, its cache, its torch-fidelity extractor.

Exact checks (bit-for-bit determinism, cache behaviour, feature plumbing) plus one quality
requirement: the default classifier's held-out accuracy is at least 0.95 (features of a
classifier that cannot tell the digits apart would make FID meaningless; it reaches 0.989).
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install 'fluxbench[images]')")
pytest.importorskip("torch_fidelity", reason="the extractor needs torch-fidelity (pip install 'fluxbench[images]')")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # noqa: E402

from fluxbench.images import extractor as ex  # noqa: E402
from fluxbench.images.data import digit_labels, digits  # noqa: E402

TINY = ex.ClassifierConfig(width=4, features=8, steps=15, batch_size=32)


@pytest.fixture(scope="module")
def default_classifier(tmp_path_factory, one_torch_thread):
    """The default classifier, trained once into a private cache folder."""
    folder = tmp_path_factory.mktemp("fluxbench-cache")
    return folder, *ex.digit_classifier(cache=folder)


def test_training_is_deterministic_and_leaves_global_state_alone(one_torch_thread):
    rng_before = torch.random.get_rng_state()
    torch.set_num_threads(2)  # training runs on one thread and must restore the caller's count
    try:
        a, info_a = ex.train_digit_classifier(TINY)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    b, info_b = ex.train_digit_classifier(TINY)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert info_a == info_b
    c, _ = ex.train_digit_classifier(dataclasses.replace(TINY, seed=1))
    assert not torch.equal(a.state_dict()["head.1.weight"], c.state_dict()["head.1.weight"])


def test_default_classifier_accuracy_is_reported_and_high(default_classifier):
    folder, path, info = default_classifier
    assert path.parent == folder and path.is_file()
    assert info["test_accuracy"] >= 0.95, info
    # the reported accuracy is the loaded model's accuracy on the held-out split
    model, loaded = ex.load_digit_classifier(path)
    x, y = digits(resolution=16, split="test"), digit_labels(split="test")
    with torch.no_grad():
        accuracy = float((model(x)[1].argmax(1) == y).double().mean())
    assert accuracy == info["test_accuracy"] == loaded["test_accuracy"]
    # features are standardised on the train split: mean 0, std 1 per dimension there
    with torch.no_grad():
        f = model(digits(resolution=16, split="train"))[0]
    torch.testing.assert_close(f.mean(0), torch.zeros(f.shape[1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(f.std(0), torch.ones(f.shape[1]), rtol=0, atol=1e-4)


def test_cache_is_reused_keyed_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    path, info = ex.digit_classifier(TINY, cache=tmp_path)
    assert info["key"] in path.name
    other, _ = ex.digit_classifier(dataclasses.replace(TINY, seed=3), cache=tmp_path)
    assert other != path  # the config is part of the key

    def no_training(config):
        raise AssertionError("trained although the cache holds the file")

    monkeypatch.setattr(ex, "train_digit_classifier", no_training)
    assert ex.digit_classifier(TINY, cache=tmp_path)[0] == path
    monkeypatch.undo()

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable digit-classifier file"):
        ex.load_digit_classifier(path)
    with pytest.warns(UserWarning, match="rebuilding the digit classifier cache"):
        rebuilt, again = ex.digit_classifier(TINY, cache=tmp_path)
    assert rebuilt == path and again["test_accuracy"] == info["test_accuracy"]
    ex.load_digit_classifier(path)  # whole again


def test_foreign_and_missing_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a fluxbench digit-classifier file"):
        ex.load_digit_classifier(foreign)
    with pytest.raises(FileNotFoundError, match="no digit-classifier file"):
        ex.load_digit_classifier(tmp_path / "absent.pt")
    with pytest.raises(TypeError, match="ClassifierConfig"):
        ex.digit_classifier({"steps": 3}, cache=tmp_path)


def test_extractor_is_registered_and_feeds_the_classifier(default_classifier):
    _, path, _ = default_classifier
    assert FEATURE_EXTRACTORS_REGISTRY[ex.EXTRACTOR_NAME] is ex.DigitsFeatureExtractor
    fe = ex.DigitsFeatureExtractor(ex.EXTRACTOR_NAME, ["features", "logits_unbiased"], feature_extractor_weights_path=str(path))
    model, _ = ex.load_digit_classifier(path)
    gen = torch.Generator().manual_seed(0)
    # at the classifier's resolution: grey = u / 127.5 - 1 of the (identical) channels
    u = torch.randint(0, 256, (5, 1, 16, 16), generator=gen, dtype=torch.uint8)
    features, logits = fe(u.expand(-1, 3, -1, -1))
    with torch.no_grad():
        ref_features, ref_logits = model(u.float() / 127.5 - 1)
    torch.testing.assert_close(features, ref_features, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    # other sizes are resized bilinearly to 16x16 (anti-aliased when shrinking)
    u8 = torch.randint(0, 256, (5, 1, 8, 8), generator=gen, dtype=torch.uint8)
    up = F.interpolate(u8.float() / 127.5 - 1, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(fe(u8.expand(-1, 3, -1, -1))[0], model(up)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        ex.DigitsFeatureExtractor(ex.EXTRACTOR_NAME, ["features"])
