"""The conversion entry points share one option list (ConvertOptions): each lists every option by name, in
the order and kind a call uses, and refuses an unknown one before any work."""

import inspect

import pytest

from hf_glu.convert import ConvertOptions, convert, convert_checkpoint, convert_gpt2, convert_to_folder

_POSITIONAL = ["variant", "init", "intermediate_size", "torch_dtype"]
_KEYWORD = ["tokenizer", "eval_text", "eval_tokens", "seed", "match_params", "calibration_text",
            "calibration_tokens"]  # fmt: skip


def _kinds(function) -> list[tuple[str, str]]:
    return [(p.name, p.kind.name) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("function", [convert, convert_checkpoint, convert_gpt2])
def test_every_option_is_in_the_in_memory_entry_points_signature(function):
    expected = [("source", "POSITIONAL_OR_KEYWORD")]
    expected += [(name, "POSITIONAL_OR_KEYWORD") for name in _POSITIONAL]
    expected += [(name, "KEYWORD_ONLY") for name in _KEYWORD]
    assert _kinds(function) == expected


def test_every_option_is_in_convert_to_folders_signature():
    expected = [("source", "POSITIONAL_OR_KEYWORD"), ("dst", "POSITIONAL_OR_KEYWORD")]
    expected += [(name, "POSITIONAL_OR_KEYWORD") for name in _POSITIONAL]
    expected += [(name, "KEYWORD_ONLY") for name in ["force", "max_shard_size", *_KEYWORD]]
    assert _kinds(convert_to_folder) == expected


def test_the_signatures_defaults_are_the_options_defaults():
    options = ConvertOptions()
    for name, parameter in inspect.signature(convert_to_folder).parameters.items():
        if hasattr(options, name):
            assert parameter.default == getattr(options, name), name


def test_a_misspelt_option_is_refused_before_the_destination_is_touched(tmp_path):
    dst = tmp_path / "dst"
    with pytest.raises(TypeError, match="eval_token"):
        convert_to_folder("no-such-source", dst, eval_token=8)
    with pytest.raises(TypeError, match="positional"):
        convert_checkpoint("no-such-source", "swiglu", "preserve", None, None, "extra")
    assert not dst.exists()
