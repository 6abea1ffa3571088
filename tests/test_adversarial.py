"""Hostile inputs, as an untrusted checkpoint or a careless command line would give them: each ends in one
line naming what is wrong and exit 2, leaves SRC and DST as they were and nothing beside them, and no
report or card ever carries a NaN as a number."""

import json
import math
import re

import pytest
import torch
import transformers
from conftest import tiny_gpt2

from hf_glu import convert_checkpoint
from hf_glu.cli import main
from hf_glu.convert import ConversionError


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


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (n - len(encoded)) if len(encoded) <= n else b""
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n :])


def _first_2d_entry(header):
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2
                and v["shape"][0] != v["shape"][1])  # fmt: skip


def _transpose_first_2d(header):
    entry = header[_first_2d_entry(header)]
    entry["shape"] = entry["shape"][::-1]


def _first_float_entry(header):
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")


# (name, family, damage(src folder), expected fragment of the one-line error)
HOSTILE_SOURCES = [
    ("index path escapes with ../", "gpt2",
     lambda d: _edit_json(d / "model.safetensors.index.json",
                          lambda j: j["weight_map"].update({next(iter(j["weight_map"])): "../outside.safetensors"})),
     "outside the checkpoint folder"),
    ("index path is absolute", "gpt_neox",
     lambda d: _edit_json(d / "model.safetensors.index.json",
                          lambda j: j["weight_map"].update({next(iter(j["weight_map"])): "/etc/hostname"})),
     "outside the checkpoint folder"),
    ("index weight_map is a list", "gpt2",
     lambda d: _edit_json(d / "model.safetensors.index.json", lambda j: j.update(weight_map=[1, 2])), "is corrupt"),
    ("config is a JSON list", "gpt2", lambda d: (d / "config.json").write_text("[1, 2]"), "model_type=None"),
    ("negative vocab size", "gpt2", lambda d: _edit_json(d / "config.json", lambda j: j.update(vocab_size=-5)),
     "vocab_size"),
    ("zero heads", "gpt2", lambda d: _edit_json(d / "config.json", lambda j: j.update(n_head=0)), "n_head"),
    ("unknown model type", "gpt2", lambda d: _edit_json(d / "config.json", lambda j: j.update(model_type="llama")),
     "model_type='llama'"),
    ("truncated shard", "gpt2", lambda d: _first_shard(d).write_bytes(_first_shard(d).read_bytes()[:-100]),
     "corrupt"),
    ("header longer than the file", "gpt2",
     lambda d: _first_shard(d).write_bytes((10**9).to_bytes(8, "little") + _first_shard(d).read_bytes()[8:]),
     "corrupt"),
    ("integer weights", "gpt2",
     lambda d: _rewrite_header(_first_shard(d), lambda h: h[_first_float_entry(h)].update(dtype="I32")), "dtype"),
    ("weight shape transposed", "gpt2", lambda d: _rewrite_header(_first_shard(d), _transpose_first_2d), "shape"),
    ("family weight shape transposed", "gpt_neox", lambda d: _rewrite_header(_first_shard(d), _transpose_first_2d),
     "shape|size"),
    ("family shard truncated", "gpt_neox",
     lambda d: _first_shard(d).write_bytes(_first_shard(d).read_bytes()[:-100]), "corrupt"),
]  # fmt: skip


@pytest.fixture
def sharded_sources(tmp_path):
    from families import tiny_source

    def make(family):
        folder = tmp_path / "src"
        model = tiny_gpt2() if family == "gpt2" else tiny_source(family)
        model.save_pretrained(folder, max_shard_size="40KB")
        return folder

    return make


@pytest.mark.parametrize("name, family, damage, message", HOSTILE_SOURCES, ids=[c[0] for c in HOSTILE_SOURCES])
@pytest.mark.parametrize("no_eval", [False, True], ids=["in-memory", "streamed"])
def test_hostile_sources_fail_in_one_line_and_touch_nothing(name, family, damage, message, no_eval, sharded_sources,
                                                            tmp_path, capsys):  # fmt: skip
    if no_eval and family == "gpt2":
        pytest.skip("--no-eval streams the other families only")
    src = sharded_sources(family)
    damage(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("an earlier conversion")
    before_src, before_dst = _files(src), _files(dst)
    capsys.readouterr()
    args = ["convert", str(src), str(dst), "--variant", "geglu_tanh" if family == "gpt2" else "geglu", "--force"]
    code = main([*args, "--no-eval"] if no_eval else [*args, "--eval-tokens", "16"])
    err = capsys.readouterr().err
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert len(ours) == 1 and re.search(message, ours[0]) and "Traceback" not in err, err
    assert _files(src) == before_src and _files(dst) == before_dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"], "debris left beside DST"


# (options after `convert SRC DST --variant swiglu`, expected fragment of the one-line error)
BAD_CONVERT_OPTIONS = [
    (["--intermediate-size", "0", "--init", "random"], "--intermediate-size 0"),
    (["--intermediate-size", "-3", "--init", "random"], "--intermediate-size -3"),
    (["--eval-tokens", "0"], "--eval-tokens 0"),
    (["--eval-tokens", "1"], "--eval-tokens 1"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
    (["--max-shard-size=-1GB"], "--max-shard-size '-1GB'"),
    (["--eval-text", "no-such-file.txt"], "--eval-text 'no-such-file.txt'"),
]


@pytest.mark.parametrize("options, message", BAD_CONVERT_OPTIONS, ids=[" ".join(o) for o, _ in BAD_CONVERT_OPTIONS])
def test_bad_convert_options_are_refused_before_any_work(options, message, gpt2_folder, tmp_path, capsys, monkeypatch):
    import hf_glu.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    capsys.readouterr()
    assert main(["convert", str(gpt2_folder), str(tmp_path / "out"), "--variant", "swiglu", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_empty_source_is_refused(tmp_path, capsys):
    assert main(["convert", "", str(tmp_path / "out"), "--variant", "swiglu"]) == 2
    assert "SRC is empty" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="is empty"):
        convert_checkpoint("  ", "swiglu")


def test_eval_text_without_a_tokenizer_is_refused(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "src")
    with pytest.raises(ConversionError, match="no tokenizer"):
        convert_checkpoint(tmp_path / "src", "swiglu", eval_text="some words to score")


BAD_EVAL = [
    (["--stride", "0"], "--stride 0"),
    (["--max-tokens", "-5"], "--max-tokens -5"),
    (["--max-length", "1"], "--max-length 1"),
    (["--max-length", "4096"], "exceeds the model's 64 positions"),
    (["--max-length", "16", "--stride", "32"], "--stride 32 exceeds the window"),
]


@pytest.mark.parametrize("options, message", BAD_EVAL, ids=[" ".join(o) for o, _ in BAD_EVAL])
def test_bad_eval_options_end_in_one_line(options, message, gpt2_folder, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    capsys.readouterr()
    assert main(["eval", str(gpt2_folder), "--text-file", str(tmp_path / "text.txt"), *options]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert len(ours) == 1 and message in ours[0] and "Traceback" not in err


def test_eval_refuses_a_tokenizer_larger_than_the_vocabulary(gpt2_folder, tmp_path, capsys):
    config = json.loads((gpt2_folder / "config.json").read_text())
    weights = gpt2_folder / "model.safetensors"
    small = tiny_gpt2(vocab_size=50)
    small.save_pretrained(gpt2_folder)
    assert json.loads((gpt2_folder / "config.json").read_text())["vocab_size"] == 50 != config["vocab_size"]
    capsys.readouterr()
    assert main(["eval", str(gpt2_folder), "--text-file", str(tmp_path / "text.txt")]) == 2
    assert "beyond the model's vocabulary of 50" in capsys.readouterr().err
    assert weights.is_file()


def test_eval_refuses_truncated_weights_in_one_line(gpt2_folder, tmp_path, capsys):
    weights = gpt2_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["eval", str(gpt2_folder), "--text-file", str(tmp_path / "text.txt")]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]
    assert len(ours) == 1 and "cannot be loaded" in ours[0] and "Traceback" not in err


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
