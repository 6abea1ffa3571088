"""Hostile and careless conversions and pushes, round two: each refusal is exit 2 with one line naming the input
and what is accepted, with every file under the test's folder (SRC, DST, what lies beside them) byte for byte
as it was; each acceptance keeps exactly what Transformers loads from the source."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import refused as _refused
from conftest import tiny_gpt2
from conftest import tree as _tree
from families import exact_variant, tiny_source
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
    from conftest import FakeHfApi

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


# --- issue 23, 7: the destination is what was checked, up to the swap -------------------------------------


def _one_line(err: str) -> str:
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("state", ["absent", "empty folder"])
def test_a_file_made_in_dst_during_the_write_is_kept_and_the_conversion_fails(state, route, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    import hf_glu.convert.pipeline as module  # both routes render the card through it, after the weights

    src = _family_folder(tmp_path / "src")
    dst = tmp_path / "out"
    if state == "empty folder":
        dst.mkdir()
    render = module.render_conversion_card

    def user_writes_meanwhile(*args, **kwargs):  # the weights are written, the swap is yet to come
        dst.mkdir(exist_ok=True)
        (dst / "notes.txt").write_text("the user's own notes")
        return render(*args, **kwargs)

    monkeypatch.setattr(module, "render_conversion_card", user_writes_meanwhile)
    before = _tree(tmp_path)
    capsys.readouterr()
    code = main(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and str(dst) in line, line
    notes = hashlib.sha256(b"the user's own notes").hexdigest()
    assert _tree(tmp_path) == {**before, "out": "dir", "out/notes.txt": notes}


# Run as `python -c BARRIER... convert ...`: each conversion waits, its checks passed and its weights written,
# until the other has got as far, so both swaps come after both checks (the race of issue 23, every time).
BARRIER = """
import os, time
from pathlib import Path
import hf_glu.convert.pipeline as pipeline  # the streamed route renders its card through it too
render = pipeline.render_conversion_card
def render_when_both_are_writing(*args, **kwargs):
    sync = Path(os.environ["HF_GLU_TEST_SYNC"])
    (sync / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(sync.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return render(*args, **kwargs)
pipeline.render_conversion_card = render_when_both_are_writing
from hf_glu.cli import main
raise SystemExit(main())
"""


def test_two_concurrent_conversions_into_one_new_dst_the_later_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    src = _family_folder(tmp_path / "src")
    dst = tmp_path / "out"
    (tmp_path / "sync").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_GLU_TEST_SYNC": str(tmp_path / "sync")}
    source_before = _tree(src)
    command = [sys.executable, "-c", BARRIER, "convert", str(src), str(dst), "--variant", "geglu", "--no-eval"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    line = _one_line(next(err for code, err in results if code == 2))
    assert str(dst) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "sync"]
    assert _tree(src) == source_before
    written = AutoModelForCausalLM.from_pretrained(dst).eval()  # the one result, complete
    ids = torch.randint(0, 101, (1, 12))
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    assert (_logits(written, ids) - _logits(source, ids)).abs().max() < 1e-4


# --- issue 23, 12: a DST in a symlink loop, a DST name of any legal length ----------------------------------


@pytest.mark.parametrize("where", ["DST is the loop", "DST lies under the loop"])
def test_a_destination_in_a_symlink_loop_is_refused_in_one_line(where, tmp_path, capsys):
    src = _family_folder(tmp_path / "src")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    dst = loop if where == "DST is the loop" else loop / "out"
    _refused(["convert", str(src), str(dst), "--variant", "geglu", "--no-eval"], tmp_path, capsys, str(dst),
             "symlink loop")  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_a_destination_name_of_245_characters_converts(route, tmp_path):
    src = _family_folder(tmp_path / "src")
    dst = tmp_path / ("m" * 245)  # legal (NAME_MAX is 255), but ".NAME.tmp-PID-RANDOM" beside it would not be
    assert main(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", dst.name])
    assert AutoModelForCausalLM.from_pretrained(dst).config.glu_variant == "geglu"


def test_a_destination_name_longer_than_the_filesystem_takes_is_refused_before_any_work(tmp_path, capsys,
                                                                                        monkeypatch):  # fmt: skip
    import hf_glu.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    src = _family_folder(tmp_path / "src")
    dst = tmp_path / "new" / ("m" * 256)
    _refused(["convert", str(src), str(dst), "--variant", "geglu"], tmp_path, capsys, "m" * 256, "255")


# --- issue 23, 5: --max-shard-size on the streamed route ---------------------------------------------------


def test_no_eval_honours_max_shard_size_with_a_loadable_index(tmp_path):
    from safetensors import safe_open

    src = _family_folder(tmp_path / "src")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["convert", str(src), str(whole), "--variant", "geglu", "--no-eval"]) == 0
    args = ["convert", str(src), str(sharded), "--variant", "geglu", "--no-eval", "--max-shard-size", "20KB"]
    assert main(args) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    sizes = {}
    for name in files:
        with safe_open(sharded / name, "pt") as f:
            nbytes = [f.get_tensor(k).nbytes for k in f.keys()]
            assert sum(nbytes) <= 20_000 or len(nbytes) == 1, (name, nbytes)  # one tensor may exceed it alone
            sizes.update(zip(f.keys(), nbytes, strict=True))
            assert all(index["weight_map"][k] == name for k in f.keys())
    with safe_open(whole / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(sizes) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(sizes.values())
    ids = torch.randint(0, 101, (1, 12))
    from_shards = _logits(AutoModelForCausalLM.from_pretrained(sharded).eval(), ids)
    assert torch.equal(from_shards, _logits(AutoModelForCausalLM.from_pretrained(whole).eval(), ids))
    assert (from_shards - _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)).abs().max() < 1e-4
