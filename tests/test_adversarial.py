"""Hostile inputs, as an untrusted checkpoint or a careless command line would give them: each ends in one
line naming what is wrong and exit 2, leaves SRC and DST as they were and nothing beside them, and no
report or card ever carries a NaN as a number."""

import json
import math

import pytest
import torch
from test_convert import tiny_gpt2

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
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert _files(src) == before_src and _files(dst) == before_dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"], "debris left beside DST"
