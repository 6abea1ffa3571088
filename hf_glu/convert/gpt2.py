"""GPT-2 → GLU: the config mapping and the weight mapping.

GPT-2 stores its projections as ``Conv1D`` (weight ``[in, out]``); ours are ``nn.Linear`` (``[out, in]``),
so every projection is transposed, and the fused ``c_attn`` is split into ``q_proj``/``k_proj``/``v_proj``.
The MLP goes through an init scheme (:mod:`.init_schemes`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GPT2Config, PreTrainedModel

from ..configuration_glu import GluConfig
from ..modeling_glu import (
    GluForCausalLM,
    GluForSequenceClassification,
    GluForTokenClassification,
    GluModel,
    GluPreTrainedModel,
)
from .checkpoint_names import head_is_tied
from .errors import ConversionError
from .init_schemes import UnitMap, check_scheme, preserved_projections

TARGET_CLASSES: dict[str, type[GluPreTrainedModel]] = {
    "GPT2LMHeadModel": GluForCausalLM,
    "GPT2Model": GluModel,
    "GPT2ForSequenceClassification": GluForSequenceClassification,
    "GPT2ForTokenClassification": GluForTokenClassification,
}

# GPT-2 fields with no GLU counterpart: the activation is replaced by the variant, and the summary_*
# fields belong to GPT2DoubleHeadsModel, which we do not convert. n_ctx is a pre-2020 alias of n_positions.
_DROPPED_FIELDS = (
    "activation_function",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "summary_last_dropout",
    "add_cross_attention",
    "n_ctx",
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "auto_map",
    "dtype",
    "torch_dtype",
)


def target_class(source: PreTrainedModel) -> type[GluPreTrainedModel]:
    return TARGET_CLASSES[type(source).__name__]


def convert_config(source: PreTrainedModel, variant: str, init: str, intermediate_size: int | None) -> GluConfig:
    """The GluConfig equal to ``source.config`` in every GPT-2 field, with the GLU MLP chosen."""
    src: GPT2Config = source.config
    if getattr(src, "add_cross_attention", False):
        raise ConversionError(
            "add_cross_attention=True is not supported: GLU models are decoder-only, without cross-attention"
        )
    source_inner = src.n_inner if src.n_inner is not None else 4 * src.n_embd
    check_scheme(variant, init, src.activation_function, intermediate_size, source_inner)
    values = {k: v for k, v in src.to_dict().items() if k not in _DROPPED_FIELDS}
    target = target_class(source)
    values.update(
        n_inner=intermediate_size or source_inner,
        glu_variant=variant,
        mlp_bias=True,  # GPT-2's MLP has biases, and the preserve scheme puts constants in them
        architectures=[target.__name__],
        tie_word_embeddings=head_is_tied(source),  # as loaded, not as the config says
    )
    if target is GluForTokenClassification:
        # GPT2ForTokenClassification's dropout falls back to hidden_dropout, then 0.1; ours to resid_pdrop.
        dropout = getattr(src, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(src, "hidden_dropout", None)
        values["classifier_dropout"] = 0.1 if dropout is None else dropout
    try:
        config = GluConfig(**values)
    except ValueError as e:
        raise ConversionError(f"the source config cannot be carried over: {e}") from None
    config._attn_implementation = src._attn_implementation
    return config


def _t(conv1d_weight: torch.Tensor) -> torch.Tensor:
    return conv1d_weight.t().contiguous()


LayerDone = Callable[[int, torch.nn.Module, dict[str, torch.Tensor]], None]


def convert_weights(
    source: PreTrainedModel,
    config: GluConfig,
    unit_maps: list[UnitMap] | None,
    share: bool = False,
    layer_done: LayerDone | None = None,
    mlps: list[dict[str, torch.Tensor | None]] | None = None,
) -> dict[str, torch.Tensor]:
    """The converted state dict; with ``unit_maps`` None (random init) the MLP weights are left out.

    ``share``: the source is ours alone (one loaded from disk), so it is consumed: its unchanged tensors
    (embeddings, norms, biases) are reused instead of copied, and each of its blocks is dropped as soon as
    converted, so the source and the result are never both whole in memory. ``source`` is unusable after.
    ``layer_done(i, source_block, converted)``: called with each block's converted tensors (named as in
    the block, e.g. ``mlp.gate_proj.weight``) while the source block still exists.
    ``mlps``: each block's GLU MLP tensors (``gate_proj.weight``…), used instead of the preserve map.
    """
    take = (lambda v: v.detach()) if share else (lambda v: v.detach().clone())
    blocks = source.h if hasattr(source, "h") else source.transformer.h
    # GPT2Model and GluModel name their weights without the `transformer.` prefix the heads add.
    base = "" if type(source).__name__ == "GPT2Model" else "transformer."
    top = {k: take(v) for k, v in source.state_dict().items() if not k.startswith(f"{base}h.")}
    out: dict[str, torch.Tensor] = {}
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        out[base + name] = top[base + name]
    for i in range(config.n_layer):
        sd = {k: take(v) for k, v in blocks[i].state_dict().items()}
        layer: dict[str, torch.Tensor] = {}
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            layer[name] = sd[name]
        for proj, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            _t(sd["attn.c_attn.weight"]).chunk(3, dim=0),
            sd["attn.c_attn.bias"].chunk(3, dim=0),
            strict=True,
        ):
            layer[f"attn.{proj}.weight"] = w.contiguous()
            layer[f"attn.{proj}.bias"] = b
        layer["attn.o_proj.weight"] = _t(sd["attn.c_proj.weight"])
        layer["attn.o_proj.bias"] = sd["attn.c_proj.bias"]
        if mlps is not None:  # fitted elsewhere (a width-reduced conversion, hf_glu.convert.width)
            layer.update({f"mlp.{k}": v for k, v in mlps[i].items()})
        elif unit_maps is not None:
            layer.update(_preserved_mlp(sd, unit_maps[i]))
        del sd
        if layer_done is not None:
            layer_done(i, blocks[i], layer)
        if share:  # the block's own tensors are converted: let them go
            blocks[i] = torch.nn.Module()
        out.update({f"{base}h.{i}.{k}": v for k, v in layer.items()})
    for head in ("lm_head.weight", "score.weight", "classifier.weight", "classifier.bias"):
        if head in top and not (head == "lm_head.weight" and config.tie_word_embeddings):
            out[head] = top[head]
    return out


def _preserved_mlp(sd: dict[str, torch.Tensor], m: UnitMap) -> dict[str, torch.Tensor]:
    projections = preserved_projections(
        _t(sd["mlp.c_fc.weight"]), sd["mlp.c_fc.bias"], _t(sd["mlp.c_proj.weight"]), sd["mlp.c_proj.bias"], m
    )
    return {f"mlp.{k}": v for k, v in projections.items()}
