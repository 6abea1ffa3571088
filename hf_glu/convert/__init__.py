"""GLU surgery for a source checkpoint of any supported family (GPT-2 and ``hf_glu.FAMILIES``):
:func:`convert_checkpoint` in memory, :func:`convert_to_folder` to a Hub-ready checkpoint, both taking the
options of :class:`ConvertOptions`."""

from .errors import ConversionError
from .pipeline import (
    DEFAULT_EVAL_TOKENS,
    Conversion,
    ConvertOptions,
    convert,
    convert_checkpoint,
    convert_gpt2,
    convert_to_folder,
    write_checkpoint,
)

__all__ = [
    "ConversionError",
    "Conversion",
    "ConvertOptions",
    "DEFAULT_EVAL_TOKENS",
    "convert",
    "convert_checkpoint",
    "convert_gpt2",
    "convert_to_folder",
    "write_checkpoint",
]
