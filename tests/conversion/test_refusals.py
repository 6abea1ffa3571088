"""Conversions refused before any work: hostile sources (as an untrusted checkpoint gives them), bad options and
variants (as a careless command line gives them), non-finite or overlapping weights, families or activations that
cannot convert as asked. Each ends in one line naming what is wrong and what is accepted, exit 2, no traceback,
with SRC, DST and everything beside them as they were."""

import json
import os
import re
import subprocess
import sys

import pytest

from hf_glu import convert_checkpoint
from hf_glu.cli import main
from hf_glu.convert import ConversionError

from helpers import ROUTES, damaged_copy, file_bytes, refused, run_cli, saved_family, tiny_gpt2, tiny_source


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
    before_src, before_dst = file_bytes(src), file_bytes(dst)
    capsys.readouterr()
    args = ["convert", str(src), str(dst), "--variant", "geglu_tanh" if family == "gpt2" else "geglu", "--force"]
    code = main([*args, "--no-eval"] if no_eval else [*args, "--eval-tokens", "16"])
    err = capsys.readouterr().err
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert len(ours) == 1 and re.search(message, ours[0]) and "Traceback" not in err, err
    assert file_bytes(src) == before_src and file_bytes(dst) == before_dst
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


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing-weights", "no weights in"),
        ("corrupt", "corrupt or unsafe"),
        ("shape", "has shape"),
        ("nan", "non-finite"),
        ("pickle", "corrupt or unsafe"),
        ("model-type", "model_type='llama' .* supported: gpt2"),
    ],
)
def test_bad_sources_exit_clearly_and_leave_dst_untouched(saved_gpt2, tmp_path, capsys, damage, message):
    src = damaged_copy(tmp_path, saved_gpt2, damage)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    before = file_bytes(dst)
    assert main(["convert", str(src), str(dst), "--variant", "swiglu", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert file_bytes(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")) == []


def test_bad_input_exits_non_zero_in_a_fresh_process(tmp_path):
    dst = tmp_path / "dst"
    result = run_cli(["convert", str(tmp_path / "nowhere"), str(dst), "--variant", "swiglu"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nowhere" in result.stderr
    assert not dst.exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["dst", "--variant", "relu"], "argument --variant: invalid choice: 'relu' (choose from 'bilinear', 'geglu'"),
        (["dst", "--variant", "swiglu", "--shard", "1GB"], "unrecognized arguments for convert: --shard 1GB; see"),
        (["dst", "--variant", "swiglu", "--eval-tokens", "x"], "argument --eval-tokens: invalid int value: 'x'"),
        ([], "the following arguments are required: dst, --variant"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(capsys, args, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "src", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and named in err, err


@pytest.mark.parametrize("offline", ["1", None])
def test_a_bad_variant_is_one_stderr_line_in_a_fresh_process(tmp_path, offline):
    """Nothing but our line: no usage block, and none of the `kernels` package's offline trust-check lines that
    importing Transformers' modeling modules prints."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    command = [sys.executable, "-c", "from hf_glu.cli import main; raise SystemExit(main())"]
    result = subprocess.run([*command, "convert", "src", "dst", "--variant", "nope"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "hf-glu convert: error: argument --variant: invalid choice: 'nope' (choose from 'bilinear', 'geglu', "
        "'geglu_tanh', 'glu', 'reglu', 'swiglu', 'swiglu_oai')"
    ]


def _poison(folder) -> None:
    """A NaN in one weight that the conversion carries over unchanged (not an MLP projection)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layernorm" in k and k.endswith("weight"))
    weights[name][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _share_offsets(folder) -> None:
    """Point one tensor's data_offsets at another's bytes (same shape): two names, one storage."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    same = [k for k, v in header.items() if k != "__metadata__" and "layernorm.weight" in k]
    header[same[1]]["data_offsets"] = header[same[0]]["data_offsets"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n :])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("damage, message", [(_poison, "non-finite"), (_share_offsets, "overlap")],
                         ids=["NaN weight", "shared data_offsets"])  # fmt: skip
def test_non_finite_weights_and_shared_offsets_are_refused_on_both_routes(damage, message, route, tmp_path, capsys):
    src = saved_family(tmp_path / "src")
    damage(src)
    dst = tmp_path / "new" / "deeper" / "out"  # its parents must not be left behind either
    refused(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]], tmp_path, capsys, message,
             "model.safetensors" if message == "overlap" else "expected finite")  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_bloom_slow_but_exact_is_refused_not_called_exact(route, tmp_path, capsys):
    src = saved_family(tmp_path / "src", "bloom", pretraining_tp=2, slow_but_exact=True)
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu_tanh", *ROUTES[route]]
    refused(args, tmp_path, capsys, "slow_but_exact", "pretraining_tp=2")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", [5, "GPTNeoXForCausalLM", [7]], ids=["int", "str", "[int]"])
def test_architectures_not_a_list_of_names_is_refused(value, route, tmp_path, capsys):
    src = saved_family(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": value}))
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    refused(args, tmp_path, capsys, "architectures", "expected a list")


def test_an_unsupported_activation_names_the_family_field(tmp_path, capsys):
    src = saved_family(tmp_path / "src", hidden_act="tanh")
    for route in ROUTES.values():
        message = refused(["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *route], tmp_path, capsys,
                           "hidden_act='tanh'")  # fmt: skip
        assert "activation_function" not in message
