"""GluConfig: GPT-2's architecture with a GLU feed-forward layer.

Copied into checkpoints for ``trust_remote_code`` users: imports only torch, transformers and ``.glu``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .glu import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_LIMIT,
    GluParams,
    check_params,
    get_variant,
    require_finite_positive,
)

GLU_KERNELS = ("auto", "eager", "triton")

# The one table of the GPT-2-style model's heads: Auto class -> the class in modeling_glu answering to it.
# hf_glu registers these with the Auto classes, modeling_glu registers them for saving, AUTO_MAP names them.
GLU_HEADS = {
    "AutoModel": "GluModel",
    "AutoModelForCausalLM": "GluForCausalLM",
    "AutoModelForSequenceClassification": "GluForSequenceClassification",
    "AutoModelForTokenClassification": "GluForTokenClassification",
}

# Every Auto class a saved checkpoint answers to. Transformers records only the class being saved, so
# the models write this whole map, letting `trust_remote_code` users load any head from one folder.
AUTO_MAP = {
    "AutoConfig": "configuration_glu.GluConfig",
    **{auto: f"modeling_glu.{head}" for auto, head in GLU_HEADS.items()},
}


def require_positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; expected an integer > 0")


def _require_probability(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field}={value!r} is invalid; expected a number in [0, 1]")


def require_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is invalid; expected True or False")


def check_glu_fields(glu_variant: str, glu_beta: float, glu_alpha: float, glu_limit: float, glu_kernel: str) -> None:
    """Raise ValueError naming the first invalid GLU field and what it accepts (every GLU config calls this)."""
    get_variant(glu_variant)
    check_params(GluParams(beta=glu_beta, alpha=glu_alpha, limit=glu_limit))
    if glu_kernel not in GLU_KERNELS:
        raise ValueError(f"glu_kernel={glu_kernel!r} is invalid; expected one of {list(GLU_KERNELS)}")


class GluParamsMixin:
    """``glu_params`` of any config holding ``glu_beta``, ``glu_alpha`` and ``glu_limit`` (GluConfig, the families')."""

    @property
    def glu_params(self) -> GluParams:
        """The variant's scalar parameters as one value."""
        return GluParams(beta=self.glu_beta, alpha=self.glu_alpha, limit=self.glu_limit)


class GluConfig(GluParamsMixin, PretrainedConfig):
    """Configuration of a GPT-2 style decoder whose MLP is ``down(act(gate(x)) * up(x))``.

    The GPT-2 fields keep GPT-2's names and defaults so a GPT-2 config maps onto this one field for
    field; ``attribute_map`` exposes the standard names (``hidden_size``, ``intermediate_size``, ...).

    Args:
        glu_variant: one of ``hf_glu.glu.VARIANTS`` (glu, bilinear, reglu, geglu, geglu_tanh, swiglu,
            swiglu_oai).
        glu_beta: β of ``swiglu``: ``gate * sigmoid(β * gate)``.
        glu_alpha: α of ``swiglu_oai`` (gpt-oss uses 1.702).
        glu_limit: clamp limit of ``swiglu_oai`` (gpt-oss uses 7.0).
        mlp_bias: whether gate, up and down projections have biases (GPT-2's MLP has them).
        glu_kernel: ``"auto"`` (fused Triton path on CUDA when triton imports, else eager; forwards without
            autograd under ``glu_triton.INFERENCE_EAGER_BELOW_TOKENS`` tokens, e.g. decoding, stay eager),
            ``"eager"`` or ``"triton"`` (force the fused path; fails clearly if triton is missing).
        n_inner: the MLP's intermediate size; ``None`` means GPT-2's ``4 * n_embd``.
    """

    model_type = "glu_gpt2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Tensor parallelism (Transformers' vocabulary): q/k/v and gate/up split by output features, o/down by input
    # features, so attention heads and GLU units stay whole on one rank and each block needs one all-reduce per
    # projection pair. The token embedding is split by vocabulary like the (tied) head.
    base_model_tp_plan = {
        "wte": "embedding_rowwise",
        "h.*.attn.q_proj": "colwise",
        "h.*.attn.k_proj": "colwise",
        "h.*.attn.v_proj": "colwise",
        "h.*.attn.o_proj": "rowwise",
        "h.*.mlp.gate_proj": "colwise",
        "h.*.mlp.up_proj": "colwise",
        "h.*.mlp.down_proj": "rowwise",
    }
    # FSDP2: every block its own unit; embeddings sharded, the final norm kept whole, as Transformers does for
    # Llama (which regroups a tied embedding with the head itself).
    base_model_fsdp_plan = {
        "wte": "free_full_weight",
        "wpe": "free_full_weight",
        "h.*": "free_full_weight",
        "ln_f": "keep_full_weight",
    }
    # No pipeline plan: positions are added inside forward, so a later stage fed `inputs_embeds` would add them
    # again; Transformers refuses pipeline parallelism for a config without a plan.
    base_model_pp_plan = None
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "n_inner",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        reorder_and_upcast_attn: bool = False,
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | list[int] | None = 50256,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        glu_variant: str = "swiglu",
        glu_beta: float = DEFAULT_BETA,
        glu_alpha: float = DEFAULT_ALPHA,
        glu_limit: float = DEFAULT_LIMIT,
        mlp_bias: bool = True,
        glu_kernel: str = "auto",
        **kwargs,
    ):
        for field, value in (
            ("vocab_size", vocab_size),
            ("n_positions", n_positions),
            ("n_embd", n_embd),
            ("n_layer", n_layer),
            ("n_head", n_head),
        ):
            require_positive_int(field, value)
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is invalid; expected a multiple of n_head={n_head}")
        if n_inner is None:
            n_inner = 4 * n_embd  # GPT-2's convention, resolved so `intermediate_size` is always a number
        require_positive_int("n_inner", n_inner)
        for field, value in (("resid_pdrop", resid_pdrop), ("embd_pdrop", embd_pdrop), ("attn_pdrop", attn_pdrop)):
            _require_probability(field, value)
        for field, value in (("layer_norm_epsilon", layer_norm_epsilon), ("initializer_range", initializer_range)):
            require_finite_positive(field, value)
        for field, value in (
            ("scale_attn_weights", scale_attn_weights),
            ("scale_attn_by_inverse_layer_idx", scale_attn_by_inverse_layer_idx),
            ("reorder_and_upcast_attn", reorder_and_upcast_attn),
            ("mlp_bias", mlp_bias),
        ):
            require_bool(field, value)
        check_glu_fields(glu_variant, glu_beta, glu_alpha, glu_limit, glu_kernel)

        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = reorder_and_upcast_attn
        self.use_cache = use_cache
        self.glu_variant = glu_variant
        self.glu_beta = float(glu_beta)
        self.glu_alpha = float(glu_alpha)
        self.glu_limit = float(glu_limit)
        self.mlp_bias = mlp_bias
        self.glu_kernel = glu_kernel
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def glu_width(self) -> int:
        """The GLU MLP's width (every GLU config answers to this name)."""
        return self.n_inner



__all__ = ["GluConfig", "GluParamsMixin", "GLU_KERNELS", "GLU_HEADS", "AUTO_MAP", "check_glu_fields"]
