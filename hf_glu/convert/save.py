"""Atomic checkpoint writes: everything goes to a temporary folder beside the destination, swapped into place
only once complete, so a failure or a kill at any point leaves the destination exactly as it was.

- The temporary folder is named ``.DST.tmp-<pid>-<random>``: a later run finds those of dead processes
  (a SIGKILL leaves one behind) and removes them; those of live processes are left alone.
- The swap with an existing destination is one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux: at every
  instant DST is either the old folder or the new one, never missing. Elsewhere (or on a filesystem without
  it) the old folder is moved aside first and moved back if the second rename fails.
- SIGINT, SIGTERM and SIGHUP are recorded, not acted on, during the swap and the removal of the old folder,
  so a signal cannot split them; one that arrived then came after the commit and is reported as a warning.
  Before the swap, the CLI turns those signals into exceptions, and the temporary folder is deleted on the
  way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_destination(dst: str | Path, force: bool, src: str | Path | None = None) -> Path:
    """Refuse a destination that is a file, lies under a file, is a non-empty folder without ``force``, or
    overlaps the source ``src`` (its folder, or the Hub cache for a Hub id: the same folder, inside it or
    above it, where replacing it would delete the source); returns the path to write. A link to a folder is
    followed: its target is replaced and the link kept, so nothing is left beside either."""
    if not isinstance(dst, (str, Path)) or not str(dst).strip():
        raise ConversionError(f"destination {dst!r} is invalid; expected a folder path")
    given = str(dst)
    dst = Path(dst)
    if dst.is_symlink():
        dst = dst.resolve()
    if src is not None:
        _check_apart(given, dst.resolve(), _source_location(src))
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {given!r} is a file; expected a folder path")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"destination {given!r} is not empty; pass --force (force=True) to replace it")
    parent = dst.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():  # otherwise the write fails with a bare "[Errno 20] Not a directory"
        raise ConversionError(
            f"destination {given!r} lies under {str(parent)!r}, which is a file; expected a folder path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"destination {given!r} cannot be written: {str(parent)!r} is read-only to us")
    return dst


def _source_location(src: str | Path) -> Path:
    """Where the source's files are: its folder, or for a Hub id the Hub cache its snapshot is read from."""
    if Path(src).exists():
        return Path(src).resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).resolve()


def _check_apart(given: str, dst: Path, src: Path) -> None:
    """``dst`` and ``src`` (both resolved, links followed) must be apart: neither inside the other."""
    if dst == src:
        relation = "is SRC itself"
    elif dst.is_relative_to(src):
        relation = f"lies inside SRC {str(src)!r}"
    elif src.is_relative_to(dst):
        relation = f"holds SRC {str(src)!r}, which replacing it would delete"
    else:
        return
    raise ConversionError(f"destination {given!r} {relation}; expected a folder outside SRC that does not contain it")


@contextmanager
def writing_to(dst: Path) -> Iterator[None]:
    """Turn a failed write (disk full, quota, I/O error; safetensors reports these as SafetensorError) into
    one line naming the destination."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ConversionError(
            f"destination {str(dst)!r} cannot be written ({type(e).__name__}: {e}); expected a folder with room "
            "for the checkpoint and write permission"
        ) from None


def stale_siblings(dst: Path) -> list[Path]:
    """Temporary folders beside ``dst`` left by conversions whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(tmp|old)-(\d+)-")
    stale = []
    for path in dst.parent.glob(f".{dst.name}.*-*") if dst.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def atomic_folder(dst: str | Path, force: bool, src: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on a clean exit it replaces ``dst``, otherwise it is deleted
    together with the parent folders made for it. ``src``: the source, which ``dst`` must not overlap."""
    dst = check_destination(dst, force, src)
    made = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in stale_siblings(dst):  # debris of killed runs
        shutil.rmtree(path, ignore_errors=True)
    # Beside the destination, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the checkpoint's mode
    try:
        yield tmp
        with _signals_deferred() as late:
            _swap_in(tmp, dst)
        if late:
            # The swap is the commit: a stop signal that arrived during it came too late to stop anything;
            # acted on now, it would report "stopped" with the new folder already in place.
            warnings.warn(
                f"{signal.Signals(late[0]).name} arrived while {str(dst)!r} was being swapped in; the conversion "
                "had completed, so it was not stopped",
                stacklevel=2,
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first: a refusal leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM/SIGHUP during the block instead of acting on them (main thread only); yields the
    list they are recorded in. If the block fails, they are raised again afterwards.

    Python handlers rather than a signal mask: a mask holds signals for the calling thread only, and a signal
    sent to the process goes to any thread that does not block it (torch starts several), so a masked
    main thread still ran the stop handler in the middle of the swap."""
    arrived: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in _HELD_SIGNALS}
    except ValueError:  # not the main thread: signals are the main thread's business
        yield arrived
        return
    failed = True
    try:
        yield arrived
        failed = False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if failed:
            for signum in arrived:
                signal.raise_signal(signum)


def _swap_in(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(tmp, dst)
        return
    if _exchange(tmp, dst):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # Move the old folder aside first: if the second rename fails, it goes back untouched.
    backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{os.getpid()}-", dir=dst.parent))
    backup.rmdir()
    os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
