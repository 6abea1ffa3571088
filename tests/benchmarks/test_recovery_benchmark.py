"""``benchmarks/recovery.py --quick``: every arm appears with finite figures, the step-0 perplexity the conversion
report gives equals the benchmark's own re-measurement, a smoke run never writes over recorded results, and a
count below one is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.fixture
def recovery():
    spec = importlib.util.spec_from_file_location("recovery", REPO / "benchmarks" / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_arm_and_its_step0_figures_equal_a_remeasurement(recovery, tmp_path):
    variants = ["geglu_tanh", "swiglu"]
    assert recovery.main(["--quick", "--out", str(tmp_path), "--variants", *variants]) == 0
    results = json.loads((tmp_path / "recovery.json").read_text())

    arms = results["arms"]
    assert set(arms) == {"source (trained on)", "source (distilled from itself)",
                         *(f"{v} equal-param, distilled" for v in variants),
                         *(f"{v} random-init, distilled" for v in variants)}  # fmt: skip
    for name, arm in arms.items():
        assert len(arm["tokens"]) == len(arm["perplexity"]) >= 2, name
        assert arm["tokens"][0] == 0 and all(math.isfinite(p) for p in arm["perplexity"]), name
    source = arms["source (trained on)"]
    for variant in variants:
        step0 = results["step0"][variant]
        assert step0["report_perplexity"] == pytest.approx(step0["remeasured_perplexity"], rel=1e-6)
        equal = arms[f"{variant} equal-param, distilled"]
        # Equal parameters: the MLPs' counts are within the rounding of the width to a multiple of 8.
        per_unit = 3 * results["settings"]["n_embd"] + 2
        layers = results["settings"]["n_layer"]
        assert abs(equal["mlp_parameters"] - source["mlp_parameters"]) <= 4 * per_unit * layers
        assert arms[f"{variant} random-init, distilled"]["intermediate_size"] == equal["intermediate_size"]
    assert set(results["goals"]) == set(variants)
    table = (tmp_path / "recovery.md").read_text()
    assert all(f"| {name} |" in table for name in arms)
    assert (tmp_path / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_runs_never_write_over_the_recorded_results(recovery):
    recorded = (REPO / "benchmarks" / "results").resolve()
    assert recovery.default_out(quick=False) == recorded
    quick = recovery.default_out(quick=True)
    assert recorded not in quick.parents and quick.parent.name == "bench_results"  # git-ignored
    # The fixture's recipe is quality.py's, imported, not copied: its settings are quality's own class.
    quality = sys.modules["quality"]
    assert Path(quality.__file__).resolve() == (REPO / "benchmarks" / "quality.py").resolve()
    assert isinstance(recovery.FULL, quality.Settings) and isinstance(recovery.QUICK, quality.Settings)


def test_thread_and_worker_counts_below_one_are_refused_in_one_line(recovery, capsys):
    quality = sys.modules["quality"]
    for main, flags, message in ((recovery.main, ["--threads", "0"], "--threads=0 is invalid"),
                                 (quality.main, ["--workers=-1"], "--workers=-1 is invalid")):  # fmt: skip
        with pytest.raises(SystemExit) as exited:  # by the parser, before any work
            main(flags)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1, err
        assert err.strip().endswith(f"{message}; expected an integer >= 1"), err
