"""GPT-2 → GLU: the config mapping and the weight mapping.

GPT-2 stores its projections as ``Conv1D`` (weight ``[in, out]``); ours are ``nn.Linear`` (``[out, in]``),
so every projection is transposed, and the fused ``c_attn`` is split into ``q_proj``/``k_proj``/``v_proj``.
The MLP goes through an init scheme (:mod:`.init_schemes`).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, PreTrainedModel

from ..configuration_glu import GluConfig
from ..glu import get_variant
from ..modeling_glu import (
    GluForCausalLM,
    GluForSequenceClassification,
    GluForTokenClassification,
    GluModel,
    GluPreTrainedModel,
)
from .errors import ConversionError
from .init_schemes import UnitMap, check_activation

TARGET_CLASSES: dict[str, type[GluPreTrainedModel]] = {
    "GPT2LMHeadModel": GluForCausalLM,
    "GPT2Model": GluModel,
    "GPT2ForSequenceClassification": GluForSequenceClassification,
    "GPT2ForTokenClassification": GluForTokenClassification,
}
INIT_SCHEMES = ("preserve", "random")

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
    try:
        get_variant(variant)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if init not in INIT_SCHEMES:
        raise ConversionError(f"init={init!r} is not a known init scheme; expected one of {list(INIT_SCHEMES)}")
    if getattr(src, "add_cross_attention", False):
        raise ConversionError(
            "add_cross_attention=True is not supported: GLU models are decoder-only, without cross-attention"
        )
    check_activation(src.activation_function)
    source_inner = src.n_inner if src.n_inner is not None else 4 * src.n_embd
    if init == "preserve" and intermediate_size not in (None, source_inner):
        raise ConversionError(
            f"intermediate_size={intermediate_size} cannot be used with init='preserve', which keeps the source's "
            f"{source_inner}; use init='random' for another size"
        )
    values = {k: v for k, v in src.to_dict().items() if k not in _DROPPED_FIELDS}
    target = target_class(source)
    values.update(
        n_inner=intermediate_size or source_inner,
        glu_variant=variant,
        mlp_bias=True,  # GPT-2's MLP has biases, and the preserve scheme puts constants in them
        architectures=[target.__name__],
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


def convert_weights(
    source: PreTrainedModel, config: GluConfig, unit_maps: list[UnitMap] | None, share: bool = False
) -> dict[str, torch.Tensor]:
    """The converted state dict; with ``unit_maps`` None (random init) the MLP weights are left out.

    ``share``: reuse the source's unchanged tensors (embeddings, norms, biases) instead of copying them,
    for a source nobody else holds (one loaded from disk): it saves their memory during conversion.
    """
    sd = {k: v.detach() if share else v.detach().clone() for k, v in source.state_dict().items()}
    # GPT2Model and GluModel name their weights without the `transformer.` prefix the heads add.
    base = "" if type(source).__name__ == "GPT2Model" else "transformer."
    out_base = base
    out: dict[str, torch.Tensor] = {}
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        out[out_base + name] = sd[base + name]
    for i in range(config.n_layer):
        src, dst = f"{base}h.{i}.", f"{out_base}h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            out[dst + name] = sd[src + name]
        for proj, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            _t(sd[src + "attn.c_attn.weight"]).chunk(3, dim=0),
            sd[src + "attn.c_attn.bias"].chunk(3, dim=0),
            strict=True,
        ):
            out[f"{dst}attn.{proj}.weight"] = w.contiguous()
            out[f"{dst}attn.{proj}.bias"] = b
        out[dst + "attn.o_proj.weight"] = _t(sd[src + "attn.c_proj.weight"])
        out[dst + "attn.o_proj.bias"] = sd[src + "attn.c_proj.bias"]
        if unit_maps is not None:
            out.update(_preserved_mlp(sd, src, dst, unit_maps[i]))
    for head in ("lm_head.weight", "score.weight", "classifier.weight", "classifier.bias"):
        if head in sd and not (head == "lm_head.weight" and config.tie_word_embeddings):
            out[head] = sd[head]
    return out


def _preserved_mlp(sd: dict[str, torch.Tensor], src: str, dst: str, m: UnitMap) -> dict[str, torch.Tensor]:
    """gate = gate_scale·z + gate_shift, up = up_scale·z + up_shift with z = c_fc(x), down = c_proj."""
    w = _t(sd[src + "mlp.c_fc.weight"])
    b = sd[src + "mlp.c_fc.bias"]

    def affine(scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Scale in float64 so the only rounding is the final cast; a zero scale gives exact zeros.
        weight = (w.double() * scale).to(w.dtype)
        bias = (b.double() * scale + shift).to(b.dtype)
        return weight, bias

    gate_w, gate_b = affine(m.gate_scale, m.gate_shift)
    up_w, up_b = affine(m.up_scale, m.up_shift)
    return {
        dst + "mlp.gate_proj.weight": gate_w,
        dst + "mlp.gate_proj.bias": gate_b,
        dst + "mlp.up_proj.weight": up_w,
        dst + "mlp.up_proj.bias": up_b,
        dst + "mlp.down_proj.weight": _t(sd[src + "mlp.c_proj.weight"]),
        dst + "mlp.down_proj.bias": sd[src + "mlp.c_proj.bias"],
    }


def build_model(
    target: type[GluPreTrainedModel], config: GluConfig, state_dict: dict[str, torch.Tensor], seed: int | None
) -> GluPreTrainedModel:
    """``target`` holding ``state_dict``.

    With ``seed`` None every weight must be in ``state_dict``, and the model is built on the meta device
    and takes the tensors as they are (no random init, no copy). With a seed, the weights left out (the
    random scheme's MLP) keep the model's own seeded init.
    """
    if seed is None:
        with torch.device("meta"):
            model = target(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = target(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=seed is None)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = [k for k in missing if k not in tied and (seed is None or ".mlp." not in k)]
    if left or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"weight mapping incomplete: missing {left}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()
