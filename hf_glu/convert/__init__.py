"""GLU surgery for GPT-2-style checkpoints: :func:`convert_checkpoint` in memory, :func:`convert_to_folder` to a
Hub-ready checkpoint."""

from .errors import ConversionError
from .pipeline import (
    DEFAULT_EVAL_TOKENS,
    Conversion,
    convert,
    convert_checkpoint,
    convert_gpt2,
    convert_to_folder,
    write_checkpoint,
)

__all__ = [
    "ConversionError",
    "Conversion",
    "DEFAULT_EVAL_TOKENS",
    "convert",
    "convert_checkpoint",
    "convert_gpt2",
    "convert_to_folder",
    "write_checkpoint",
]
