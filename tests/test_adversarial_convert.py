"""Hostile and careless conversions and pushes, round two: each refusal is exit 2 with one line naming the input
and what is accepted, with every file under the test's folder (SRC, DST, what lies beside them) byte for byte
as it was; each acceptance keeps exactly what Transformers loads from the source."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import refused as _refused
from families import exact_variant, tiny_source
from test_convert import tiny_gpt2
from transformers import AutoModelForCausalLM

from hf_glu.cli import main


def _family_folder(path, family="gpt_neox", **overrides):
    tiny_source(family, **overrides).save_pretrained(path)
    return path


ROUTES = {"in-memory": ["--eval-tokens", "16"], "streamed": ["--no-eval"]}


# --- 1. DST may not be SRC, inside it, or an ancestor of it -------------------------------------------------

DESTINATIONS = {
    "DST is SRC": lambda src: src,
    "DST is the parent of SRC": lambda src: src.parent,
    "DST is inside SRC": lambda src: src / "out",
    "DST is a link to SRC": lambda src: _link(src.parent.parent / "link", src),
}


def _link(link, target):
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("where", DESTINATIONS)
def test_a_destination_overlapping_the_source_is_refused_before_any_work(where, route, tmp_path, capsys):
    src = _family_folder(tmp_path / "models" / "src")
    (tmp_path / "models" / "other.txt").write_text("beside the source")
    dst = DESTINATIONS[where](src)
    args = ["convert", str(src), str(dst), "--variant", "geglu", "--force", *ROUTES[route]]
    _refused(args, tmp_path, capsys, str(dst), "SRC")


# --- 2. one tying rule: what Transformers loads ---------------------------------------------------------------


def _untie_in_file(folder, head: str, embedding: str) -> None:
    """Give a tied checkpoint a separate, different head while its config still says tie_word_embeddings."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights[head] = torch.randn_like(weights[embedding])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


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


# --- 7. debris: a linked DST, parents made for a refused DST ----------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_linked_destination_has_its_target_replaced_and_nothing_left_beside(route, tmp_path):
    src = _family_folder(tmp_path / "src")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("an earlier conversion")
    _link(tmp_path / "link", tmp_path / "target")
    assert main(["convert", str(src), str(tmp_path / "link"), "--variant", "geglu", "--force", *ROUTES[route]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "src", "target"]
    assert os.readlink(tmp_path / "link") == str(tmp_path / "target")
    assert (tmp_path / "target" / "config.json").is_file() and not (tmp_path / "target" / "old.txt").exists()


def test_a_destination_under_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import hf_glu.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    src = _family_folder(tmp_path / "src")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "file").chmod(0o755)  # writable and "executable": only the write itself failed ([Errno 20])
    dst = tmp_path / "file" / "out"
    _refused(["convert", str(src), str(dst), "--variant", "geglu"], tmp_path, capsys, str(dst), "is a file")


# --- 3. what the streamed route must refuse as the in-memory one does -------------------------------------


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
    src = _family_folder(tmp_path / "src")
    damage(src)
    dst = tmp_path / "new" / "deeper" / "out"  # its parents must not be left behind either
    _refused(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]], tmp_path, capsys, message,
             "model.safetensors" if message == "overlap" else "expected finite")  # fmt: skip


# --- 4. BLOOM's slow_but_exact tensor-parallel path ----------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_bloom_slow_but_exact_is_refused_not_called_exact(route, tmp_path, capsys):
    src = _family_folder(tmp_path / "src", "bloom", pretraining_tp=2, slow_but_exact=True)
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu_tanh", *ROUTES[route]]
    _refused(args, tmp_path, capsys, "slow_but_exact", "pretraining_tp=2")


# --- 6. tracebacks that must be one line ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", [5, "GPTNeoXForCausalLM", [7]], ids=["int", "str", "[int]"])
def test_architectures_not_a_list_of_names_is_refused(value, route, tmp_path, capsys):
    src = _family_folder(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": value}))
    args = ["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]
    _refused(args, tmp_path, capsys, "architectures", "expected a list")


@pytest.mark.parametrize("error", ["SafetensorError", "OSError"])
def test_disk_full_during_the_in_memory_write_is_one_line(error, tmp_path, capsys, monkeypatch):
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    src = _family_folder(tmp_path / "src")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    dst = tmp_path / "out"
    _refused(["convert", str(src), str(dst), "--variant", "geglu", "--eval-tokens", "16"], tmp_path, capsys,
             str(dst), "cannot be written")  # fmt: skip


def test_an_unsupported_activation_names_the_family_field(tmp_path, capsys):
    src = _family_folder(tmp_path / "src", hidden_act="tanh")
    for route in ROUTES.values():
        message = _refused(["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *route], tmp_path, capsys,
                           "hidden_act='tanh'")  # fmt: skip
        assert "activation_function" not in message


# --- 5. push: the folder must load, from its own code, without hf_glu ------------------------------------


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def _missing_class(folder):
    config = json.loads((folder / "config.json").read_text())
    _edit_config(folder, auto_map={**config["auto_map"], "AutoModelForCausalLM": "modeling_glu.NoSuchClass"})


def _raising_code(folder):
    with open(folder / "modeling_glu.py", "a") as f:
        f.write("\nraise RuntimeError('broken at import')\n")


def _width(folder):
    config = json.loads((folder / "config.json").read_text())
    _edit_config(folder, n_inner=config["n_inner"] + 8)


UNLOADABLE = {  # damage, what the one line must say
    "auto_map names a missing class": (_missing_class, "NoSuchClass"),
    "code raises at import": (_raising_code, "broken at import"),
    "unknown glu_variant": (lambda f: _edit_config(f, glu_variant="nope"), "'nope'"),
    "width does not match the weights": (_width, "has shape"),
}


@pytest.fixture(scope="module")
def glu_folder(tmp_path_factory):
    from conftest import tiny_config

    from hf_glu import GluForCausalLM

    folder = tmp_path_factory.mktemp("glu") / "ckpt"
    GluForCausalLM(tiny_config()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", UNLOADABLE)
def test_push_refuses_a_folder_that_would_not_load_before_sending_anything(case, glu_folder, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    from test_hub import FakeHfApi

    from hf_glu import hub

    api = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    folder = Path(shutil.copytree(glu_folder, tmp_path / "ckpt"))
    damage, message = UNLOADABLE[case]
    damage(folder)
    _refused(["push", str(folder), "me/glu-tiny"], tmp_path, capsys, str(folder), "would not load", message)
    assert api.calls == []


@pytest.mark.parametrize("route", ROUTES)
def test_an_untied_family_stays_untied(route, tmp_path):
    src = _family_folder(tmp_path / "src")  # GPT-NeoX: tie_word_embeddings=False, its own embed_out
    assert main(["convert", str(src), str(tmp_path / "out"), "--variant", "geglu", *ROUTES[route]]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_destination_holding_the_hub_cache_is_refused_for_a_hub_source(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / ".cache" / "huggingface" / "hub"))
    (tmp_path / "home" / ".cache" / "huggingface" / "hub").mkdir(parents=True)
    (tmp_path / "home" / "notes.txt").write_text("the user's own files")
    args = ["convert", "someone/some-model", str(tmp_path / "home"), "--variant", "geglu", "--force"]
    _refused(args, tmp_path, capsys, str(tmp_path / "home"), "SRC")
