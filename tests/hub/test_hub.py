"""push_checkpoint: a loadable folder goes up whole; a broken one is refused before any network call."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_glu import GluForCausalLM
from hf_glu.data import train_bpe_tokenizer
from hf_glu.hub import CheckpointFolderError, check_checkpoint_folder, push_checkpoint

from helpers import FakeHfApi, hub_snapshot, refused, tiny_config

CODE_FILES = ("configuration_glu.py", "modeling_glu.py", "glu.py", "glu_triton.py")




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "glu-tiny"
    tokenizer = train_bpe_tokenizer("hello world, the quick brown fox.\n\njumps over the lazy dog. " * 20, 300)
    GluForCausalLM(tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# glu-tiny\n", encoding="utf-8")
    return folder


@pytest.fixture
def broken(checkpoint, tmp_path) -> Path:
    """A fresh copy of the good checkpoint for a test to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "broken"))


def test_push_uploads_config_weights_code_tokenizer_and_card(checkpoint):
    api = FakeHfApi()
    url = push_checkpoint(checkpoint, "me/glu-tiny", private=True, token="hf_x", commit_message="first", api=api)

    assert url == "https://huggingface.co/me/glu-tiny"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2] == {"token": "hf_x", "private": True, "exist_ok": True}
    assert api.calls[1][1] == "me/glu-tiny"
    assert api.calls[1][2]["commit_message"] == "first"
    assert api.calls[1][2]["token"] == "hf_x"
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", *CODE_FILES}
    assert expected <= set(api.uploaded_files)


def test_sharded_checkpoint_with_all_shards_is_accepted(tmp_path):
    folder = tmp_path / "sharded"
    GluForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="20KB")
    assert not (folder / "model.safetensors").exists()
    api = FakeHfApi()
    push_checkpoint(folder, "me/sharded", api=api)
    assert "model.safetensors.index.json" in api.uploaded_files


def _refused(folder: Path, *expected_fragments: str) -> None:
    api = FakeHfApi()
    with pytest.raises(CheckpointFolderError) as info:
        push_checkpoint(folder, "me/broken", api=api)
    assert api.calls == [], "nothing may be uploaded, nor any repo created, for a broken folder"
    for fragment in expected_fragments:
        assert fragment in str(info.value)


def test_missing_config_is_refused(broken):
    (broken / "config.json").unlink()
    _refused(broken, "no config.json", "save_pretrained")


def test_missing_weights_are_refused(broken):
    (broken / "model.safetensors").unlink()
    _refused(broken, "no weights", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json")  # fmt: skip


def test_missing_shard_is_refused(tmp_path):
    folder = tmp_path / "sharded"
    GluForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (folder / shard).unlink()
    _refused(folder, shard, "is missing")


def test_truncated_weights_are_refused(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    _refused(broken, "'model.safetensors' is corrupt")


def test_an_index_reaching_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "sharded"
    GluForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../../etc/hostname"
    index.write_text(json.dumps(data))
    _refused(folder, "../../etc/hostname", "expected a relative file name")


def test_a_glu_config_without_auto_map_is_refused(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]
    (broken / "config.json").write_text(json.dumps(config))
    _refused(broken, "model_type='glu_gpt2'", "no auto_map")


def test_a_bin_only_folder_that_loads_is_accepted(checkpoint, tmp_path):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "bin"))
    state_dict = GluForCausalLM.from_pretrained(folder).state_dict()
    torch.save({k: v.contiguous() for k, v in state_dict.items()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    GluForCausalLM.from_pretrained(folder)  # it does load
    api = FakeHfApi()
    push_checkpoint(folder, "me/bin", api=api)
    assert "pytorch_model.bin" in api.uploaded_files


def test_code_named_by_auto_map_must_be_present(broken):
    (broken / "modeling_glu.py").unlink()
    _refused(broken, "'modeling_glu.py'", "auto_map of config.json")


def test_code_imported_by_the_modeling_file_must_be_present(broken):
    (broken / "glu.py").unlink()
    _refused(broken, "'glu.py'", "an import in")


def test_every_problem_is_listed_at_once(broken):
    (broken / "config.json").unlink()
    (broken / "model.safetensors").unlink()
    _refused(broken, "no config.json", "no weights")


def test_not_a_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointFolderError, match="does not exist or is not a folder"):
        check_checkpoint_folder(tmp_path / "nowhere")


def test_cli_push_uploads_and_refuses_broken_folders(checkpoint, broken, monkeypatch, capsys):
    from hf_glu import cli, hub

    api = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    assert cli.main(["push", str(checkpoint), "me/glu-tiny", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert api.calls[0][2]["private"] is True and "model.safetensors" in api.uploaded_files

    (broken / "config.json").unlink()
    api.calls.clear()
    assert cli.main(["push", str(broken), "me/glu-tiny"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert api.calls == []


# --- what push reads and sends: the folder's own files, exactly those it checked --------------------------------


def test_a_hub_cache_snapshot_is_pushed_with_its_linked_files(tmp_path):
    saved = tmp_path / "saved"
    GluForCausalLM(tiny_config()).save_pretrained(saved, max_shard_size="20KB")
    snapshot = hub_snapshot(saved, tmp_path / "hub", "me/sharded")
    api = FakeHfApi()
    push_checkpoint(snapshot, "me/sharded", api=api)
    assert api.uploaded_files == sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())


def test_a_link_leading_out_of_the_folder_is_refused(broken, tmp_path):
    (tmp_path / "secret").write_text("not the checkpoint's")
    (broken / "notes.txt").symlink_to(tmp_path / "secret")
    _refused(broken, "notes.txt", str(tmp_path / "secret"), "may lead only inside that folder")


def test_a_link_into_another_repositorys_blobs_is_refused(tmp_path):
    saved = tmp_path / "saved"
    GluForCausalLM(tiny_config()).save_pretrained(saved)
    snapshot = hub_snapshot(saved, tmp_path / "hub", "me/glu")
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "secret").write_text("another repository's file")
    (snapshot / "notes.txt").symlink_to("../../../models--someone--else/blobs/secret")
    _refused(snapshot, "notes.txt", "models--someone--else", "blobs/")


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("reference", ["../../x.Tok", "..\\x.Tok", "otherrepo--modeling_glu.GluForCausalLM"])
def test_an_auto_map_naming_code_outside_the_folder_is_refused(file, reference, broken, tmp_path, monkeypatch):
    # The code exists where the reference would lead: only the rule can refuse it.
    (tmp_path / "x.py").write_text("class Tok: pass\n")
    shutil.copytree(broken, tmp_path / "otherrepo")
    monkeypatch.chdir(tmp_path)  # `otherrepo--…` resolves against ./otherrepo
    data = json.loads((broken / file).read_text())
    key = "AutoTokenizer" if file == "tokenizer_config.json" else "AutoModel"
    data["auto_map"] = {**data.get("auto_map", {}), key: [None, reference] if key == "AutoTokenizer" else reference}
    (broken / file).write_text(json.dumps(data))
    _refused(broken, f"the auto_map of {file}", repr(reference), "module.Class")


def test_push_uploads_only_the_files_it_checked(checkpoint, tmp_path, monkeypatch):
    from hf_glu import hub

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    load_problems = hub._load_problems

    def a_file_appears_during_the_check(folders):
        (folder / "added-after-the-check.bin").write_bytes(b"never checked")
        return load_problems(folders)

    monkeypatch.setattr(hub, "_load_problems", a_file_appears_during_the_check)
    api = FakeHfApi()
    push_checkpoint(folder, "me/glu-tiny", api=api)
    assert "added-after-the-check.bin" not in api.uploaded_files
    assert sorted(p.name for p in checkpoint.iterdir()) == api.uploaded_files


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
    from hf_glu import GluForCausalLM

    folder = tmp_path_factory.mktemp("glu") / "ckpt"
    GluForCausalLM(tiny_config()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", UNLOADABLE)
def test_push_refuses_a_folder_that_would_not_load_before_sending_anything(case, glu_folder, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    from hf_glu import hub

    api = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    folder = Path(shutil.copytree(glu_folder, tmp_path / "ckpt"))
    damage, message = UNLOADABLE[case]
    damage(folder)
    refused(["push", str(folder), "me/glu-tiny"], tmp_path, capsys, str(folder), "would not load", message)
    assert api.calls == []
