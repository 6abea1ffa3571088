"""The pure-python parts of tests/serving/check_vllm.py (`make test-vllm`), which runs only in vLLM's own venv.

These hold in CI without vLLM: what the check expects to be fused, how it reads vLLM's prompt log-probs and
counts fused modules, and that its tiny sources stay servable by vLLM's CPU attention (head_dim >= 32).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hf_glu

_PATH = Path(__file__).parent / "check_vllm.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_vllm", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_vllm"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["check_vllm"]


def test_fusion_expected_exactly_where_vllm_has_a_kernel(check):
    assert check.FUSED_VARIANTS <= set(hf_glu.VARIANTS)
    fused = {variant for variant in hf_glu.VARIANTS if check.expect_fused(variant)}
    assert fused == {"swiglu", "geglu", "geglu_tanh"}
    # SiLU is nn.SiLU only with beta = 1; any other beta is a class vLLM does not map.
    assert not check.expect_fused("swiglu", beta=1.702)
    assert check.expect_fused("geglu", beta=1.702)  # beta is swiglu's parameter only


def test_served_logprobs_read_per_prompt_token(check):
    ids = [5, 7, 9]
    entry = lambda token, value: {token: SimpleNamespace(logprob=value), 0: SimpleNamespace(logprob=-99.0)}  # noqa: E731
    assert check.token_logprobs_from_vllm([None, entry(7, -1.5), entry(9, -0.25)], ids) == [-1.5, -0.25]
    with pytest.raises(ValueError, match="token 9 at position 2"):
        check.token_logprobs_from_vllm([None, entry(7, -1.5), entry(8, -0.25)], ids)


def test_reference_logprobs_are_next_token_log_softmax(check):
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    ids = [1, 3, 0, 5]
    got = check.token_logprobs_from_logits(logits, ids)
    want = [torch.log_softmax(logits[i].double(), -1)[ids[i + 1]].item() for i in range(3)]
    assert got == pytest.approx(want, abs=1e-12)


def test_max_abs_diff_fails_closed(check):
    assert check.max_abs_diff([[0.0, -1.0]], [[1e-5, -1.0]]) == pytest.approx(1e-5)
    assert check.max_abs_diff([[0.0, -1.0]], [[0.0]]) == math.inf  # a missing position is no agreement
    assert check.max_abs_diff([[0.0]], [[math.nan]]) == math.inf
    with pytest.raises(ValueError):
        check.max_abs_diff([[0.0], [0.0]], [[0.0]])  # a missing prompt


def test_fused_only_when_every_layer_merged_and_an_and_mul_runs(check):
    MergedColumnParallelLinear = type("MergedColumnParallelLinear", (nn.Linear,), {})  # noqa: N806
    SiluAndMul = type("SiluAndMul", (nn.Module,), {})  # noqa: N806

    def model(merged: int, act: bool) -> nn.Module:
        layers = [nn.Sequential(MergedColumnParallelLinear(2, 4), *([SiluAndMul()] if act else [])) for _ in range(2)]
        return nn.Sequential(*layers[:merged], *[nn.Linear(2, 2)] * (2 - merged))

    assert check.summarize_mlps(model(2, True)) == check.MlpSummary(2, ("SiluAndMul",))
    assert check.summarize_mlps(model(2, True)).fused(layers=2)
    assert not check.summarize_mlps(model(1, True)).fused(layers=2)
    assert not check.summarize_mlps(model(2, False)).fused(layers=2)


def test_summary_line_is_the_closing_line_ci_reads(check):
    rows = [check.Row("gpt2", "swiglu", True, "", 1.0), check.Row("opt", "glu", False, "", 1.0)]
    assert check.summary_line(rows) == "1 passed, 1 failed"


def test_default_families_are_built_with_a_head_dim_vllm_cpu_serves(check):
    args = check.parse_args([])
    configs = check._source_configs()
    defaults = [*args.families.split(","), *args.also.split(","), *args.refuse.split(",")]
    assert {"gpt2", "gpt_neox", "opt", "gpt_neo"} <= set(defaults)  # served ones and one vLLM must refuse
    for family in defaults:
        config = configs[family]()
        assert config.hidden_size // config.num_attention_heads >= 32, family


def test_only_vllms_own_refusal_counts_as_a_clean_refusal(check):
    own = ValueError(
        "1 validation error for ModelConfig\n  Value error, The Transformers implementation of"
        " 'GluGPTNeoForCausalLM' is not compatible with vLLM. [type=value_error]"
    )
    assert check.refusal_message(own).startswith("Value error, The Transformers implementation")
    assert check.refusal_message(KeyError("vllm")) is None  # a crash inside the model's own code
    assert check.refusal_message(ValueError("Available memory on node 0 ...")) is None
