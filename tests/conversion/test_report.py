"""The fidelity report never lies: a converted model whose outputs are not finite where the source's are is an error
and nothing is written; a source that overflows itself gets a report without figures; maxima keep NaN; the fidelity
pass holds bounded memory whatever the token count."""

import json
import math

import pytest
import torch

from hf_glu import convert_checkpoint
from hf_glu.cli import main
from hf_glu.convert import ConversionError

from helpers import tiny_gpt2


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _overflowing_in_float16():
    """Finite in fp32, but its logits exceed float16's range (65504)."""
    source = tiny_gpt2()
    with torch.no_grad():
        source.transformer.ln_f.weight.fill_(3e4)
    return source


def test_float16_overflow_is_an_error_not_a_report_of_zero():
    with pytest.raises(ConversionError, match="not finite.*float16"):
        convert_checkpoint(_overflowing_in_float16(), "geglu_tanh", torch_dtype="float16", eval_tokens=32)


def test_float16_overflow_from_the_cli_writes_nothing(tmp_path, capsys):
    _overflowing_in_float16().save_pretrained(tmp_path / "src")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", "geglu_tanh",
                 "--dtype", "float16", "--eval-tokens", "32"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_source_whose_own_outputs_overflow_gets_a_strict_report_without_figures(tmp_path):
    source = tiny_gpt2()
    with torch.no_grad():
        source.transformer.ln_f.weight.fill_(3e38)  # the logits overflow fp32 already
    source.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", "geglu_tanh",
                 "--eval-tokens", "32"]) == 0  # fmt: skip
    report = _strict_json((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["evaluation"].startswith("not measured: the source's own logits are not finite")
    assert report["max_abs_output_diff"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Not measured.**" in card and "| nan" not in card.lower() and "| inf" not in card.lower()


def test_report_maxima_do_not_drop_nan():
    from hf_glu.convert.report import _worst

    assert math.isnan(_worst(0.0, math.nan)) and math.isnan(_worst(math.nan, 1.0)) and _worst(1.0, 2.0) == 2.0


def test_a_report_still_holding_a_nan_stops_the_write_instead_of_hiding_it(tmp_path):
    # The report replaces what it could not measure with null and says why; a NaN left over is a bug, and a
    # checkpoint whose report says null where the card says nan would hide it.
    from hf_glu.convert.pipeline import write_report_and_card

    with pytest.raises(ValueError, match="Out of range float"):
        write_report_and_card({"max_abs_output_diff": math.nan}, tmp_path, "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("head", ["lm", "base"])
def test_the_fidelity_pass_memory_is_bounded_and_the_figures_unchanged(monkeypatch, head):
    from transformers import GPT2Model

    import hf_glu.convert.report as report_module

    def make():
        torch.manual_seed(0)  # the same source each time
        return tiny_gpt2() if head == "lm" else tiny_gpt2(GPT2Model)

    in_memory = convert_checkpoint(make(), "swiglu", eval_tokens=200).conversion_report
    monkeypatch.setattr(report_module, "_OUTPUTS_IN_MEMORY", 0)  # every window's output waits on disk
    spilled = []
    real_append = report_module.WindowStore.append
    monkeypatch.setattr(report_module.WindowStore, "append",
                        lambda self, t: real_append(self, t) or spilled.append(self.spilled))  # fmt: skip
    on_disk = convert_checkpoint(make(), "swiglu", eval_tokens=200).conversion_report
    assert spilled and spilled[-1] == len(spilled) > 1
    assert on_disk == in_memory

    monkeypatch.setattr(report_module, "MLP_STATS_TOKENS", 20)
    capped = convert_checkpoint(make(), "swiglu", eval_tokens=200).conversion_report
    assert capped["mlp_stats_tokens"] == 20 and in_memory["mlp_stats_tokens"] >= 200  # windows overlap
    assert capped["max_abs_output_diff"] == in_memory["max_abs_output_diff"]  # whole-model figures: every token
    assert all(math.isfinite(layer["mlp_relative_error"]) for layer in capped["layers"])
