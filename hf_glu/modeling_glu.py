"""The GLU model family: a GPT-2 style decoder whose MLP is ``down(act(gate(x)) * up(x))``.

Module names mirror GPT-2 (``transformer.h.N``, ``ln_1``, ``ln_2``, ``wte``, ``wpe``) so GPT-2 users feel
at home, with Llama-style projection names (``q_proj``…``o_proj``, ``gate_proj``/``up_proj``/
``down_proj``) as plain ``nn.Linear`` so PEFT targets them.

Copied into checkpoints for ``trust_remote_code`` users: imports only torch, transformers and the
other flat files of this package (``from .x import Y``).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.hub_kernels import use_kernel_forward_from_hub
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_glu import AUTO_MAP, GLU_HEADS, GluConfig
from .glu import activation_module, get_variant
from .glu_triton import fused_mlp_forward, fused_path_wanted, has_hooks

# Transformers renamed the KV cache from `past_key_values` to `cache` during 5.x (argument of
# `create_causal_mask`, field of the model outputs, keyword passed by `generate`). We support both
# by asking the installed version which name it uses.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and _MASK_CACHE_ARG == "cache":
        # As Transformers' own models do where `cache` is the name; where `past_key_values` still is, stay silent.
        warnings.warn(
            "`past_key_values` is deprecated in favour of `cache`: pass the KV cache as `cache=`",
            FutureWarning,
            stacklevel=3,
        )
    return cache if cache is not None else past_key_values


def _with_cache(cache: Cache | None) -> dict:
    return {_OUTPUT_CACHE_FIELD: cache}


def _none_means_config(forward: Callable) -> Callable:
    """Outside ``capture_outputs``: an explicit ``None`` for ``output_attentions``, ``output_hidden_states`` or
    ``return_dict`` means the config's value, as Transformers' ``can_return_tuple`` reads ``return_dict=None``;
    ``capture_outputs`` alone reads it as "no" (PEFT passes ``None`` for each)."""

    @functools.wraps(forward)
    def with_config_defaults(self, *args, **kwargs):
        for flag in ("output_attentions", "output_hidden_states", "return_dict"):
            if flag in kwargs and kwargs[flag] is None:
                del kwargs[flag]
        return forward(self, *args, **kwargs)

    return with_config_defaults


# The kernels-hub name of the GLU MLP: `KernelConfig(kernel_mapping={"GluMLP": "org/repo:Layer"})` with
# `use_kernels=True` (or the kernels library's own `kernelize`) swaps its forward for the hub layer's. The forward
# is the GLU maths alone, `down(act(gate(x)) * up(x))`; the MLP's dropout and residual stay the module's.
HUB_KERNEL_NAME = "GluMLP"


def _mapped_hub_layers() -> list[object] | None:
    """Every repository the current kernels mapping names for ``GluMLP``, on any device and mode; ``None`` when
    the mapping cannot be read."""
    try:
        # The kernels library offers `condition` with the module only, not the layer it would swap in; the
        # layer is read from the mapping `kernelize` consults. Its layout is kernels' own (0.19), so any
        # change there reads as "unknown" and the guard refuses the swap rather than guess.
        from kernels._internals.layer.globals import _KERNEL_MAPPING

        devices = _KERNEL_MAPPING.get().get(HUB_KERNEL_NAME) or {}
        return [repo for repos in devices.values() for repo in (repos.repos_for_device(None) or {}).values()]
    except (ImportError, AttributeError, TypeError):
        return None


def _hub_layer_computes(layer_name: object, mlp: nn.Module) -> bool:
    if layer_name == HUB_KERNEL_NAME:  # reads the MLP's own variant and parameters
        return True
    # A one-variant build knows its variant's name, not the parameters a config may give it (swiglu's beta,
    # gpt-oss's alpha and limit): trusted only where the MLP keeps that variant's defaults.
    return layer_name == f"{HUB_KERNEL_NAME}_{mlp.variant.name}" and mlp.variant.reads_defaults_only(mlp.params)


def hub_kernel_matches(mlp: nn.Module) -> bool:
    """Whether hub layers are mapped to ``GluMLP`` and every one computes ``mlp``'s variant with ``mlp``'s
    parameters (the kernels ``condition``, checked by ``kernelize`` for each GLU MLP before it swaps the
    forward)."""
    repos = _mapped_hub_layers()
    # Nothing mapped is a "no" too: Transformers kernelizes every model it loads (`use_kernels` defaults on),
    # and kernels warns for each layer it finds no mapping for; declining first keeps such loads quiet.
    return bool(repos) and all(_hub_layer_computes(getattr(repo, "layer_name", None), mlp) for repo in repos)


def _hub_kernel_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Tags ``cls`` for the kernels hub with the activation guard, or not at all where the guard cannot be
    passed: Transformers 5.17 with ``kernels`` installed forwards only the layer name (a ``TypeError`` here),
    and an unguarded tag could swap in a hub layer computing another activation."""
    try:
        return use_kernel_forward_from_hub(HUB_KERNEL_NAME, condition=hub_kernel_matches)(cls)
    except TypeError:
        return cls


@_hub_kernel_layer
class GluMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the variant named by ``config.glu_variant``.

    The one GLU MLP of every model here: the GPT-2-style ``GluModel`` builds it from its config alone;
    the other families (``modeling_glu_families``) pass their own width, biases and dropout. ``config``
    is any config with the GLU fields (``glu_variant``, ``glu_params``, ``glu_kernel``), read at each call
    so a changed ``glu_kernel`` takes effect at once. ``GluMLP(config)`` of gpt-oss's clamped SwiGLU builds a
    :class:`GluClampedMLP`, whose activation takes ``up`` too.

    ``forward`` is the GLU maths alone, written exactly as serving engines trace and rewrite it (vLLM's GLU
    fuser: each of ``act_fn``, ``gate_proj``, ``up_proj`` called once as ``self.name(x)``, no branch) and as
    kernel hubs replace it. Calling the module (``__call__``) picks the implementation first: the fused
    Triton kernels where ``glu_kernel`` wants them, else ``forward`` (with the module's hooks, as any module);
    then it applies the MLP's output dropout and, where the family wants it, adds the residual.

    Args:
        intermediate_size: the GLU width (default ``config.intermediate_size``).
        bias: biases of ``gate_proj`` and ``down_proj`` (default ``config.mlp_bias``).
        up_bias: bias of ``up_proj`` (default ``bias``); exact conversions of bias-free MLPs need one.
        dropout: dropout on the output (default ``config.resid_pdrop``); 0 where the layer applies it.
        adds_residual: ``mlp(hidden_states, residual)`` returns ``residual + dropout(mlp)``, for the
            families whose MLP adds the residual itself (BLOOM, MPT).
    """

    def __new__(cls, config: PretrainedConfig | None = None, *args, **kwargs):
        # The class follows the variant's form, chosen once here (copy and pickle call __new__ without a config).
        if cls is GluMLP and config is not None and get_variant(config.glu_variant).gate_act is None:
            cls = GluClampedMLP
        return super().__new__(cls)

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        intermediate_size: int | None = None,
        bias: bool | None = None,
        up_bias: bool | None = None,
        dropout: float | None = None,
        adds_residual: bool = False,
    ):
        super().__init__()
        self.config = config
        self.variant = get_variant(config.glu_variant)
        self.params = config.glu_params
        hidden = config.hidden_size
        inner = intermediate_size if intermediate_size is not None else config.intermediate_size
        bias = config.mlp_bias if bias is None else bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias if up_bias is None else up_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.down_proj.writes_residual = True  # read by _init_weights
        # A parameter-free submodule, so checkpoints keep exactly gate_proj/up_proj/down_proj.
        self.act_fn = activation_module(self.variant, self.params)
        self.dropout = nn.Dropout(config.resid_pdrop if dropout is None else dropout)
        self.adds_residual = adds_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def __call__(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_fused_path(hidden_states):
            out = fused_mlp_forward(self, hidden_states)
        else:
            out = super().__call__(hidden_states)
        out = self.dropout(out)
        if self.adds_residual:
            if residual is None:
                raise ValueError("this GLU MLP adds the residual itself: call it as mlp(hidden_states, residual)")
            out = residual + out
        return out

    def use_fused_path(self, hidden_states: torch.Tensor) -> bool:
        """The single dispatch point between the fused kernels and ``forward``.

        Symbolic tracing (``torch.fx``) always records ``forward``: a traced input has no device or dtype to
        decide on. A forward swapped in on this instance (a kernels-hub layer, vLLM's fused rewrite, which also
        removes ``gate_proj`` and ``up_proj``) is what the user asked for, so it runs instead of the kernels.
        Hooks on this module or its ``act_fn`` (activation capture, a pre-hook that edits the input) would not
        run on the fused path, which calls neither: such an MLP runs ``forward``.
        """
        if isinstance(hidden_states, torch.fx.Proxy) or "forward" in self.__dict__:
            return False
        if has_hooks(self) or has_hooks(self.act_fn):
            return False
        return fused_path_wanted(self.config.glu_kernel, hidden_states, self.variant)

    def extra_repr(self) -> str:
        return f"variant={self.variant.name}, params={self.params}"


class GluClampedMLP(GluMLP):
    """gpt-oss's clamped SwiGLU MLP, ``down(act(gate(x), up(x)))``: its activation clamps and shifts ``up`` too,
    so it is no ``act(gate) * up`` and no engine's GLU pattern. Built by ``GluMLP(config)`` for that variant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


def glu_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention honouring GPT-2's ``reorder_and_upcast_attn``: scores and softmax in fp32."""
    if module.reorder_and_upcast_attn:
        # GPT-2 scales before the product and keeps the scores in fp32, even under autocast.
        with torch.autocast(query.device.type, enabled=False):
            attn_weights = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))
    else:
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class GluAttention(nn.Module):
    """GPT-2's causal self-attention with separate q/k/v/o projections."""

    def __init__(self, config: GluConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.is_causal = True
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.o_proj.writes_residual = True  # read by _init_weights
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, glu_eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attn_pdrop if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class GluBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GluConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GluAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GluMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class ShardedModelMixin:
    """What FSDP2 needs from a model with its own code: a tied output head that trains as in one process, and
    ``save_pretrained`` of a sharded model that still writes this model's code and ``auto_map``."""

    @classmethod
    def maybe_distribute_model(cls, model: nn.Module, distributed_config, mesh, *args, **kwargs) -> nn.Module:
        # Transformers (5.17-5.24) shards the model untied and ties the head only after loading: FSDP2 then
        # holds the one tensor as two parameters, and on a rank whose share of an unevenly split vocabulary is
        # padded, one of them gathers a private copy the optimizer never updates (training drifts from the
        # second step). Tie first and leave the head in the embedding's unit: one parameter, shared by both.
        fsdp_size = getattr(distributed_config, "fsdp_size", None) or 1
        if mesh is not None and fsdp_size > 1 and model.all_tied_weights_keys:
            model.tie_weights(recompute_mapping=False)
            head = model.get_output_embeddings()
            head_name = next(name for name, module in model.named_modules() if module is head)
            plan = getattr(model, "_fsdp_plan", None) or {}
            model._fsdp_plan = {name: style for name, style in plan.items() if name != head_name}  # this model's
        return super().maybe_distribute_model(model, distributed_config, mesh, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # fully_shard swaps the instance's class for a subclass it generates (FSDP<Name>, defined in torch):
        # saved as it is, auto_map would name that class and torch's _fsdp_*.py files would be copied in place
        # of ours. Save as our own class; FSDP2's hooks live on the instance, not the class.
        sharded_class = type(self)
        self.__class__ = next(c for c in sharded_class.__mro__ if not c.__module__.startswith("torch.distributed"))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class


class GluPreTrainedModel(ShardedModelMixin, PreTrainedModel):
    config_class = GluConfig
    config: GluConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GluBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # What `capture_outputs` records on request: each block's output (after the embeddings, the first block's
    # input; the last one replaced by the final norm's output) and each attention's weights.
    _can_record_outputs = {"hidden_states": GluBlock, "attentions": GluAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2's scheme: projections that write into the residual stream (two per block) start
        # scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth. The flag sits
        # on the Linear itself because Transformers skips parameter-less container modules here.
        if getattr(module, "writes_residual", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # the code files travel with the weights: name every head
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class GluModel(GluPreTrainedModel):
    """The bare decoder: embeddings, blocks and the final layer norm."""

    def __init__(self, config: GluConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GluBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @_none_means_config
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``output_attentions``, ``output_hidden_states`` and ``return_dict`` are handled by ``capture_outputs``."""
        cache = _pick_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed forward would write the cache a second time
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        hidden_states = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids)  # GPT-2 reuses the token embeddings
        hidden_states = self.drop(hidden_states)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )
        for block in self.h:
            hidden_states = block(
                hidden_states, attention_mask=causal_mask, cache=cache, position_ids=position_ids, **kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), **_with_cache(cache))


# The heads: each passes what it does not read to GluModel untouched (attention flags, Trainer's loss kwargs) and
# returns a tuple on `return_dict=False` through Transformers' `can_return_tuple`. Heads that keep a cache name
# `past_key_values` too: PEFT's prefix tuning looks for it in the head's signature to choose its route.


class GluForCausalLM(GluPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # vocabulary-split like the embedding it is tied to
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # as Transformers' Llama; a tied head shares the embedding's unit

    def __init__(self, config: GluConfig):
        super().__init__(config)
        self.transformer = GluModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        *,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Labels are the input ids themselves: the loss shifts them (through ``self.loss_function``)."""
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            # kwargs carry Trainer's `num_items_in_batch`, which makes gradient accumulation exact.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **_with_cache(getattr(outputs, _OUTPUT_CACHE_FIELD)),
        )


class GluForSequenceClassification(GluPreTrainedModel):
    """Classifies a sequence from the hidden state of its last non-padding token, as GPT-2 does."""

    def __init__(self, config: GluConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GluModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        pad_id = self.config.pad_token_id
        if pad_id is None and batch_size != 1:
            raise ValueError("batches of more than one sequence need config.pad_token_id to find each last token")
        if pad_id is None or input_ids is None:
            last_token = torch.full((batch_size,), logits.shape[1] - 1, device=logits.device, dtype=torch.long)
        else:
            # The rightmost non-padding position works for left and right padding alike.
            not_pad = (input_ids != pad_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * not_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **_with_cache(getattr(outputs, _OUTPUT_CACHE_FIELD)),
        )


class GluForTokenClassification(GluPreTrainedModel):
    def __init__(self, config: GluConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GluModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else config.resid_pdrop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **{**kwargs, "use_cache": False},  # per-token labels: never a KV cache, whatever the caller says
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, config=self.config, **kwargs)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Saved checkpoints carry this file and name these heads in `auto_map` (trust_remote_code users need no hf_glu).
# Here rather than in hf_glu/__init__.py, which builds no model class until one is used.
for _auto_name, _head in GLU_HEADS.items():
    globals()[_head].register_for_auto_class(_auto_name)
del _auto_name, _head

__all__ = [
    "GluMLP",
    "GluClampedMLP",
    "GluAttention",
    "GluBlock",
    "GluPreTrainedModel",
    "GluModel",
    "GluForCausalLM",
    "GluForSequenceClassification",
    "GluForTokenClassification",
]
