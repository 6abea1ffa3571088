"""Conversion at a chosen width (``intermediate_size`` below the source's, ``match_params``): every family,
the parameter count, the width-equal case bit for bit, the report against a re-measurement, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from hf_glu import convert_checkpoint
from hf_glu.cli import main
from hf_glu.convert import ConversionError
from hf_glu.convert.perplexity import perplexity
from hf_glu.convert.report import LayerStats, compare, mlp_weights, record_source
from hf_glu.convert.surgery import surgery_for
from hf_glu.convert.width import (
    ROUND_TO,
    glu_biases,
    glu_mlp_parameters,
    linear_layout,
    source_mlp_parameters,
    source_mlp_shape,
)
from hf_glu.glu import glu_activation

from helpers import FAMILY_CONFIGS, assert_reloads_without_hf_glu, exact_variant, tiny_gpt2, tiny_source

ALL = ["gpt2", *FAMILY_CONFIGS]
FAST = dict(eval_tokens=48, calibration_tokens=256)


def _source(model_type: str):
    return tiny_gpt2() if model_type == "gpt2" else tiny_source(model_type)


def _variant(model_type: str, source) -> str:
    return "geglu_tanh" if model_type == "gpt2" else exact_variant(model_type, source.config)


def _mlp_params(mlp: torch.nn.Module) -> int:
    return sum(p.numel() for p in mlp.parameters())


@pytest.fixture(scope="module")
def converted_all():
    """Every family's tiny source and its ``match_params`` conversion (the exact variant), made once."""
    out = {}
    for model_type in ALL:
        source = _source(model_type)
        before = {k: v.clone() for k, v in source.state_dict().items()}
        converted = convert_checkpoint(source, _variant(model_type, source), match_params=True, **FAST)
        out[model_type] = (source, before, converted)
    return out


@pytest.mark.parametrize("model_type", ALL)
def test_match_params_gives_every_family_the_source_mlp_parameter_count(model_type, converted_all):
    source, before, converted = converted_all[model_type]
    surgery = surgery_for(source.config.model_type)
    hidden, source_width = source_mlp_shape(surgery, source)
    report = converted.conversion_report
    width = report["intermediate_size"]
    assert width < source_width and width % ROUND_TO == 0

    mlps = surgery.glu_mlps(converted)
    for mlp in mlps:
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (width, hidden)
        assert mlp.down_proj.weight.shape == (hidden, width)
    # The count is the nearest a multiple of 8 allows: within half a step of 8 units of the source MLP's.
    per_layer_source = source_mlp_parameters(surgery, source) // len(mlps)
    per_layer = _mlp_params(mlps[0])
    per_unit = (glu_mlp_parameters(hidden, width + 1, glu_biases(converted.config)) - per_layer)
    assert per_layer == glu_mlp_parameters(hidden, width, glu_biases(converted.config))
    assert abs(per_layer - per_layer_source) <= ROUND_TO // 2 * per_unit
    if source_width == 48:  # the family configs' 48 units: 32 is the exact weight match, 3·H·32 = 2·H·48
        assert width == 32

    # The report's counts are the models' own.
    counts = report["parameters"]
    assert counts["converted"] == {"mlp": sum(map(_mlp_params, mlps)),
                                   "total": sum(p.numel() for p in converted.parameters())}  # fmt: skip
    assert counts["source"] == {"mlp": source_mlp_parameters(surgery, source),
                                "total": sum(p.numel() for p in source.parameters())}  # fmt: skip
    # Everything outside the MLP is the source's: the totals differ by the MLPs' difference alone.
    gained = counts["converted"]["mlp"] - counts["source"]["mlp"]
    assert counts["converted"]["total"] - counts["source"]["total"] == gained

    assert report["width"]["source_intermediate_size"] == source_width
    assert all(0 <= layer["calibration_mlp_relative_error"] < 1 for layer in report["layers"])
    assert all(0 <= layer["mlp_relative_error"] < 1 for layer in report["layers"])
    # The source instance was only read.
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())


def test_every_family_reloads_with_trust_remote_code_in_a_process_without_hf_glu(converted_all, tmp_path):
    assert_reloads_without_hf_glu({t: converted for t, (_, _, converted) in converted_all.items()}, tmp_path)


@pytest.mark.parametrize("model_type", ALL)
def test_the_source_width_is_todays_preserve_bit_for_bit(model_type):
    source = _source(model_type)
    variant = _variant(model_type, source)
    width = source_mlp_shape(surgery_for(source.config.model_type), source)[1]
    today = convert_checkpoint(source, variant, eval_tokens=16)
    same = convert_checkpoint(source, variant, intermediate_size=width, eval_tokens=16)
    assert today.state_dict().keys() == same.state_dict().keys()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in today.state_dict().items())
    assert "width" not in same.conversion_report


def test_a_width_above_the_source_is_refused_naming_it():
    with pytest.raises(ConversionError, match="larger than the source's MLP width 128.*<= 128"):
        convert_checkpoint(tiny_gpt2(), "swiglu", intermediate_size=136)


def _calibration_inputs(model, mlps, ids):
    """Each GLU MLP's input in ``model`` on ``ids``."""
    seen = [None] * len(mlps)
    hooks = [mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, mlp in enumerate(mlps)]  # fmt: skip
    try:
        with torch.no_grad():
            model.base_model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _remeasured(source, converted, input_ids, max_length, stride):
    """The fidelity report of ``converted`` against ``source``, both whole in memory, by the steps a conversion
    runs (record the source, measure each GLU MLP on the source's MLP inputs, compare the models)."""
    surgery = surgery_for(source.config.model_type)
    record = record_source(source, surgery, input_ids, max_length, stride)
    stats = [LayerStats(track_units=False) for _ in record.mlp_io]  # a width change keeps no unit-for-unit map
    for s, io, mlp in zip(stats, record.mlp_io, surgery.glu_mlps(converted), strict=True):
        s.measure(io, mlp_weights(mlp), mlp.variant.name, mlp.params)
    return compare(record, converted, stats, None)


@pytest.mark.parametrize("variant", ["geglu_tanh", "swiglu"])
def test_the_report_equals_a_remeasurement(variant):
    source = tiny_gpt2()
    converted = convert_checkpoint(source, variant, intermediate_size=64, eval_tokens=96, calibration_tokens=256)
    report = converted.conversion_report
    window = report["window"]
    eval_ids = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(0))  # no tokenizer: seed 0

    # Step-0 perplexity, both models, with the report's windows.
    for name, model in (("source", source), ("converted", converted)):
        ppl = perplexity(model, eval_ids, max_length=window["max_length"], stride=window["stride"])["perplexity"]
        assert ppl == pytest.approx(report["perplexity"][name], rel=1e-6)
    # Per-layer error on held-out text, the source's MLP inputs, measured again by the report's own steps.
    again = _remeasured(source, converted, eval_ids, window["max_length"], window["stride"])
    for layer, remeasured in zip(report["layers"], again["layers"], strict=True):
        assert layer["mlp_relative_error"] == pytest.approx(remeasured["mlp_relative_error"], rel=1e-6)

    # Per-layer error on calibration text: the converted model's own MLP inputs (each layer fed the converted
    # layers before it) through the source's dense MLP and the converted GLU MLP.
    calibration = torch.randint(0, 101, (1, 256), generator=torch.Generator().manual_seed(1)).reshape(4, 64)
    mlps = converted.base_model.h
    inputs = _calibration_inputs(converted, [block.mlp for block in mlps], calibration)
    for i, (x, block) in enumerate(zip(inputs, source.transformer.h, strict=True)):
        (w_in, b_in), (w_out, b_out) = linear_layout(block.mlp.c_fc), linear_layout(block.mlp.c_proj)
        expected = F.linear(block.mlp.act(F.linear(x, w_in, b_in)), w_out, b_out)
        with torch.no_grad():
            got = mlps[i].mlp(x)
        error = ((got - expected).norm() / expected.norm()).item()
        assert error == pytest.approx(report["layers"][i]["calibration_mlp_relative_error"], rel=1e-4)


def test_the_refit_beats_keeping_the_source_down_columns():
    """The ridge re-fit is what makes a reduced MLP faithful: dropping units and keeping the source's down
    columns (with their bias) is measurably worse on the same inputs."""
    source = tiny_gpt2()
    converted = convert_checkpoint(source, "geglu_tanh", intermediate_size=64, eval_tokens=96, calibration_tokens=512)
    block, glu = source.transformer.h[0].mlp, converted.base_model.h[0].mlp
    fresh = torch.randint(0, 101, (4, 64), generator=torch.Generator().manual_seed(3))  # not the calibration ids
    x = _calibration_inputs(source, [block], fresh)[0]
    with torch.no_grad():
        expected = block(x)
        refit = glu(x)
        kept = torch.isin(linear_layout(block.c_fc)[0], glu.gate_proj.weight).all(dim=1).nonzero().squeeze(1)
        assert len(kept) == 64
        w_out, b_out = linear_layout(block.c_proj)
        units = glu_activation(glu.gate_proj(x), glu.up_proj(x), "geglu_tanh")
        dropped = F.linear(units, w_out[:, kept], b_out)
    refit_error = (refit - expected).norm() / expected.norm()
    dropped_error = (dropped - expected).norm() / expected.norm()
    assert refit_error < 0.8 * dropped_error


def test_the_card_tells_the_width_the_counts_and_the_recovery_recipe(tmp_path):
    from hf_glu.convert import convert_to_folder

    source = tmp_path / "src"
    tiny_gpt2().save_pretrained(source)
    dst = tmp_path / "dst"
    conversion = convert_to_folder(source, dst, "swiglu", match_params=True, **FAST)
    card = (dst / "README.md").read_text()
    report = json.loads((dst / "conversion_report.json").read_text())
    assert report == json.loads(json.dumps(conversion.report))
    counts = report["parameters"]
    assert "## Width" in card and f"keeps {report['intermediate_size']} of the source's 128" in card
    assert f"| MLP (all layers) | {counts['source']['mlp']:,} | {counts['converted']['mlp']:,} |" in card
    assert f"--distill-from {source}" in card and f"--model {dst} " in card
    assert "down_proj` re-fitted" in card and "max unit error" not in card
    for layer in report["layers"]:
        assert f"| {layer['layer']} | {layer['calibration_mlp_relative_error']:.3g} |" in card


def test_the_cli_converts_at_equal_parameters_with_calibration_text(gpt2_folder, tmp_path, capsys):
    dst = tmp_path / "out"
    args = ["convert", str(gpt2_folder), str(dst), "--variant", "geglu_tanh", "--match-params",
            "--calibration-text", str(tmp_path / "text.txt"), "--calibration-tokens", "300", "--eval-tokens", "64"]
    assert main(args) == 0  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads((dst / "conversion_report.json").read_text())
    assert report["intermediate_size"] == 88 and report["width"]["chosen_by"] == "match_params"
    assert report["width"]["calibration"]["data"] == "user text"
    assert "width: 88 of the source's 128 units" in out


# (options after `convert SRC DST --variant swiglu`, expected fragment of the one-line error)
BAD_WIDTH_OPTIONS = [
    (["--match-params", "--intermediate-size", "64"], "--match-params picks --intermediate-size itself"),
    (["--match-params", "--calibration-tokens", "1"], "--calibration-tokens 1"),
    (["--match-params", "--calibration-text", "no-such-file.txt"], "--calibration-text 'no-such-file.txt'"),
    (["--calibration-text", "text.txt"], "--calibration-text is used by a width-reduced conversion only"),
    (["--init", "random", "--intermediate-size", "64", "--calibration-tokens", "99"], "--calibration-tokens is used"),
    (["--match-params", "--no-eval"], "--match-params cannot be used with --no-eval"),
    (["--intermediate-size", "64", "--calibration-tokens", "99", "--no-eval"], "--calibration-tokens cannot be"),
]


@pytest.mark.parametrize("options, message", BAD_WIDTH_OPTIONS, ids=[" ".join(o) for o, _ in BAD_WIDTH_OPTIONS])
def test_bad_width_options_are_refused_before_the_source_is_read(options, message, gpt2_folder, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    import hf_glu.convert.pipeline as pipeline
    import hf_glu.convert.stream as stream

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    monkeypatch.setattr(stream, "stream_convert", lambda *a, **k: pytest.fail("the source was streamed"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["convert", str(gpt2_folder), str(tmp_path / "out"), "--variant", "swiglu", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_width_above_the_source_ends_in_one_line_and_writes_nothing(gpt2_folder, tmp_path, capsys):
    capsys.readouterr()
    dst = tmp_path / "out"
    assert main(["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--intermediate-size", "200"]) == 2
    err = capsys.readouterr().err.strip()
    assert "larger than the source's MLP width 128" in err and "\n" not in err
    assert not dst.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"match_params": True, "intermediate_size": 64}, "pass one of them"),
        ({"match_params": "yes"}, "match_params='yes'"),
        ({"match_params": True, "calibration_tokens": 1}, "calibration_tokens=1"),
        ({"calibration_text": "some text"}, "calibration_text is used by a width-reduced"),
    ],
)
def test_bad_width_arguments_are_refused_before_the_source_is_read(kwargs, message, monkeypatch):
    import hf_glu.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tiny_gpt2(), "swiglu", **kwargs)
