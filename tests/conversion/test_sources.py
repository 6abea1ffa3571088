"""Sources as users have them, not as our tests' save_pretrained writes them: Hub-cache snapshots (files are links into
the repository's blobs), sharded checkpoints, folders holding two sets of weights, mixed dtypes; and what a source
folder may not make a conversion read (links leading out of it, code references that are not its own); a head saved
apart from the embedding or tied under another name, kept as Transformers loads it; legacy ``.bin`` weights; the
safetensors reader the streamed route uses, block by block.

Every conversion that succeeds gives the logits Transformers gives from SRC; every refusal is exit 2, one line, no
traceback, with every file under the test's folder byte for byte as it was."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_glu import convert_gpt2
from hf_glu.cli import main
from hf_glu.data import train_bpe_tokenizer

from helpers import (
    ROUTES,
    FakeHfApi,
    damaged_copy,
    exact_variant,
    hub_snapshot,
    refused,
    saved_family,
    tiny_gpt2,
    tiny_source,
    tree,
)

IDS = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _saved(path, family: str, sharded: bool, **overrides):
    model = tiny_gpt2(**overrides) if family == "gpt2" else tiny_source(family, **overrides)
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "5GB")
    assert (path / "model.safetensors.index.json").is_file() == sharded
    return model


# --- 1. a Hub-cache snapshot converts on every route ------------------------------------------------------


CACHED = [
    ("gpt2", "in-memory", True),
    ("gpt2", "in-memory", False),
    ("gpt_neox", "in-memory", True),
    ("gpt_neox", "streamed", True),
    ("gpt_neox", "streamed", False),
]


@pytest.mark.parametrize("family, route, sharded", CACHED)
def test_a_hub_cache_snapshot_converts_to_what_transformers_loads(family, route, sharded, hub_cache, tmp_path):
    source = _saved(tmp_path / "saved", family, sharded)
    snapshot = hub_snapshot(tmp_path / "saved", hub_cache, "org/tiny")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    before = tree(hub_cache)
    out = tmp_path / "out"
    variant = "geglu_tanh" if family == "gpt2" else exact_variant(family, source.config)
    assert main(["convert", "org/tiny", str(out), "--variant", variant, *ROUTES[route]]) == 0
    assert tree(hub_cache) == before
    loaded = AutoModelForCausalLM.from_pretrained(snapshot).eval()
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert (_logits(converted) - _logits(loaded)).abs().max() < 1e-4


def test_the_converted_hub_cache_snapshot_passes_the_push_check(hub_cache, tmp_path):
    from hf_glu.hub import push_checkpoint

    _saved(tmp_path / "saved", "gpt_neox", sharded=True)
    snapshot = hub_snapshot(tmp_path / "saved", hub_cache, "org/tiny")
    out = tmp_path / "out"
    assert main(["convert", str(snapshot), str(out), "--variant", "geglu", "--no-eval"]) == 0
    api = FakeHfApi()
    push_checkpoint(out, "me/tiny-glu", api=api)
    assert "model.safetensors.index.json" in api.uploaded_files and "config.json" in api.uploaded_files


def test_convert_from_in_the_recipes_reads_a_sharded_hub_cache_snapshot(hub_cache, tmp_path):
    from hf_glu.finetune import load_model_and_tokenizer

    tokenizer = train_bpe_tokenizer("the quick brown fox jumps over the lazy dog. " * 20, 120)
    source = _saved(tmp_path / "saved", "gpt_neox", sharded=True, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "saved")
    snapshot = hub_snapshot(tmp_path / "saved", hub_cache, "org/tiny")
    model, _ = load_model_and_tokenizer(convert_from=str(snapshot), variant="geglu")
    ids = IDS % len(tokenizer)
    assert (_logits(model.eval(), ids) - _logits(source, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_eval_scores_a_hub_cache_snapshot_as_the_folder_it_was_made_from(sharded, hub_cache, tmp_path, capsys):
    tokenizer = train_bpe_tokenizer("the quick brown fox jumps over the lazy dog. " * 20, 120)
    _saved(tmp_path / "saved", "gpt_neox", sharded=sharded, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "saved")
    hub_snapshot(tmp_path / "saved", hub_cache, "org/tiny")
    text = tmp_path / "text.txt"
    text.write_text("the lazy dog jumps over the quick brown fox. " * 8)
    scores = []
    for model in (str(tmp_path / "saved"), "org/tiny"):
        capsys.readouterr()
        assert main(["eval", model, "--text-file", str(text), "--max-tokens", "40"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["perplexity"] == scores[1]["perplexity"] and scores[0]["tokens"] == scores[1]["tokens"]


def test_convert_from_in_the_recipes_refuses_a_tokenizer_file_linked_out_of_the_source(tmp_path):
    from hf_glu.convert import ConversionError
    from hf_glu.finetune import load_model_and_tokenizer

    tokenizer = train_bpe_tokenizer("the quick brown fox jumps over the lazy dog. " * 20, 120)
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "elsewhere")
    (src / "tokenizer.json").symlink_to(tmp_path / "elsewhere" / "tokenizer.json")
    shutil.copy(tmp_path / "elsewhere" / "tokenizer_config.json", src)
    with pytest.raises(ConversionError, match="tokenizer.json.*may lead only inside that folder"):
        load_model_and_tokenizer(convert_from=str(src), variant="geglu")


# --- 2. a single file beside a sharded index: read as Transformers reads it -------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(route, tmp_path):
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False)  # weights A: what Transformers loads
    torch.manual_seed(1)
    _saved(tmp_path / "other", "gpt_neox", sharded=True)  # weights B, a sharded index beside A
    for path in (tmp_path / "other").glob("model*"):
        shutil.copy(path, src / path.name)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--variant", "geglu", *ROUTES[route]]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(src).eval()
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits(converted) - _logits(loaded)).abs().max() < 1e-4


# --- 9. nothing from outside SRC is read or carried ---------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_link_leading_out_of_the_source_is_refused(route, tmp_path, capsys):
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False)
    (tmp_path / "secret.json").write_text(json.dumps({"secret": "do not copy", "do_sample": False}))
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to(tmp_path / "secret.json")
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    refused(args, tmp_path, capsys, "generation_config.json", str(tmp_path / "secret.json"), "blobs/")


def test_eval_refuses_a_link_leading_out_of_the_model_folder(tmp_path, capsys):
    """`hf-glu eval` asks the same check as convert before Transformers opens a file of the folder."""
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False)
    (tmp_path / "secret.json").write_text(json.dumps({"secret": "do not read"}))
    (src / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
    (tmp_path / "text.txt").write_text("some words to score, and a few more of them")
    args = ["eval", str(src), "--text-file", str(tmp_path / "text.txt")]
    refused(args, tmp_path, capsys, "tokenizer_config.json", str(tmp_path / "secret.json"))


@pytest.mark.parametrize("route", ROUTES)
def test_a_shard_linked_into_another_repositorys_blobs_is_refused(route, hub_cache, tmp_path, capsys):
    _saved(tmp_path / "saved", "gpt_neox", sharded=True)
    snapshot = hub_snapshot(tmp_path / "saved", hub_cache, "org/tiny")
    torch.manual_seed(1)
    _saved(tmp_path / "other", "gpt_neox", sharded=True)
    other = hub_snapshot(tmp_path / "other", hub_cache, "org/other")
    shard = sorted(snapshot.glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(os.path.relpath((other / shard.name).resolve(), snapshot))
    args = ["convert", "org/tiny", str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    refused(args, tmp_path, capsys, shard.name, "models--org--other", "blobs/")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("reference", ["../../x.Tok", "other/repo--tokenization.Tok"])
def test_a_tokenizer_auto_map_naming_code_outside_the_folder_is_refused(reference, route, tmp_path, capsys):
    tokenizer = train_bpe_tokenizer("the quick brown fox jumps over the lazy dog. " * 20, 120)
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(src)
    (tmp_path / "x.py").write_text("class Tok: pass\n")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, reference]}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    refused(args, tmp_path, capsys, "tokenizer_config.json", repr(reference), "module.Class")


# --- 14. names an index may give, and dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_pickle_named_in_a_safetensors_index_is_refused_by_name(route, tmp_path, capsys):
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=True)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    torch.save({"x": torch.zeros(2)}, src / "pytorch_model-00001.bin")
    data["weight_map"] = {k: "pytorch_model-00001.bin" if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    refused(args, tmp_path, capsys, "pytorch_model-00001.bin", "a safetensors index must name .safetensors files")


@pytest.mark.parametrize(
    "name", ["../shard.safetensors", "/tmp/shard.safetensors", "C:shard.safetensors", "a\\..\\b.safetensors", ""]
)
def test_index_names_are_checked_as_names(name, tmp_path, capsys):
    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=True)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = name
    index.write_text(json.dumps(data))
    for route in ROUTES.values():
        refused(["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *route], tmp_path, capsys,
                 repr(name), "expected a relative file name")  # fmt: skip


def _mix_dtypes(folder, layers: torch.dtype, config_dtype: str) -> None:
    """Layers stored in ``layers``, everything else as saved (fp32); the config says ``config_dtype``."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights = {k: v.to(layers) if ".layers." in k and v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": config_dtype}))


@pytest.mark.parametrize("config_dtype", ["bfloat16", "float32"])
def test_a_mixed_dtype_source_is_written_alike_by_both_routes_in_the_dtype_transformers_loads(config_dtype, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "src"
    _saved(src, "gpt_neox", sharded=False)
    _mix_dtypes(src, torch.bfloat16, config_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(src).eval()
    written = {}
    for route, flags in ROUTES.items():
        out = tmp_path / route
        assert main(["convert", str(src), str(out), "--variant", "geglu", *flags]) == 0
        written[route] = load_file(out / "model.safetensors")
        assert {str(t.dtype) for t in written[route].values() if t.is_floating_point()} == {str(loaded.dtype)}
        assert json.loads((out / "config.json").read_text())["dtype"] == config_dtype
        converted = AutoModelForCausalLM.from_pretrained(out).eval()
        assert (_logits(converted) - _logits(loaded)).abs().max() < (1e-4 if config_dtype == "float32" else 2e-2)
    assert written["in-memory"].keys() == written["streamed"].keys()
    assert all(torch.equal(t, written["streamed"][k]) for k, t in written["in-memory"].items())


def test_legacy_bin_weights_load_with_weights_only(saved_gpt2, tmp_path):
    src = damaged_copy(tmp_path, saved_gpt2, "bin")
    converted = convert_gpt2(str(src), "geglu_tanh", eval_tokens=16)
    assert converted.conversion_report["max_abs_logit_diff"] < 1e-5


def test_a_disk_source_is_consumed_block_by_block_without_changing_the_result(saved_gpt2):
    from hf_glu.convert.gpt2 import convert_config, convert_weights
    from hf_glu.convert.init_schemes import fit_unit_map
    from hf_glu.convert.source import load_source

    source = load_source(saved_gpt2).model
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
    from_disk = convert_gpt2(str(saved_gpt2), "geglu_tanh", eval_tokens=32).state_dict()
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


def _untie_in_file(folder, head: str, embedding: str) -> None:
    """Give a tied checkpoint a separate, different head while its config still says tie_word_embeddings."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights[head] = torch.randn_like(weights[embedding])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True)


UNTIED_IN_FILE = {  # family -> (its head's name in the file, the embedding's)
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
    "gpt_neo": ("lm_head.weight", "transformer.wte.weight"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", UNTIED_IN_FILE)
def test_a_separate_head_in_the_file_is_kept_as_transformers_loads_it(family, route, tmp_path):
    if family == "gpt2" and route == "streamed":
        pytest.skip("--no-eval streams the other families only")
    src, out = tmp_path / "src", tmp_path / "out"
    (tiny_gpt2() if family == "gpt2" else tiny_source(family)).save_pretrained(src)
    _untie_in_file(src, *UNTIED_IN_FILE[family])
    assert main(["convert", str(src), str(out), "--variant", "geglu_tanh", *ROUTES[route]]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(src).eval()  # untied: the file's head wins
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (1, 12))
    assert (_logits(converted, ids) - _logits(loaded, ids)).abs().max() < 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    if route == "in-memory":  # the measured figure is against the source as Transformers loads it
        report = json.loads((out / "conversion_report.json").read_text())
        assert report["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", ["biogpt", "gpt_neox_japanese"])
def test_families_whose_tied_head_is_not_lm_head_convert(family, route, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    source = tiny_source(family)
    source.save_pretrained(src)  # saved tied: the head (output_projection, embed_out) is not in the file
    variant = exact_variant(family, source.config)
    assert main(["convert", str(src), str(out), "--variant", variant, *ROUTES[route]]) == 0
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (1, 12))
    assert (_logits(converted, ids) - _logits(source, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("route", ROUTES)
def test_an_untied_family_stays_untied(route, tmp_path):
    src = saved_family(tmp_path / "src")  # GPT-NeoX: tie_word_embeddings=False, its own embed_out
    assert main(["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
