"""Which files of a checkpoint folder may be read: the one decision every route asks (the in-memory and the
streamed conversion, GPT-2's own reader, the recipes' ``--convert-from`` and ``push``).

- A name that a file of the checkpoint gives (a shard in a weight index) is checked as a name, before any
  path is built from it: a non-empty relative ``str`` without ``..``, a drive, a backslash or a NUL.
- Files are opened as Transformers opens them: ``folder / name``, links followed.
- A link is followed only to a target inside the folder itself or, for a Hub-cache snapshot
  (``models--org--name/snapshots/<rev>``, whose files are links into ``../../blobs/<sha256>``), inside that
  repository's own ``blobs/``. A link anywhere else (``~/secret.json``, another repository's blobs) would
  carry a file that is not the checkpoint's into the converted folder or onto the Hub.
- Code references in an ``auto_map`` (config and tokenizer) name a module file of the folder itself:
  ``module.Class``; ``repo--module.Class`` (another repository's code) and paths are refused.
- The weights are the files Transformers loads: ``model.safetensors`` before its sharded index, then
  ``pytorch_model.bin`` before its index (``modeling_utils._get_resolved_checkpoint_files``, 5.17–5.25).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ConversionError

LINK_RULE = (
    "a link in a checkpoint folder may lead only inside that folder or, in a Hub-cache snapshot, into its "
    "repository's blobs/"
)
SAFETENSORS_FILE = "model.safetensors"  # what the converters write: one file, or shards and this index
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Transformers' order of preference among a folder's weight files: the first present is what it loads.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
# Files whose ``auto_map`` names code that a ``trust_remote_code`` load imports from the folder.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")
# What ``get_class_from_dynamic_module`` resolves inside the folder itself: one module file, one class.
_LOCAL_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class WeightFiles:
    """The weight files Transformers would load from a folder: ``index`` is the sharded index (or None)."""

    files: list[Path]
    index: Path | None

    @property
    def safetensors(self) -> bool:
        return self.files[0].suffix == ".safetensors"


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where links in ``folder`` may lead: the folder itself and, for a Hub-cache snapshot, its repository's
    ``blobs/`` (links resolved: the cache may itself live behind a link)."""
    root = folder.resolve()
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        return root, blobs.resolve()
    return (root,)


def check_link(folder: Path, path: Path, roots: tuple[Path, ...] | None = None) -> Path:
    """``path`` (under ``folder``) when reading it stays where :data:`LINK_RULE` allows; a ConversionError
    naming the file and where it leads otherwise."""
    roots = roots or allowed_roots(folder)
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
        raise ConversionError(f"{str(path)!r} is a link that cannot be followed ({e}); {LINK_RULE}") from None
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise ConversionError(f"{str(path)!r} is a link to {str(target)!r}, outside {str(folder)!r}; {LINK_RULE}")
    return path


# Folders that are no part of a checkpoint: git's, and huggingface_hub's upload metadata; never read by a
# load, never uploaded (huggingface_hub's DEFAULT_IGNORE_PATTERNS).
_NOT_CHECKPOINT = (".git", ".cache")


def check_folder_links(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links to folders not descended into, ``.git`` and ``.cache`` skipped), each
    link checked by :func:`check_link`: a conversion reads the folder as Transformers does (whatever file it
    opens), and ``push`` uploads it whole. Returns the files, relative to ``folder``, in sorted order."""
    roots = allowed_roots(folder)
    files = []
    for parent, dirs, names in os.walk(folder):
        if Path(parent) == folder:
            dirs[:] = [d for d in dirs if d not in _NOT_CHECKPOINT]
        for name in sorted(dirs + names):
            path = Path(parent, name)
            if path.is_symlink():
                check_link(folder, path, roots)
            if path.is_file():
                files.append(path.relative_to(folder))
        dirs[:] = [d for d in dirs if not Path(parent, d).is_symlink()]  # a linked folder is checked, not walked
    return sorted(files)


def check_name(name: object, where: Path) -> str:
    """``name``, a file name that ``where`` (an index) gives, when it is a plain relative name; refused as such,
    never by resolving it (a Hub-cache shard resolves into ``blobs/``, outside the snapshot, by design)."""
    ok = isinstance(name, str) and name.strip() and "\\" not in name and "\0" not in name
    parts = PurePosixPath(name).parts if ok else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or ":" in parts[0] or name.endswith("/"):
        raise ConversionError(
            f"{str(where)!r} names {name!r}, a path outside the checkpoint folder or no file name at all; expected "
            "a relative file name inside it (no '..', no absolute path, no backslash or drive)"
        )
    return name


def source_file(folder: Path, name: str, named_by: Path | None = None) -> Path:
    """The file ``name`` of ``folder`` as Transformers opens it (``folder / name``), after the name (when an
    index gave it) and the link it may be are checked; a missing file is refused naming who named it."""
    if named_by is not None:
        check_name(name, named_by)
    path = check_link(folder, folder / name)
    if not path.is_file():
        by = f" named by {str(named_by)!r}" if named_by is not None else ""
        raise ConversionError(f"weight file {str(path)!r}{by} is missing")
    return path


def weight_files(folder: Path) -> WeightFiles | None:
    """The weight files Transformers would load from ``folder`` (see :data:`WEIGHT_FILES`), each checked by
    :func:`source_file`; ``None`` when there are none."""
    chosen = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if chosen is None:
        return None
    path = source_file(folder, chosen)
    if not chosen.endswith(".index.json"):
        return WeightFiles([path], None)
    return WeightFiles([source_file(folder, name, path) for name in _indexed_names(path)], path)


def _indexed_names(index: Path) -> list[str]:
    """The shard names ``index`` maps weights to, sorted and deduplicated as Transformers reads them."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        values = list(weight_map.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"weight index {str(index)!r} is corrupt: {e}") from None
    names = [check_name(name, index) for name in values]
    suffix = ".safetensors" if index.name == SAFETENSORS_INDEX else ""
    wrong = next((name for name in names if suffix and not name.endswith(suffix)), None)
    if wrong is not None:  # a pickle read as safetensors fails with "header length 8e18 exceeds the file size"
        raise ConversionError(
            f"weight index {str(index)!r} names {wrong!r}; a safetensors index must name .safetensors files"
        )
    if not names:
        raise ConversionError(f"weight index {str(index)!r} names no files; expected its shards in weight_map")
    return sorted(set(names))


def auto_map_problems(folder: Path) -> list[str]:
    """Code references in the ``auto_map`` of ``folder``'s config and tokenizer config that do not name a
    module file of the folder itself (``module.Class``): another repository's (``repo--module.Class``, which
    Transformers would fetch, or resolve against a folder of that name in the current directory) or a path."""
    problems = []
    for name in AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{name} is not readable JSON ({e})")
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map is None:
            continue
        if not isinstance(auto_map, dict):
            problems.append(f"the auto_map of {name} is a {type(auto_map).__name__}; expected a JSON object")
            continue
        for auto, value in auto_map.items():
            for reference in value if isinstance(value, list) else [value]:
                if reference is not None and not (isinstance(reference, str) and _LOCAL_REFERENCE.fullmatch(reference)):
                    problems.append(
                        f"the auto_map of {name} names {reference!r} for {auto}; expected 'module.Class' naming a "
                        "module file of this folder (not another repository's code, not a path)"
                    )
    return problems


def check_source_folder(folder: Path) -> Path:
    """``folder`` when every file in it may be read (:func:`check_folder_links`) and its auto_maps name only
    its own code (:func:`auto_map_problems`); a ConversionError naming the first problem otherwise."""
    check_folder_links(folder)
    problems = auto_map_problems(folder)
    if problems:
        raise ConversionError(f"{str(folder)!r}: {problems[0]}")
    return folder
