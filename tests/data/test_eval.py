"""`hf-glu eval` and the text a conversion scores: the sliding-window perplexity, windows that fit each family's
own position field, reading and tokenizing only the prefix that is scored, and bad text, options, tokenizers or
weights refused in one line."""

import json
from pathlib import Path

import pytest
import transformers

from hf_glu.cli import main
from hf_glu.data import builtin_corpus, train_bpe_tokenizer

from helpers import FAMILY_CONFIGS, tiny_gpt2, tiny_source

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


def test_eval_reports_sliding_window_perplexity(saved_gpt2, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(builtin_corpus(6_000))
    assert (
        main(
            [
                "eval",
                str(saved_gpt2),
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


def _one_line_error(err: str, *needles: str) -> None:
    """One error line naming ``needles`` (Transformers' loading progress bars may come before it), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("hf-glu ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture(scope="module")
def mpt_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny MPT (its limit is max_seq_len=64, no max_position_embeddings) and its GLU conversion."""
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
def test_token_prefix_read_in_chunks_equals_the_whole_file_tokenized(saved_gpt2, tmp_path, chunk_bytes):
    """Read chunk by chunk, the first N tokens are exactly those of the whole file tokenized at once, whatever
    the chunk boundaries (mid-word, mid-whitespace run, mid multi-byte character)."""
    from hf_glu.data import read_token_prefix

    tokenizer = _tokenizer_folder(saved_gpt2)
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


def test_token_prefix_reads_only_what_it_needs(saved_gpt2, tmp_path, monkeypatch):
    """256 tokens of a 2 MB file: a few chunks are read and tokenized, not the file."""
    import hf_glu.data as data

    tokenizer = _tokenizer_folder(saved_gpt2)
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
def test_a_text_file_that_is_not_utf8_is_refused_naming_it(saved_gpt2, tmp_path, capsys, content, message, command):
    path = tmp_path / "bad-text.txt"
    path.write_bytes(content)
    dst = tmp_path / "dst"
    if command == "convert":
        argv = ["convert", str(saved_gpt2), str(dst), "--variant", "swiglu", "--eval-text", str(path)]
    else:
        argv = ["eval", str(saved_gpt2), "--text-file", str(path)]
        argv += ["--max-tokens", "8"] if command == "eval-max-tokens" else []
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str(path), message)
    assert not dst.exists()


def test_eval_and_convert_use_the_prefix_of_a_long_file(saved_gpt2, tmp_path, capsys):
    """A bad byte far past what --max-tokens / --eval-tokens need is never read: both succeed, with the
    perplexity of the first tokens exactly as on the short file."""
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    text = builtin_corpus(8_000)
    short.write_text(text, encoding="utf-8")
    long.write_bytes(text.encode() + b"\n\n" + b"x " * 200_000 + b"\xff")
    results = []
    for path in (short, long):
        assert main(["eval", str(saved_gpt2), "--text-file", str(path), "--max-tokens", "120"]) == 0
        results.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "text_file"})
    assert results[0] == results[1] and results[0]["tokens"] == 119
    reports = []
    for path in (short, long):
        dst = tmp_path / f"out-{path.stem}"
        assert main(["convert", str(saved_gpt2), str(dst), "--variant", "swiglu", "--eval-text", str(path),
                     "--eval-tokens", "64"]) == 0  # fmt: skip
        reports.append(json.loads((dst / "conversion_report.json").read_text())["perplexity"])
    assert reports[0] == reports[1]
