"""A conversion stopped by a signal at any point leaves DST as it was and nothing beside it; a SIGKILLed one
leaves a temporary folder that the next run removes."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_glu import cli
from hf_glu.convert.save import atomic_folder, stale_siblings

from helpers import tree

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A GPT-2 with a full-size vocabulary, so writing its weights takes long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("signals") / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(folder)
    return folder


def _tmp_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".dst.")]


def _when_tmp_exists(parent: Path) -> bool:
    return bool(_tmp_folders(parent))


def _when_writing_weights(parent: Path) -> bool:
    return any(any(t.rglob("*.safetensors")) for t in _tmp_folders(parent))


def _when_card_written(parent: Path) -> bool:
    return any(any(t.rglob("README.md")) for t in _tmp_folders(parent))


def _after(seconds: float):
    start = time.monotonic()
    return lambda parent: time.monotonic() - start > seconds


@pytest.mark.parametrize(
    "signum, moment",
    [
        (signal.SIGTERM, _after(1.0)),
        (signal.SIGTERM, _when_tmp_exists),
        (signal.SIGTERM, _when_writing_weights),
        (signal.SIGHUP, _when_writing_weights),
        (signal.SIGINT, _when_writing_weights),
        (signal.SIGTERM, _when_card_written),
    ],
    ids=["term-early", "term-tmp-created", "term-writing", "hup-writing", "int-writing", "term-before-swap"],
)
def test_a_signal_at_any_point_leaves_dst_as_it_was(source, tmp_path, signum, moment):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("an earlier conversion")
    command = [sys.executable, "-m", "hf_glu.cli", "convert", str(source), str(dst), "--variant", "geglu_tanh",
               "--force", "--eval-tokens", "16"]  # fmt: skip
    # Python turns SIGINT into KeyboardInterrupt only where it starts with the default action (a shell's background
    # job inherits SIGINT ignored): give the child the default, as a terminal's Ctrl-C finds it.
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while process.poll() is None and not moment(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:  # finished before the signal landed: then DST is the whole new checkpoint
        assert (dst / "config.json").is_file() and not (dst / "keep.txt").exists()
    else:
        # Still importing (no handler yet, nothing written): the default action ends the process; once the
        # CLI runs, the signal is an exception that cleans up and exits 128 + signum.
        assert process.returncode in (128 + signum, -signum), err[-2000:]
        if process.returncode > 0:
            assert ("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}") in err
        assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"], "debris left beside DST"


def test_sigkill_debris_is_swept_by_the_next_run(tmp_path):
    # A real run killed mid-write leaves its temporary folder: the next run proves it is ours and removes it.
    script = textwrap.dedent(
        """
        import os, pathlib, signal, sys, types
        import hf_glu  # light: the conversion package's __init__ (torch, transformers) is skipped below
        convert = types.ModuleType("hf_glu.convert")
        convert.__path__ = [str(pathlib.Path(hf_glu.__file__).parent / "convert")]
        sys.modules["hf_glu.convert"] = convert
        from hf_glu.convert.save import atomic_folder
        with atomic_folder(sys.argv[1], force=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dst")], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (debris,) = tmp_path.iterdir()
    assert stale_siblings(tmp_path / "dst") == [debris]
    with atomic_folder(tmp_path / "dst", force=False) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not debris.exists()
        assert stale_siblings(tmp_path / "dst") == [], "a live conversion's folder is never debris"
    assert (tmp_path / "dst" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


@pytest.mark.parametrize("marker_bytes", [None, 0, 5], ids=["before-the-marker", "empty-marker", "marker-cut-short"])
def test_a_kill_between_the_folder_and_its_marker_leaves_debris_the_next_run_removes(marker_bytes, tmp_path):
    # SIGKILL cannot be deferred: a run killed after the temporary folder's mkdir and before its marker is whole
    # leaves a folder of exactly our name holding nothing of value, which the next run must sweep.
    script = textwrap.dedent(
        """
        import os, pathlib, signal, sys, types
        import hf_glu
        convert = types.ModuleType("hf_glu.convert")
        convert.__path__ = [str(pathlib.Path(hf_glu.__file__).parent / "convert")]
        sys.modules["hf_glu.convert"] = convert
        from hf_glu.convert import save

        def write_then_die(path, data):
            if path.name == save._MARKER:
                if MARKER_BYTES is not None:
                    with open(path, "wb") as f:
                        f.write(data[:MARKER_BYTES])
                os.kill(os.getpid(), signal.SIGKILL)
            return path.write_text(data.decode())

        pathlib.Path.write_bytes = write_then_die
        with save.atomic_folder(sys.argv[1], force=False):
            pass
        """
    ).replace("MARKER_BYTES", repr(marker_bytes))
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dst")], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (debris,) = tmp_path.iterdir()
    assert [p.name for p in debris.iterdir()] == ([] if marker_bytes is None else [".hf-glu-temporary"])
    assert stale_siblings(tmp_path / "dst") == [debris]
    with atomic_folder(tmp_path / "dst", force=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_user_folders_that_merely_look_like_debris_are_kept(tmp_path):
    """A name pattern and a dead "pid" prove nothing; only a folder this tool marked is debris (or one of our
    exact name holding nothing, or only a prefix of our marker: a kill between mkdir and marker leaves those)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lookalikes = [".m.old-20240501-good", f".m.tmp-{dead.pid}-abcd1234", f".m.old-{dead.pid}-0123456789abcdef",
                  f".m.tmp-{dead.pid}-0123456789abcdef"]  # fmt: skip
    for name in lookalikes:
        (tmp_path / name).mkdir()
        (tmp_path / name / "backup.safetensors").write_bytes(b"the user's backup")
    # Our exact name with a marker file that is not a prefix of ours, or a marker prefix beside a user's file.
    for name, extra in ((f".m.tmp-{dead.pid}-fedcba9876543210", False), (f".m.tmp-{dead.pid}-aaaaaaaaaaaaaaaa", True)):
        (tmp_path / name).mkdir()
        marker = b"not hf-glu's" if not extra else b"hf-glu aaaa"
        (tmp_path / name / ".hf-glu-temporary").write_bytes(marker)
        if extra:
            (tmp_path / name / "notes.txt").write_text("the user's notes")
    before = tree(tmp_path)
    assert stale_siblings(tmp_path / "m") == []
    with atomic_folder(tmp_path / "m", force=False) as tmp:
        (tmp / "config.json").write_text("{}")
    after = tree(tmp_path)
    assert after == {**before, "m": "dir", "m/config.json": after["m/config.json"]}


def test_replacing_dst_is_one_atomic_exchange(tmp_path, monkeypatch):
    import hf_glu.convert.save as save

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    renames = []
    monkeypatch.setattr(save.os, "rename", lambda *a: renames.append(a) or os.rename(*a))
    with atomic_folder(dst, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert renames == [], "the exchange needs no rename that could leave DST missing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_an_error_from_clean_up_the_signal_cut_into_still_reports_the_signal(monkeypatch, capsys):
    # A signal can land inside a library's clean-up, whose own error (here EBADF, as a descriptor closed twice)
    # then surfaces instead of the signal: still a stop by SIGTERM, never "bad input".
    def interrupted(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        finally:
            raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "SUBCOMMANDS", ((cli.add_demo, interrupted),))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["demo"]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_a_signal_during_the_swap_does_not_report_a_stop_after_the_commit(tmp_path, monkeypatch):
    """The swap is the commit: a SIGTERM held during it is taken, with a warning, not delivered as a stop
    (which would exit 143 with the new folder in place: 'stopped' would be false)."""
    import hf_glu.convert.save as save

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("an earlier conversion")
    swap_in = save._swap_in

    def swap_in_while_signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # held: pending until the swap is done
        swap_in(*args)

    def stop(signum, frame):
        raise KeyboardInterrupt("delivered")

    monkeypatch.setattr(save, "_swap_in", swap_in_while_signalled)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.warns(UserWarning, match="SIGTERM arrived while"):
            with atomic_folder(dst, force=True) as tmp:
                (tmp / "config.json").write_text("{}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain rename"])
@pytest.mark.parametrize("state", ["absent", "empty folder", "force"])
def test_the_swap_takes_place_only_onto_what_was_checked(state, renameat2, tmp_path, monkeypatch):
    """At the level of atomic_folder and with both kinds of rename: a folder someone filled during
    the write is left as they made it (without force), and the error names DST."""
    import hf_glu.convert.save as save
    from hf_glu.convert import ConversionError

    if not renameat2:  # another OS, an old libc or a filesystem without the flags
        monkeypatch.setattr(save, "_renameat2", lambda a, b, flags: False)
    dst = tmp_path / "dst{0}"  # braces: the message is not a format string
    if state != "absent":
        dst.mkdir()
    if state == "force":
        (dst / "old.txt").write_text("an earlier conversion")
    with atomic_folder(dst, force=True) as tmp:  # force: replaced whatever is there, nothing left beside
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json"]
    if state == "force":
        return
    dst.joinpath("config.json").unlink()
    if state == "absent":
        dst.rmdir()
    with pytest.raises(ConversionError, match="changed while this conversion was writing") as raised:
        with atomic_folder(dst, force=False) as tmp:
            (tmp / "config.json").write_text("{}")
            dst.mkdir(exist_ok=True)
            (dst / "notes.txt").write_text("mine")
    assert str(dst) in str(raised.value)
    assert tree(tmp_path) == {"dst{0}": "dir", "dst{0}/notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_a_signal_while_the_temporary_folder_is_made_still_removes_it(tmp_path, monkeypatch):
    """The stop lands between the temporary folder's mkdir and the moment it is known to need removing."""
    from hf_glu.convert import save

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    made = save._make_temporary

    def make_then_signal(dst):
        folder = made(dst)
        signal.raise_signal(signal.SIGTERM)  # the handler raises here, before the caller holds the folder
        return folder

    monkeypatch.setattr(save, "_make_temporary", make_then_signal)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped), atomic_folder(tmp_path / "dst", force=False):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == [], "the temporary folder was left behind"
