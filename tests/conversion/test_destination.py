"""What a conversion does to DST: it never overlaps SRC, replaces a non-empty or linked DST only when asked and only
in one swap onto what was checked, keeps what others write there meanwhile, takes any legal name, and leaves DST as
it was on every failure (disk full, a crash midway, a concurrent conversion)."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_glu.cli import main

from helpers import ROUTES, file_bytes, refused, saved_family, tree


def test_non_empty_dst_is_refused_without_force(saved_gpt2, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert main(["convert", str(saved_gpt2), str(dst), "--variant", "swiglu"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert file_bytes(dst) == {"keep.txt": b"precious"}
    assert main(["convert", str(saved_gpt2), str(dst), "--variant", "swiglu", "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_failure_midway_leaves_dst_as_it_was(saved_gpt2, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")

    def broken_card(*args, **kwargs):  # fails after the weights and tokenizer are written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("hf_glu.convert.pipeline.render_conversion_card", broken_card)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["convert", str(saved_gpt2), str(dst), "--variant", "swiglu", "--force"])
    assert file_bytes(dst) == {"keep.txt": b"precious"}
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


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
    src = saved_family(tmp_path / "models" / "src")
    (tmp_path / "models" / "other.txt").write_text("beside the source")
    dst = DESTINATIONS[where](src)
    args = ["convert", str(src), str(dst), "--variant", "geglu", "--force", *ROUTES[route]]
    refused(args, tmp_path, capsys, str(dst), "SRC")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("route", ROUTES)
def test_a_linked_destination_has_its_target_replaced_and_nothing_left_beside(route, tmp_path):
    src = saved_family(tmp_path / "src")
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
    src = saved_family(tmp_path / "src")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "file").chmod(0o755)  # writable and "executable": only the write itself failed ([Errno 20])
    dst = tmp_path / "file" / "out"
    refused(["convert", str(src), str(dst), "--variant", "geglu"], tmp_path, capsys, str(dst), "is a file")


@pytest.mark.parametrize("error", ["SafetensorError", "OSError"])
def test_disk_full_during_the_in_memory_write_is_one_line(error, tmp_path, capsys, monkeypatch):
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    src = saved_family(tmp_path / "src")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    dst = tmp_path / "out"
    refused(["convert", str(src), str(dst), "--variant", "geglu", "--eval-tokens", "16"], tmp_path, capsys,
             str(dst), "cannot be written")  # fmt: skip


def test_a_destination_holding_the_hub_cache_is_refused_for_a_hub_source(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / ".cache" / "huggingface" / "hub"))
    (tmp_path / "home" / ".cache" / "huggingface" / "hub").mkdir(parents=True)
    (tmp_path / "home" / "notes.txt").write_text("the user's own files")
    args = ["convert", "someone/some-model", str(tmp_path / "home"), "--variant", "geglu", "--force"]
    refused(args, tmp_path, capsys, str(tmp_path / "home"), "SRC")


def _one_line(err: str) -> str:
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("state", ["absent", "empty folder"])
def test_a_file_made_in_dst_during_the_write_is_kept_and_the_conversion_fails(state, route, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    import hf_glu.convert.pipeline as module  # both routes render the card through it, after the weights

    src = saved_family(tmp_path / "src")
    dst = tmp_path / "out"
    if state == "empty folder":
        dst.mkdir()
    render = module.render_conversion_card

    def user_writes_meanwhile(*args, **kwargs):  # the weights are written, the swap is yet to come
        dst.mkdir(exist_ok=True)
        (dst / "notes.txt").write_text("the user's own notes")
        return render(*args, **kwargs)

    monkeypatch.setattr(module, "render_conversion_card", user_writes_meanwhile)
    before = tree(tmp_path)
    capsys.readouterr()
    code = main(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and str(dst) in line, line
    notes = hashlib.sha256(b"the user's own notes").hexdigest()
    assert tree(tmp_path) == {**before, "out": "dir", "out/notes.txt": notes}


# Run as `python -c BARRIER... convert ...`: each conversion waits, its checks passed and its weights written,
# until the other has got as far, so both swaps come after both checks: the race two terminals can hit, every time.
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

    src = saved_family(tmp_path / "src")
    dst = tmp_path / "out"
    (tmp_path / "sync").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_GLU_TEST_SYNC": str(tmp_path / "sync")}
    source_before = tree(src)
    command = [sys.executable, "-c", BARRIER, "convert", str(src), str(dst), "--variant", "geglu", "--no-eval"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    line = _one_line(next(err for code, err in results if code == 2))
    assert str(dst) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "sync"]
    assert tree(src) == source_before
    written = AutoModelForCausalLM.from_pretrained(dst).eval()  # the one result, complete
    ids = torch.randint(0, 101, (1, 12))
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    assert (_logits(written, ids) - _logits(source, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("where", ["DST is the loop", "DST lies under the loop"])
def test_a_destination_in_a_symlink_loop_is_refused_in_one_line(where, tmp_path, capsys):
    src = saved_family(tmp_path / "src")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    dst = loop if where == "DST is the loop" else loop / "out"
    refused(["convert", str(src), str(dst), "--variant", "geglu", "--no-eval"], tmp_path, capsys, str(dst),
             "symlink loop")  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_a_destination_name_of_245_characters_converts(route, tmp_path):
    src = saved_family(tmp_path / "src")
    dst = tmp_path / ("m" * 245)  # legal (NAME_MAX is 255), but ".NAME.tmp-PID-RANDOM" beside it would not be
    assert main(["convert", str(src), str(dst), "--variant", "geglu", *ROUTES[route]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", dst.name])
    assert AutoModelForCausalLM.from_pretrained(dst).config.glu_variant == "geglu"


def test_a_destination_name_longer_than_the_filesystem_takes_is_refused_before_any_work(tmp_path, capsys,
                                                                                        monkeypatch):  # fmt: skip
    import hf_glu.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("the source was read"))
    src = saved_family(tmp_path / "src")
    dst = tmp_path / "new" / ("m" * 256)
    refused(["convert", str(src), str(dst), "--variant", "geglu"], tmp_path, capsys, "m" * 256, "255")
