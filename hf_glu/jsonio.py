"""Strict JSON, the one way hf_glu writes JSON (CLI, recipes, demo, benchmarks, the conversion's report and shard
index): a diverged run's NaN or inf becomes ``null``, never the bare ``NaN``/``Infinity`` that Python's json writes
and other parsers reject."""

from __future__ import annotations

import json
import math
from pathlib import Path


def without_non_finite(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``: JSON ``null``, never a number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: without_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(v) for v in value]
    return value


def strict_json(data, *, indent: int | None = 2, null_non_finite: bool = True) -> str:
    """``data`` as strict JSON text (no trailing newline); ``indent=None`` gives one line (a JSON-lines record).

    With ``null_non_finite=False`` a NaN or inf raises ValueError instead of becoming ``null``: for data whose maker
    already replaced them (the conversion report), where one left over is a bug to stop on, not to hide."""
    return json.dumps(without_non_finite(data) if null_non_finite else data, indent=indent, allow_nan=False)


def write_json(path: str | Path, data, *, indent: int | None = 2, null_non_finite: bool = True) -> None:
    """Write ``data`` to ``path`` as :func:`strict_json` text (UTF-8, one trailing newline)."""
    Path(path).write_text(strict_json(data, indent=indent, null_non_finite=null_non_finite) + "\n", encoding="utf-8")
