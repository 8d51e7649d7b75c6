"""The speed harness: ``python -m fluxbench.bench`` and ``tools/bench_ab.py`` time real steps."""

from __future__ import annotations

import math

import pytest
import torch

from fluxbench.bench import TABLES, flux_peak_memory, load_published, main, step_functions, time_steps

from .conftest import load_tool



def test_each_step_function_trains_its_own_model():
    """A step is loss, backward and an Adam update: every closure moves its model's weights."""
    steps = step_functions(32, 2)
    assert set(steps) == {"flux", "flux_quarter", "dsm", "dsm_batch"}
    for name, step in steps.items():
        model = step.__defaults__[0]
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), name


def test_table_ratios_are_the_timed_steps():
    table = main(["--batch", "16", "--dim", "2", "--repeats", "3"])
    assert list(table["B"]) == [16] and list(table["d"]) == [2]
    row = table.iloc[0]
    assert row["flux_ms"] > 0 and row["dsm_ms"] > 0
    assert row["flux/dsm"] == pytest.approx(row["flux_ms"] / row["dsm_ms"])
    assert row["flux_B/4/dsm"] == pytest.approx(row["flux_B/4_ms"] / row["dsm_ms"])


def test_time_steps_reports_a_median_per_closure():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def fn():
            calls[name] += 1

        return fn

    times = time_steps({"a": bump("a"), "b": bump("b")}, repeats=5, warmup=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 7, "b": 7}


def test_time_steps_adds_rounds_until_min_time_up_to_its_cap():
    """min_time extends the rounds beyond ``repeats`` (here never reached, so the cap
    decides: 4 rounds); without it exactly ``repeats`` rounds run."""
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    time_steps(steps, repeats=2, warmup=1, min_time=1e6, max_repeats=4)
    assert len(calls) == 2 * (1 + 4)
    calls.clear()
    time_steps(steps, repeats=2, warmup=1)
    assert len(calls) == 2 * (1 + 2)


def test_ab_tool_times_both_revisions_in_one_process(capsys):
    tool = load_tool("bench_ab")
    reason = tool.missing_precondition()
    if reason is not None:
        pytest.skip(reason)
    med = tool.main(["--base", "HEAD", "--batch", "16", "--rounds", "3", "--warmup", "1"])
    assert set(med) == {"flux_base", "flux_work", "dsm"} and all(t > 0 for t in med.values())
    assert "flux/dsm base" in capsys.readouterr().out


def test_bench_names_itself_and_refuses_a_bad_device_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: fluxbench bench")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "no-such-device"])
    assert exc.value.code == 2 and "--device 'no-such-device' is not usable" in capsys.readouterr().err


def test_step_functions_run_on_the_device_they_are_given():
    steps = step_functions(16, 2, device="cpu")
    steps["flux"]()
    assert time_steps(steps, repeats=1, warmup=0, device=torch.device("cpu")).keys() == steps.keys()


def test_ab_tool_names_its_missing_precondition(tmp_path, monkeypatch, capsys):
    """Without git on PATH, or outside a checkout, the tool says which (its test then skips)."""
    tool = load_tool("bench_ab")
    assert "git checkout" in tool.missing_precondition(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tool.missing_precondition() == "tools/bench_ab.py needs git on PATH"
    with pytest.raises(SystemExit) as exc:
        tool.main(["--rounds", "1"])
    assert exc.value.code == 2 and "needs git on PATH" in capsys.readouterr().err


PUBLISHED = '''
SEEN = []


def loss_fn(model, x, sigma2):
    SEEN.append(sigma2)
    return (model(x) * sigma2 + x).square().sum(1)
'''


def test_published_loss_is_imported_from_the_users_file_and_timed(tmp_path):
    """--published FILE:FUNCTION imports that file; the loss gets sigma^2; its ratio is to flux."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loss.py").write_text(PUBLISHED)
    table = main(["--batch", "16", "--dim", "2", "--repeats", "3", "--published", f"{tmp_path}:loss_fn"])
    row = table.iloc[0]
    assert row["published_ms"] > 0
    assert row["published/flux"] == pytest.approx(row["published_ms"] / row["flux_ms"])
    fn = load_published(f"{tmp_path / 'src' / 'loss.py'}:loss_fn")
    step_functions(16, 2, sigma=0.3, published=fn)["published"]()
    assert fn.__globals__["SEEN"] == [pytest.approx(0.09)]


def test_published_column_is_na_without_it_and_a_bad_spec_is_a_usage_error(tmp_path, capsys):
    row = main(["--batch", "16", "--dim", "2", "--repeats", "3"]).iloc[0]
    assert math.isnan(row["published_ms"]) and math.isnan(row["published/flux"])
    assert " NA " in capsys.readouterr().out
    for spec, message in [
        (str(tmp_path), "needs FILE:FUNCTION"),
        (f"{tmp_path}:loss_fn", "no published loss at"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["--published", spec])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "loss.py").write_text(PUBLISHED)
    with pytest.raises(ValueError, match="defines no function 'nope'"):
        load_published(f"{tmp_path / 'loss.py'}:nope")


def test_table_preset_gives_its_rows_in_order(monkeypatch):
    assert TABLES["gpu"][0] == (256, 2) and len(TABLES["gpu"]) == 7
    monkeypatch.setitem(TABLES, "tiny", [(16, 3), (8, 2)])
    table = main(["--table", "tiny", "--repeats", "3"])
    assert list(zip(table["B"], table["d"])) == [(16, 3), (8, 2)]


def test_peak_memory_is_na_on_cpu():
    assert math.isnan(flux_peak_memory(lambda: None, "cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda_counts_what_the_step_allocates():
    def step():
        torch.empty(1 << 20, device="cuda")  # 4 MiB, freed at once

    assert flux_peak_memory(step, "cuda") >= 4 * 2**20


def test_compiled_steps_train_their_models():
    """compile=True: the compiled network and update still move every model's weights."""
    steps = step_functions(16, 2, compile=True)
    for name, step in steps.items():
        model = step.__defaults__[0]
        before = [p.detach().clone() for p in model.parameters()]
        step()
        step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), name
