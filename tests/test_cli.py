"""`hf-glu convert` / `hf-glu eval`: the round trip in fresh processes, the card, and every bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BLOCK_HF_GLU, tiny_gpt2
from transformers import AutoModelForCausalLM

from hf_glu import convert_gpt2
from hf_glu.cli import main
from hf_glu.data import builtin_corpus, train_bpe_tokenizer

IDS = [[5, 17, 99, 3, 42, 8, 250, 11, 64, 7]]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A saved tiny GPT2LMHeadModel with its own tokenizer and generation config."""
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = train_bpe_tokenizer(builtin_corpus(20_000), vocab_size=300)
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), spread=0.1)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run(args: list[str], tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-c", prelude + "from hf_glu.cli import main; raise SystemExit(main())", *args]
    if prelude and not args:
        command = [sys.executable, "-c", prelude]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_in_fresh_processes(gpt2_folder, tmp_path):
    dst = tmp_path / "glu-model"
    result = _run(["convert", str(gpt2_folder), str(dst), "--variant", "geglu_tanh"], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = convert_gpt2(str(gpt2_folder), "geglu_tanh")(torch.tensor(IDS)).logits

    # Installed: the Auto classes know the GLU model because hf_glu is imported.
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    torch.testing.assert_close(loaded(torch.tensor(IDS)).logits, expected, atol=1e-6, rtol=0)
    assert loaded.generation_config.max_new_tokens == 7

    # Without hf_glu: the checkpoint's own code, through trust_remote_code.
    script = BLOCK_HF_GLU + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(dst)!r})
        torch.save(model(torch.tensor({IDS})).logits, "logits.pt")
        """
    )
    result = _run([], tmp_path, prelude=script)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=0)

    # The card's YAML parses and carries the report's numbers.
    report = json.loads((dst / "conversion_report.json").read_text())
    header = (dst / "README.md").read_text().split("---")[1]
    metadata = yaml.safe_load(header)
    assert metadata["library_name"] == "transformers" and "geglu_tanh" in metadata["tags"]
    assert metadata["pipeline_tag"] == "text-generation"
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == round(report["perplexity"]["converted"], 4)
    assert metrics[1]["value"] == round(report["perplexity"]["source"], 4)
    assert report["max_abs_logit_diff"] < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".glu-model")]  # no temp folder left


def test_eval_reports_sliding_window_perplexity(gpt2_folder, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(builtin_corpus(6_000))
    assert (
        main(
            [
                "eval",
                str(gpt2_folder),
                "--text-file",
                str(text),
                "--max-length",
                "32",
                "--stride",
                "16",
                "--max-tokens",
                "200",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["max_length"] == 32 and result["stride"] == 16 and result["perplexity"] > 1


def test_eval_text_and_sharding_options(gpt2_folder, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(builtin_corpus(3_000))
    dst = tmp_path / "out"
    args = ["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--eval-text", str(text)]
    assert main([*args, "--max-shard-size", "20KB", "--eval-tokens", "64"]) == 0
    assert (dst / "model.safetensors.index.json").is_file()
    assert json.loads((dst / "conversion_report.json").read_text())["eval_data"] == "user text"
    assert AutoModelForCausalLM.from_pretrained(dst).config.glu_variant == "swiglu"


def _bad_folder(tmp_path: Path, gpt2_folder: Path, damage: str) -> Path:
    folder = tmp_path / f"bad-{damage}"
    folder.mkdir()
    for p in gpt2_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    weights = folder / "model.safetensors"
    if damage == "missing-weights":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage in ("shape", "nan", "bin", "pickle"):
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
        if damage == "shape":
            state[key] = state[key][:, :-1].contiguous()
        if damage == "nan":
            state[key][0, 0] = float("inf")
        save_file(state, weights)
        if damage in ("bin", "pickle"):
            weights.unlink()
            payload = state if damage == "bin" else {"x": os.system}  # a pickle that would call code
            torch.save(payload, folder / "pytorch_model.bin")
    elif damage == "model-type":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(config))
    return folder


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
def test_bad_sources_exit_clearly_and_leave_dst_untouched(gpt2_folder, tmp_path, capsys, damage, message):
    src = _bad_folder(tmp_path, gpt2_folder, damage)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    before = _snapshot(dst)
    assert main(["convert", str(src), str(dst), "--variant", "swiglu", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert _snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")) == []


def test_legacy_bin_weights_load_with_weights_only(gpt2_folder, tmp_path):
    src = _bad_folder(tmp_path, gpt2_folder, "bin")
    converted = convert_gpt2(str(src), "geglu_tanh", eval_tokens=16)
    assert converted.conversion_report["max_abs_logit_diff"] < 1e-5


def test_non_empty_dst_is_refused_without_force(gpt2_folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert main(["convert", str(gpt2_folder), str(dst), "--variant", "swiglu"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _snapshot(dst) == {"keep.txt": b"precious"}
    assert main(["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_failure_midway_leaves_dst_as_it_was(gpt2_folder, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")

    def broken_card(*args, **kwargs):  # fails after the weights and tokenizer are written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("hf_glu.convert.pipeline.render_conversion_card", broken_card)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--force"])
    assert _snapshot(dst) == {"keep.txt": b"precious"}
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_bad_input_exits_non_zero_in_a_fresh_process(tmp_path):
    dst = tmp_path / "dst"
    result = _run(["convert", str(tmp_path / "nowhere"), str(dst), "--variant", "swiglu"], tmp_path)
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


def test_a_disk_source_is_consumed_block_by_block_without_changing_the_result(gpt2_folder):
    from hf_glu.convert.gpt2 import convert_config, convert_weights
    from hf_glu.convert.init_schemes import fit_unit_map
    from hf_glu.convert.source import load_source

    source = load_source(gpt2_folder).model
    config = convert_config(source, "geglu_tanh", "preserve", None)
    maps = [fit_unit_map("geglu_tanh", "gelu_new", config.glu_params)] * config.n_layer
    expected = convert_weights(source, config, maps)  # copies: the source stays whole
    assert all(any(True for _ in block.parameters()) for block in source.transformer.h)
    ln_1 = source.transformer.h[0].ln_1.weight
    whole_blocks = []
    got = convert_weights(
        source,
        config,
        maps,
        share=True,
        layer_done=lambda i, block, layer: whole_blocks.append(
            sum(any(True for _ in b.parameters()) for b in source.transformer.h)
        ),
    )
    assert whole_blocks == list(range(config.n_layer, 0, -1))  # each block dropped once converted
    assert not any(True for _ in source.transformer.h.parameters())
    assert got["transformer.h.0.ln_1.weight"].data_ptr() == ln_1.data_ptr()  # shared, not copied
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # The whole conversion from the folder gives the same weights as the in-memory mapping.
    from_disk = convert_gpt2(str(gpt2_folder), "geglu_tanh", eval_tokens=32).state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(from_disk[key], tensor, rtol=0, atol=0)
    assert from_disk["transformer.h.1.mlp.up_proj.bias"].eq(1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_reader_matches_the_library(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from hf_glu.convert.source import _read_safetensors

    tensors = {"a": torch.randn(7, 5).to(dtype), "b": torch.arange(6), "c": torch.tensor(3.0), "d": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "w.safetensors")
    got, want = _read_safetensors(tmp_path / "w.safetensors"), load_file(tmp_path / "w.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        assert got[key].untyped_storage().data_ptr() != got["a"].untyped_storage().data_ptr() or key == "a"


# --- Real inputs (issue #23): eval's position limit, its text reader, and the errors naming the file ---


def _one_line_error(err: str, *needles: str) -> None:
    """One error line naming ``needles`` (Transformers' loading progress bars may come before it), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("hf-glu ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture(scope="module")
def mpt_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny MPT (its limit is max_seq_len=64, no max_position_embeddings) and its GLU conversion."""
    from families import tiny_source

    from hf_glu.convert.pipeline import convert_to_folder

    root = tmp_path_factory.mktemp("mpt")
    tokenizer = train_bpe_tokenizer(builtin_corpus(20_000), vocab_size=300)
    source = tiny_source("mpt", vocab_size=len(tokenizer))
    source.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    convert_to_folder(str(root / "source"), root / "converted", "geglu", eval_tokens=16)
    return root / "source", root / "converted"


@pytest.mark.parametrize("which", ["source", "converted"])
def test_eval_windows_fit_the_max_seq_len_of_an_mpt(mpt_folders, tmp_path, capsys, which):
    """MPT states its length in max_seq_len: eval's default window must fit it (it read max_position_embeddings
    only, took 1024 tokens and crashed), and a longer --max-length is refused naming the limit."""
    folder = mpt_folders[0 if which == "source" else 1]
    text = tmp_path / "eval.txt"
    text.write_text(builtin_corpus(4_000))
    assert main(["eval", str(folder), "--text-file", str(text), "--max-tokens", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_length"] == 64 and result["tokens"] == 299
    assert main(["eval", str(folder), "--text-file", str(text), "--max-length", "65"]) == 2
    _one_line_error(capsys.readouterr().err, "--max-length 65", "64 positions")


def test_max_positions_reads_each_family_s_own_field():
    import transformers as tf
    from families import FAMILY_CONFIGS

    from hf_glu.positions import max_positions

    assert max_positions(tf.GPT2Config(n_positions=77)) == 77
    assert max_positions(tf.MptConfig(max_seq_len=99)) == 99
    assert max_positions(tf.BloomConfig()) is None  # ALiBi: no limit stated
    assert max_positions(tf.PretrainedConfig(seq_length=123)) == 123
    for model_type, make in FAMILY_CONFIGS.items():
        limit = max_positions(make())
        assert limit == (None if model_type == "bloom" else 64), model_type


def _tokenizer_folder(gpt2_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_folder)


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 16])
def test_token_prefix_read_in_chunks_equals_the_whole_file_tokenized(gpt2_folder, tmp_path, chunk_bytes):
    """Read chunk by chunk, the first N tokens are exactly those of the whole file tokenized at once, whatever
    the chunk boundaries (mid-word, mid-whitespace run, mid multi-byte character)."""
    from hf_glu.data import read_token_prefix

    tokenizer = _tokenizer_folder(gpt2_folder)
    text = builtin_corpus(30_000).replace("e", "é  ").replace("\n\n", " \n\n  ")  # multi-byte and odd spacing
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    whole = tokenizer(text, add_special_tokens=False).input_ids
    for n in (2, 100, 1000, len(whole), len(whole) + 5):
        prefix, ids = read_token_prefix(path, tokenizer, n, chunk_bytes=chunk_bytes)
        assert ids == whole[:n], n
        assert text.startswith(prefix) and tokenizer(prefix, add_special_tokens=False).input_ids[:n] == whole[:n]
    _, ids = read_token_prefix(path, tokenizer, 100, chunk_bytes=chunk_bytes)
    assert len(ids) == 100


def test_token_prefix_reads_only_what_it_needs(gpt2_folder, tmp_path, monkeypatch):
    """256 tokens of a 2 MB file: a few chunks are read and tokenized, not the file."""
    import hf_glu.data as data

    tokenizer = _tokenizer_folder(gpt2_folder)
    path = tmp_path / "big.txt"
    path.write_text(builtin_corpus(20_000) * 100, encoding="utf-8")
    tokenized: list[int] = []
    original = type(tokenizer).__call__

    def counting(self, text, **kwargs):
        tokenized.append(len(text))
        return original(self, text, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    prefix, ids = data.read_token_prefix(path, tokenizer, 256)
    assert len(ids) == 256 and len(prefix) < 100_000 and sum(tokenized) < 200_000


@pytest.mark.parametrize(
    "content, message",
    [
        ("Hello, wörld. ".encode("utf-16"), "UTF-16"),  # with its byte-order mark
        ("Hello, wörld. ".encode("utf-16-le") * 50, "NUL bytes"),  # without: refused as not UTF-8 text
        (b"plain text, then " + b"\xff\xfe\xfd" + b" more", "not UTF-8 (invalid byte at offset 17)"),
        (b"  \n\n \t ", "is empty"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "eval-max-tokens", "convert"])
def test_a_text_file_that_is_not_utf8_is_refused_naming_it(gpt2_folder, tmp_path, capsys, content, message, command):
    path = tmp_path / "bad-text.txt"
    path.write_bytes(content)
    dst = tmp_path / "dst"
    if command == "convert":
        argv = ["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--eval-text", str(path)]
    else:
        argv = ["eval", str(gpt2_folder), "--text-file", str(path)]
        argv += ["--max-tokens", "8"] if command == "eval-max-tokens" else []
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str(path), message)
    assert not dst.exists()


def test_eval_and_convert_use_the_prefix_of_a_long_file(gpt2_folder, tmp_path, capsys):
    """A bad byte far past what --max-tokens / --eval-tokens need is never read: both succeed, with the
    perplexity of the first tokens exactly as on the short file."""
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    text = builtin_corpus(8_000)
    short.write_text(text, encoding="utf-8")
    long.write_bytes(text.encode() + b"\n\n" + b"x " * 200_000 + b"\xff")
    results = []
    for path in (short, long):
        assert main(["eval", str(gpt2_folder), "--text-file", str(path), "--max-tokens", "120"]) == 0
        results.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "text_file"})
    assert results[0] == results[1] and results[0]["tokens"] == 119
    reports = []
    for path in (short, long):
        dst = tmp_path / f"out-{path.stem}"
        assert main(["convert", str(gpt2_folder), str(dst), "--variant", "swiglu", "--eval-text", str(path),
                     "--eval-tokens", "64"]) == 0  # fmt: skip
        reports.append(json.loads((dst / "conversion_report.json").read_text())["perplexity"])
    assert reports[0] == reports[1]
