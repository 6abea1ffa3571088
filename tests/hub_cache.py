"""A checkpoint laid out exactly as huggingface_hub's cache lays out a downloaded snapshot, built by hand (no network):

    <cache>/models--<org>--<name>/
        blobs/<sha256 of the content>           the files' bytes
        refs/main                               the revision (40 hex digits, no newline)
        snapshots/<revision>/<file>             relative links: ../../blobs/<sha256> (deeper for subfolders)

``snapshot_download(repo_id, cache_dir=<cache>)`` offline resolves ``refs/main`` and returns the snapshot folder;
Transformers loads it like any folder. Every route that reads a source is tested on this layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def hub_snapshot(saved: Path, cache: Path, repo_id: str = "org/tiny") -> Path:
    """Copy the saved checkpoint folder ``saved`` into the Hub cache ``cache`` as the snapshot of ``repo_id``'s
    ``main``; returns the snapshot folder (``saved`` is left as it is)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    revision = hashlib.sha1("".join(f"{p.relative_to(saved)}:{h}" for p, h in hashes.items()).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for path, digest in hashes.items():
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # ../../blobs/<sha256>, as huggingface_hub writes
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
