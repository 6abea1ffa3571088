"""The longest sequence a model's config says it attends over, whatever its family calls that field."""

from __future__ import annotations

# Each family names its limit its own way; the first field a config has wins. GPT-2-style configs alias
# max_position_embeddings to n_positions; MPT has only max_seq_len (ALiBi: its attention bias is built that
# long); ChatGLM/Qwen-1 say seq_length; n_ctx is the pre-2020 GPT-2 name.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                    "n_ctx")  # fmt: skip


def max_positions(config) -> int | None:
    """The position limit ``config`` states (of its text model, for a composite config), or ``None`` when it
    states none (BLOOM: ALiBi, any length)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in _POSITION_FIELDS:
        value = getattr(text_config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
