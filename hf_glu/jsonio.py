"""Strict JSON, the one way hf_glu writes results (CLI, recipes, demo, benchmarks): a diverged run's NaN or inf
becomes ``null``, never the bare ``NaN``/``Infinity`` that Python's json writes and other parsers reject."""

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


def strict_json(data) -> str:
    """``data`` as indented strict JSON text (no trailing newline)."""
    return json.dumps(without_non_finite(data), indent=2, allow_nan=False)


def write_json(path: str | Path, data) -> None:
    """Write ``data`` to ``path`` as strict JSON (UTF-8, one trailing newline)."""
    Path(path).write_text(strict_json(data) + "\n", encoding="utf-8")
