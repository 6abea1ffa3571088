"""The GPT-2-style families we convert, one table row each, and their GLU configs.

A family is a decoder whose MLP is two dense projections around a GELU/ReLU-type activation. Its GLU
version is the family's own Transformers config and model classes, untouched but for the MLP: each row
says where that MLP lives and how the family sizes it, and a config class ``Glu<FamilyConfig>`` (model
type ``glu_<model_type>``) is generated from the row, with the GLU fields added:

- ``glu_variant``, ``glu_beta``, ``glu_alpha``, ``glu_limit``, ``glu_kernel``: as in :class:`GluConfig`.
- ``glu_intermediate_size``: the GLU width; ``None`` keeps the family's own MLP width.
- ``glu_bias``: biases of ``gate_proj`` and ``down_proj``; ``None`` follows the family's MLP.
- ``glu_up_bias``: bias of ``up_proj``; ``None`` follows ``glu_bias``. Exact conversions of bias-free
  MLPs (Falcon, MPT…) set it: their up path is the constant 1, which only a bias can hold.

Adding a family is adding a row to ``FAMILIES``. Copied into checkpoints for ``trust_remote_code``
users: imports only torch, transformers and the other flat files of this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformers

from .configuration_glu import GluParamsMixin, check_glu_fields, require_bool, require_positive_int
from .glu import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_LIMIT


@dataclass(frozen=True)
class Family:
    """Where a family keeps its MLP and how it configures it: everything the GLU swap needs.

    ``layers`` is the dotted path from the base model to the list of decoder layers; ``mlp`` the layer's
    attribute holding the MLP module, or ``None`` when the projections sit inline in the layer (OPT).
    ``proj_in``/``proj_out``/``act`` name the source projections and activation (inside ``mlp``, or on
    the layer when inline). ``activation(config)`` is the source activation as an ``ACT2FN`` name;
    ``width``, ``bias`` and ``dropout`` read the MLP's width, whether its projections have biases, and
    the dropout the MLP applies itself (0 where the layer does it). ``adds_residual``: the MLP takes
    ``(hidden_states, residual)`` and returns their sum. ``conv1d``: GPT-2-style ``[in, out]`` weights.
    ``heads``: Auto class name → the family's class; ``attention``: projection names LoRA targets.
    """

    model_type: str
    config: str
    heads: dict[str, str]
    layers: str
    mlp: str | None
    proj_in: str
    proj_out: str
    act: str
    activation: Callable[[transformers.PretrainedConfig], str]
    width: Callable[[transformers.PretrainedConfig], int]
    bias: Callable[[transformers.PretrainedConfig], bool]
    dropout: Callable[[transformers.PretrainedConfig], float]
    attention: tuple[str, ...]
    adds_residual: bool = False
    conv1d: bool = False

    @property
    def glu_model_type(self) -> str:
        return f"glu_{self.model_type}"


def _heads(prefix: str, *kinds: str) -> dict[str, str]:
    names = {
        "base": ("AutoModel", "Model"),
        "lm": ("AutoModelForCausalLM", "ForCausalLM"),
        "seq": ("AutoModelForSequenceClassification", "ForSequenceClassification"),
        "tok": ("AutoModelForTokenClassification", "ForTokenClassification"),
        "qa": ("AutoModelForQuestionAnswering", "ForQuestionAnswering"),
    }
    return {names[k][0]: prefix + names[k][1] for k in kinds}


def _no_dropout(config: transformers.PretrainedConfig) -> float:
    return 0.0


def _always(value: bool) -> Callable[[transformers.PretrainedConfig], bool]:
    return lambda config: value


def _or_four_times(field: str) -> Callable[[transformers.PretrainedConfig], int]:
    """The width in ``field``, or the classic ``4 * hidden_size`` when it is ``None``."""
    return lambda config: getattr(config, field) or 4 * config.hidden_size


_ALL = ("base", "lm", "seq", "tok", "qa")
# OpenAI GPT's own activation table: its "gelu" is the tanh form.
_OPENAI_GPT_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu": "gelu_new", "swish": "silu"}
_QKVO = ("q_proj", "k_proj", "v_proj", "out_proj")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "gpt_neo", "GPTNeoConfig", _heads("GPTNeo", *_ALL), "h", "mlp", "c_fc", "c_proj", "act",
            activation=lambda c: c.activation_function, width=_or_four_times("intermediate_size"),
            bias=_always(True), dropout=lambda c: c.resid_dropout, attention=_QKVO,
        ),
        Family(
            "gptj", "GPTJConfig", _heads("GPTJ", "base", "lm", "seq", "qa"), "h", "mlp", "fc_in", "fc_out", "act",
            activation=lambda c: c.activation_function, width=_or_four_times("n_inner"),
            bias=_always(True), dropout=lambda c: c.resid_pdrop, attention=_QKVO,
        ),
        Family(
            "codegen", "CodeGenConfig", _heads("CodeGen", "base", "lm"), "h", "mlp", "fc_in", "fc_out", "act",
            activation=lambda c: c.activation_function, width=_or_four_times("n_inner"),
            bias=_always(True), dropout=lambda c: c.resid_pdrop, attention=("qkv_proj", "out_proj"),
        ),
        Family(
            "gpt_neox", "GPTNeoXConfig", _heads("GPTNeoX", *_ALL), "layers", "mlp", "dense_h_to_4h", "dense_4h_to_h",
            "act", activation=lambda c: c.hidden_act, width=lambda c: c.intermediate_size,
            bias=_always(True), dropout=_no_dropout, attention=("query_key_value", "dense"),
        ),
        Family(
            "gpt_bigcode", "GPTBigCodeConfig", _heads("GPTBigCode", "base", "lm", "seq", "tok"), "h", "mlp", "c_fc",
            "c_proj", "act", activation=lambda c: c.activation_function, width=_or_four_times("n_inner"),
            bias=_always(True), dropout=lambda c: c.resid_pdrop, attention=("c_attn", "c_proj"),
        ),
        Family(
            "phi", "PhiConfig", _heads("Phi", "base", "lm", "seq", "tok"), "layers", "mlp", "fc1", "fc2",
            "activation_fn", activation=lambda c: c.hidden_act, width=lambda c: c.intermediate_size,
            bias=_always(True), dropout=_no_dropout, attention=("q_proj", "k_proj", "v_proj", "dense"),
        ),
        Family(
            "falcon", "FalconConfig", _heads("Falcon", *_ALL), "h", "mlp", "dense_h_to_4h", "dense_4h_to_h", "act",
            activation=lambda c: c.activation, width=_or_four_times("ffn_hidden_size"),
            bias=lambda c: c.bias, dropout=_no_dropout, attention=("query_key_value", "dense"),
        ),
        Family(
            "opt", "OPTConfig", _heads("OPT", "base", "lm", "seq", "qa"), "decoder.layers", None, "fc1", "fc2",
            "activation_fn", activation=lambda c: c.activation_function, width=lambda c: c.ffn_dim,
            bias=lambda c: c.enable_bias, dropout=_no_dropout, attention=_QKVO,
        ),
        Family(
            # BloomGelu is the tanh GELU written out by hand.
            "bloom", "BloomConfig", _heads("Bloom", *_ALL), "h", "mlp", "dense_h_to_4h", "dense_4h_to_h", "gelu_impl",
            activation=lambda c: "gelu_pytorch_tanh", width=lambda c: 4 * c.hidden_size,
            bias=_always(True), dropout=lambda c: c.hidden_dropout, attention=("query_key_value", "dense"),
            adds_residual=True,
        ),
        Family(
            "starcoder2", "Starcoder2Config", _heads("Starcoder2", "base", "lm", "seq", "tok"), "layers", "mlp",
            "c_fc", "c_proj", "act", activation=lambda c: c.hidden_act, width=lambda c: c.intermediate_size,
            bias=lambda c: c.use_bias, dropout=lambda c: c.residual_dropout,
            attention=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        Family(
            "mpt", "MptConfig", _heads("Mpt", *_ALL), "blocks", "ffn", "up_proj", "down_proj", "act",
            activation=lambda c: "gelu", width=lambda c: 4 * c.hidden_size, bias=_always(False),
            dropout=lambda c: c.attn_config.attn_pdrop, attention=("Wqkv", "out_proj"), adds_residual=True,
        ),
        Family(
            "biogpt", "BioGptConfig", _heads("BioGpt", "base", "lm", "seq", "tok"), "layers", None, "fc1", "fc2",
            "activation_fn", activation=lambda c: c.hidden_act, width=lambda c: c.intermediate_size,
            bias=_always(True), dropout=_no_dropout, attention=_QKVO,
        ),
        Family(
            "xglm", "XGLMConfig", _heads("XGLM", "base", "lm"), "layers", None, "fc1", "fc2", "activation_fn",
            activation=lambda c: c.activation_function, width=lambda c: c.ffn_dim,
            bias=_always(True), dropout=_no_dropout, attention=_QKVO,
        ),
        Family(
            "openai-gpt", "OpenAIGPTConfig",
            {"AutoModel": "OpenAIGPTModel", "AutoModelForCausalLM": "OpenAIGPTLMHeadModel",
             "AutoModelForSequenceClassification": "OpenAIGPTForSequenceClassification"},
            "h", "mlp", "c_fc", "c_proj", "act", activation=lambda c: _OPENAI_GPT_ACTIVATIONS[c.afn],
            width=lambda c: 4 * c.hidden_size, bias=_always(True),
            dropout=lambda c: c.resid_pdrop, attention=("c_attn", "c_proj"), conv1d=True,
        ),
        Family(
            # The MLP is an nn.Sequential(Linear, ReLU, Linear): its children are named 0, 1 and 2.
            "ctrl", "CTRLConfig",
            {"AutoModel": "CTRLModel", "AutoModelForCausalLM": "CTRLLMHeadModel",
             "AutoModelForSequenceClassification": "CTRLForSequenceClassification"},
            "h", "ffn", "0", "2", "1", activation=lambda c: "relu", width=lambda c: c.dff, bias=_always(True),
            dropout=_no_dropout, attention=("Wq", "Wk", "Wv", "dense"),
        ),
        Family(
            "gpt_neox_japanese", "GPTNeoXJapaneseConfig", _heads("GPTNeoXJapanese", "base", "lm"), "layers", "mlp",
            "dense_h_to_4h", "dense_4h_to_h", "act", activation=lambda c: c.hidden_act,
            width=lambda c: int(c.hidden_size * c.intermediate_multiple_size), bias=_always(False),
            dropout=_no_dropout, attention=("query_key_value", "dense"),
        ),
        Family(
            "persimmon", "PersimmonConfig", _heads("Persimmon", "base", "lm", "seq", "tok"), "layers", "mlp",
            "dense_h_to_4h", "dense_4h_to_h", "act", activation=lambda c: c.hidden_act,
            width=lambda c: c.intermediate_size, bias=_always(True), dropout=_no_dropout,
            attention=("query_key_value", "dense"),
        ),
        Family(
            # Nemotron's `up_proj` is the activated input: our gate.
            "nemotron", "NemotronConfig", _heads("Nemotron", *_ALL), "layers", "mlp", "up_proj", "down_proj",
            "act_fn", activation=lambda c: c.hidden_act, width=lambda c: c.intermediate_size,
            bias=lambda c: c.mlp_bias, dropout=_no_dropout, attention=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
    )
}  # fmt: skip


def family_of(config: transformers.PretrainedConfig) -> Family:
    """The row of a GLU family config (``glu_gpt_neox`` → ``gpt_neox``)."""
    return FAMILIES[config.model_type.removeprefix("glu_")]


class GluFamilyConfigMixin(GluParamsMixin):
    """The GLU fields' validation and accessors, shared by every generated ``Glu<Family>Config``."""

    def __post_init__(self, **kwargs):
        check_glu_fields(self.glu_variant, self.glu_beta, self.glu_alpha, self.glu_limit, self.glu_kernel)
        if self.glu_intermediate_size is not None:
            require_positive_int("glu_intermediate_size", self.glu_intermediate_size)
        for field in ("glu_bias", "glu_up_bias"):
            if getattr(self, field) is not None:
                require_bool(field, getattr(self, field))
        super().__post_init__(**kwargs)

    @property
    def glu_width(self) -> int:
        """The GLU MLP's width: ``glu_intermediate_size``, or the family's own MLP width."""
        return self.glu_intermediate_size or family_of(self).width(self)

    @property
    def glu_gate_down_bias(self) -> bool:
        return family_of(self).bias(self) if self.glu_bias is None else self.glu_bias

    @property
    def glu_up_proj_bias(self) -> bool:
        return self.glu_gate_down_bias if self.glu_up_bias is None else self.glu_up_bias


_GLU_FIELDS = {
    "glu_variant": (str, "swiglu"),
    "glu_beta": (float | int, DEFAULT_BETA),
    "glu_alpha": (float | int, DEFAULT_ALPHA),
    "glu_limit": (float | int, DEFAULT_LIMIT),
    "glu_kernel": (str, "auto"),
    "glu_intermediate_size": (int | None, None),
    "glu_bias": (bool | None, None),
    "glu_up_bias": (bool | None, None),
}


def mlp_attribute(family: Family) -> str:
    """The layer attribute that holds the GLU MLP: the family's own, or ``mlp`` for inline MLPs."""
    return family.mlp or "mlp"


def _glu_tp_plan(plan: dict[str, str] | None, family: Family) -> dict[str, str] | None:
    """The family's tensor-parallel plan with its MLP projections replaced by gate/up (colwise) and down
    (rowwise), which shards the GLU exactly: each rank computes its own slice of the intermediate units."""
    if not plan:
        return plan
    source_prefix = "" if family.mlp is None else f"{family.mlp}."
    glu_plan = {}
    for pattern, style in plan.items():
        layers, _, inside = pattern.partition("*.")  # "layers.*.mlp.fc1" -> "layers.", "mlp.fc1"
        mlp = f"{layers}*.{mlp_attribute(family)}"
        if inside == source_prefix + family.proj_in:
            glu_plan[f"{mlp}.gate_proj"] = glu_plan[f"{mlp}.up_proj"] = style
        elif inside == source_prefix + family.proj_out:
            glu_plan[f"{mlp}.down_proj"] = style
        else:
            glu_plan[pattern] = style
    return glu_plan


def _glu_fsdp_plan(base: type[transformers.PretrainedConfig], family: Family) -> dict[str, str] | None:
    """The family's FSDP2 plan; where it has none of its own (Transformers' default names Llama's modules,
    which match nothing here), every decoder layer is its own unit."""
    plan = getattr(base, "base_model_fsdp_plan", None)
    if plan is getattr(transformers.PretrainedConfig, "base_model_fsdp_plan", None):
        return {f"{family.layers}.*": "free_full_weight"}
    return plan


def _class_name(family: Family) -> str:
    return "Glu" + family.config


def _glu_config_class(family: Family) -> type[transformers.PretrainedConfig]:
    base = getattr(transformers, family.config)
    namespace = {
        "__module__": __name__,
        "__qualname__": _class_name(family),
        "__doc__": f"{family.config} with a GLU MLP: the GLU fields are documented in {__name__}.",
        "model_type": family.glu_model_type,
        "base_model_tp_plan": _glu_tp_plan(getattr(base, "base_model_tp_plan", None), family),
        "base_model_fsdp_plan": _glu_fsdp_plan(base, family),
        "__annotations__": {name: kind for name, (kind, _) in _GLU_FIELDS.items()},
        **{name: default for name, (_, default) in _GLU_FIELDS.items()},
    }
    return type(_class_name(family), (GluFamilyConfigMixin, base), namespace)


GLU_FAMILY_CONFIGS: dict[str, type[transformers.PretrainedConfig]] = {}
for _family in FAMILIES.values():
    GLU_FAMILY_CONFIGS[_family.model_type] = globals()[_class_name(_family)] = _glu_config_class(_family)
del _family

__all__ = ["Family", "FAMILIES", "GLU_FAMILY_CONFIGS", "GluFamilyConfigMixin", "family_of", "mlp_attribute"]
