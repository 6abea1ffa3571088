"""Atomic checkpoint writes: everything goes to a temporary folder beside the destination, swapped into place
only once complete, so a failure or a kill at any point leaves the destination exactly as it was.

- The temporary folder is named ``.DST.tmp-<pid>-<random>``: a later run finds those of dead processes
  (a SIGKILL leaves one behind) and removes them; those of live processes are left alone.
- The swap with an existing destination is one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux: at every
  instant DST is either the old folder or the new one, never missing. Elsewhere (or on a filesystem without
  it) the old folder is moved aside first and moved back if the second rename fails.
- SIGINT, SIGTERM and SIGHUP are held back during the swap and the removal of the old folder, so a
  signal cannot split them; the CLI turns those signals into exceptions, and the temporary folder is
  deleted on the way out.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_destination(dst: str | Path, force: bool) -> Path:
    """Refuse a destination that is a file, or a non-empty folder unless ``force``; returns it as a Path."""
    if not isinstance(dst, (str, Path)) or not str(dst).strip():
        raise ConversionError(f"destination {dst!r} is invalid; expected a folder path")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {str(dst)!r} is a file; expected a folder path")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"destination {str(dst)!r} is not empty; pass --force (force=True) to replace it")
    parent = dst.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"destination {str(dst)!r} cannot be written: {str(parent)!r} is read-only to us")
    return dst


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
def atomic_folder(dst: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on a clean exit it replaces ``dst``, otherwise it is deleted."""
    dst = check_destination(dst, force)
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
        with _signals_held():
            _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (they are delivered then); main thread only."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
