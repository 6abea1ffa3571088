"""``benchmarks/quality.py --quick``: every variant, init scheme and ablation arm appears, every number is finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from hf_glu import VARIANTS

from helpers import REPO

ABLATION_ARMS = {"ReLU", "GELU", "Swish", "GLU", "Bilinear", "ReGLU", "GEGLU", "SwiGLU"}


def _numbers(value: object, path: str = ""):
    """Every number in a JSON value, with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_quick_mode_reports_every_arm_with_finite_numbers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "quality.json").read_text())
    study = results["conversion"]
    assert set(study["step0"]) == set(VARIANTS)
    for variant in VARIANTS:
        assert set(study["step0"][variant]) == {"preserve", "random"}
        assert len(study["step0"][variant]["random"]) == len(results["settings"]["seeds"])
        for arm in ("preserve", "preserve+kd", "random"):
            assert f"{variant}/{arm}" in study["finetune"]
    assert {"base", "base+kd"} <= set(study["finetune"])
    assert set(results["ablation"]) == ABLATION_ARMS

    numbers = list(_numbers(results))
    assert len(numbers) > 100
    assert [path for path, value in numbers if not math.isfinite(value)] == []

    # GPT-2's gelu_new makes geglu_tanh's preserve scheme exact: the step-0 goal holds at any size.
    geglu_tanh = study["step0"]["geglu_tanh"]["preserve"]
    assert geglu_tanh["exact_scheme"] and geglu_tanh["max_abs_logit_diff"] <= 1e-4

    table = (tmp_path / "quality.md").read_text()
    assert all(f"| {variant} | preserve |" in table for variant in VARIANTS)
    assert all(f"| {name} |" in table for name in ABLATION_ARMS)
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_runs_never_write_over_the_recorded_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality  # its dataclasses look their module up
    try:
        spec.loader.exec_module(quality)
    finally:
        del sys.modules["quality"]
    recorded = (REPO / "benchmarks" / "results").resolve()
    assert quality.default_out(quick=False) == recorded
    quick = quality.default_out(quick=True)
    assert recorded not in quick.parents and quick != recorded
    assert quick.parent.name == "bench_results"  # git-ignored
