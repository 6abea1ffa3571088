"""`hf-glu convert --max-memory`: the streamed conversion's fidelity report, measured layer by layer.

The report must be the in-memory route's (same figures on the same source), and the pass must hold one
module's weights at a time, whatever the model's size.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_glu.cli import main
from hf_glu.convert import layerwise
from hf_glu.convert.pipeline import convert_to_folder

from helpers import exact_variant, refused, tiny_source

# One family per position scheme: rotary (GPT-NeoX partial, Phi partial with q/k norms), ALiBi (BLOOM),
# learned absolute positions with projected embeddings and an inline MLP (OPT).
FAMILIES_BY_POSITIONS = ("gpt_neox", "phi", "bloom", "opt")


def _figures(report: dict) -> list[float]:
    """What the fidelity report measures, flattened in a fixed order."""
    figures = [report["max_abs_logit_diff"], report["max_mlp_relative_error"], report["perplexity"]["source"],
               report["perplexity"]["converted"], report["perplexity"]["scored_tokens"]]  # fmt: skip
    for layer in report["layers"]:
        figures += [layer["mlp_relative_error"], layer["max_unit_error"]]
    return figures


@pytest.mark.parametrize("model_type", FAMILIES_BY_POSITIONS)
def test_layerwise_report_equals_the_in_memory_report(model_type, tmp_path):
    source = tiny_source(model_type)
    # Sharded, so the pass reads a tensor's module from whichever file holds it.
    source.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    # swiglu approximates the source's activation: every figure is non-zero, so equal figures mean something.
    in_memory = convert_to_folder(str(tmp_path / "src"), tmp_path / "a", "swiglu", eval_tokens=48).report
    layered = layerwise.stream_convert_measured(str(tmp_path / "src"), tmp_path / "b", "swiglu", "1MB", eval_tokens=48)
    assert in_memory["max_abs_logit_diff"] > 1e-3 and in_memory["max_mlp_relative_error"] > 1e-4
    assert _figures(layered) == pytest.approx(_figures(in_memory), rel=1e-5, abs=1e-7)
    for key in ("eval_tokens", "window", "compared_output", "mlp_stats_tokens", "eval_data"):
        assert layered[key] == in_memory[key], key
    assert [layer["unit_map"] for layer in layered["layers"]] == [layer["unit_map"] for layer in in_memory["layers"]]
    assert "evaluation" not in layered
    assert json.loads((tmp_path / "b" / "conversion_report.json").read_text()) == json.loads(json.dumps(layered))


def test_max_memory_cli_writes_the_exact_variants_measured_report_and_card(tmp_path, capsys):
    source = tiny_source("gpt_neox")
    source.save_pretrained(tmp_path / "src")
    variant = exact_variant("gpt_neox", source.config)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", variant, "--max-memory",
                 "1MB", "--eval-tokens", "32"]) == 0  # fmt: skip
    assert "max |Δ logits| = 0 (measured layer by layer)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["max_abs_logit_diff"] == 0.0 and report["eval_tokens"] == 32
    assert math.isfinite(report["perplexity"]["source"]) and report["perplexity"]["ratio"] == 1.0
    assert "layer by layer" in report["fidelity_pass"] and "evaluation" not in report
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| max \\|Δ logits\\| | 0 |" in card and "not measured" not in card


def test_layerwise_pass_holds_one_module_at_a_time(tmp_path, monkeypatch):
    """At every weight read, what both models hold materialised is at most the largest module's weights."""
    tiny_source("gpt_neox").save_pretrained(tmp_path / "src")
    models: list[torch.nn.Module] = []
    held: list[int] = []

    def materialised() -> int:
        tensors = {p.data_ptr(): p.numel() * p.element_size() for m in models for p in m.parameters() if not p.is_meta}
        return sum(tensors.values())

    build, read = layerwise.offloaded, layerwise.FileWeights.__getitem__

    def offloaded(*args, **kwargs):
        model, tensors = build(*args, **kwargs)
        models.append(model)
        return model, tensors

    def counted_read(self, name):
        held.append(materialised())
        return read(self, name)

    monkeypatch.setattr(layerwise, "offloaded", offloaded)
    monkeypatch.setattr(layerwise.FileWeights, "__getitem__", counted_read)
    layerwise.stream_convert_measured(str(tmp_path / "src"), tmp_path / "out", "geglu", "1MB", eval_tokens=32)
    assert len(models) == 2 and len(held) > 50  # both models ran, module by module
    largest = max(layerwise.largest_module_bytes(m, torch.float32)[1] for m in models)
    whole = sum(p.numel() * 4 for p in models[1].parameters())
    assert whole > 5 * largest  # so the bound below is far from holding the model
    assert max(held) <= largest and materialised() == 0


def test_max_memory_refusals_are_one_line_and_touch_nothing(tmp_path, capsys):
    tiny_source("gpt_neox").save_pretrained(tmp_path / "src")
    src, dst = str(tmp_path / "src"), str(tmp_path / "out")
    base = ["convert", src, dst, "--variant", "geglu"]
    refused([*base, "--max-memory", "lots"], tmp_path, capsys, "--max-memory 'lots' is invalid", "500MB or 4GB")
    refused([*base, "--max-memory", "0"], tmp_path, capsys, "--max-memory '0' is invalid")
    refused([*base, "--max-memory", "1MB", "--no-eval"], tmp_path, capsys, "pass one of them, not both")
    refused([*base, "--max-memory", "1MB", "--dtype", "float32"], tmp_path, capsys, "--dtype cannot be used")
    refused([*base, "--max-memory", "1KB"], tmp_path, capsys, "largest module (gpt_neox.embed_in)", "expected at least")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    gpt2 = ["convert", str(tmp_path / "gpt2"), dst, "--variant", "geglu"]
    refused([*gpt2, "--max-memory", "1MB"], tmp_path, capsys, "model_type='gpt2'", "convert GPT-2 without it")
    refused([*gpt2, "--no-eval"], tmp_path, capsys, "model_type='gpt2'", "convert GPT-2 without --no-eval")
