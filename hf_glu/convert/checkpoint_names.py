"""A checkpoint's tensor names and headers against the model a config builds, checked before any tensor is read.

Checkpoints name their tensors as the model class did when they were saved: with or without the base
model's prefix, or under legacy names that Transformers renames on load (GPT-NeoX's ``embed_out``). This
maps each name onto the model's, as Transformers would, and refuses what does not fit: unknown names,
missing tensors, and shapes or dtypes other than the config implies.
"""

from __future__ import annotations

import re

import torch

from .errors import ConversionError
from .safetensors_io import Entry


class CheckpointNames:
    """The model's tensors (from a meta-device ``skeleton``) and the rules mapping a checkpoint's names onto them."""

    def __init__(self, skeleton: torch.nn.Module):
        self.expected = dict(skeleton.state_dict())
        self.prefix = skeleton.base_model_prefix
        self.ignored = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or []]
        self.renamings = _renamings(skeleton)
        self.saved_renamings = _renamings(skeleton, reverse=True)
        self.seen: set[str] = set()
        # The heads a tied model takes from its embedding (GPT-2's lm_head, BioGPT's output_projection,
        # GPT-NeoX-Japanese's embed_out): a checkpoint saved tied leaves them out.
        self.tied = tied_targets(skeleton)

    def model_name(self, key: str) -> str | None:
        """The model's name for the checkpoint's ``key``; ``None`` for keys the family ignores on load."""
        for pattern, replacement in self.renamings:
            key = pattern.sub(replacement, key)
        for candidate in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            if candidate in self.expected:
                self.seen.add(candidate)
                return candidate
        if any(p.search(key) for p in self.ignored):
            return None
        raise ConversionError(f"the checkpoint holds {key!r}, which the model does not have")

    def saved_name(self, name: str) -> str:
        """The name Transformers' own ``save_pretrained`` writes for the model's tensor ``name``: the family's
        renamings reversed (GPT-NeoX's ``lm_head`` is saved as ``embed_out``)."""
        for pattern, replacement in self.saved_renamings:
            name = pattern.sub(replacement, name)
        return name

    def check_entry(self, entry: Entry, name: str) -> None:
        """Refuse a tensor whose shape or kind of dtype is not what the config implies for ``name``."""
        expected = self.expected[name]
        if entry.shape != tuple(expected.shape) or entry.dtype.is_floating_point != expected.is_floating_point():
            kind = "a floating-point" if expected.is_floating_point() else "an integer"
            raise ConversionError(
                f"weight {entry.name!r} is {entry.dtype} of shape {entry.shape}; the config expects {kind} tensor "
                f"of shape {tuple(expected.shape)}"
            )

    def check_complete(self) -> None:
        missing = sorted(set(self.expected) - self.seen - set(self.tied))
        if missing:
            more = " …" if len(missing) > 5 else ""
            raise ConversionError(f"weights missing from the checkpoint: {missing[:5]}{more}")


def tied_targets(model: torch.nn.Module) -> dict[str, str]:
    """``{head weight: embedding weight}`` for the weights ``model`` ties (none when its config unties them)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    return dict(getattr(model, "_tied_weights_keys", None) or {})


def head_is_tied(model: torch.nn.Module) -> bool:
    """Whether ``model`` as it is now computes its logits with its input embedding (one shared tensor):
    the tying a conversion keeps, whatever the config says (Transformers unties a checkpoint whose file
    holds a head that differs from the embedding)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return bool(getattr(model.config, "tie_word_embeddings", False))
    if head.weight is embedding.weight:
        return True
    # Two tensors on one storage are tied too; meta tensors (a skeleton's) have no storage to compare.
    return not head.weight.is_meta and head.weight.data_ptr() == embedding.weight.data_ptr()


def _renamings(model: torch.nn.Module, reverse: bool = False) -> list[tuple[re.Pattern, str]]:
    """The plain renamings Transformers applies when loading this class's checkpoints (``reverse``: when saving
    them, in the order it applies them); checkpoints needing more than renaming are refused."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a Transformers without conversion mappings renames nothing
        return []
    transforms = get_checkpoint_conversion_mapping(type(model).__name__)
    if transforms is None:
        transforms = get_checkpoint_conversion_mapping(model.config.model_type) or []
    renamings = []
    for t in transforms[::-1] if reverse else transforms:
        t = t.reverse_transform() if reverse else t
        sources, targets = getattr(t, "source_patterns", None), getattr(t, "target_patterns", None)
        if type(t).__name__ != "WeightRenaming" or sources is None or targets is None:
            raise ConversionError(f"{type(model).__name__} checkpoints need weight conversions beyond renaming")
        sources = [sources] if isinstance(sources, str) else sources
        targets = [targets] * len(sources) if isinstance(targets, str) else targets
        renamings += [(re.compile(s), t) for s, t in zip(sources, targets, strict=True)]
    return renamings
