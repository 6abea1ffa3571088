"""What a conversion needs to know about the source's architecture, for GPT-2 and for every other family.

:class:`Surgery` is the one interface the pipeline and the fidelity report use: it maps the config and
the weights, and says where each layer's MLP projections and activation are (to record calibration
pre-activations and per-layer references). :class:`Gpt2Surgery` rebuilds GPT-2 as ``GluFor*``
(``convert/gpt2.py``); :class:`FamilySurgery` keeps any other family's own architecture and replaces
only its MLP weights (``gate_proj``/``up_proj``/``down_proj`` under the layer's MLP), every other tensor
keeping its name and value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from operator import attrgetter

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as transformers_init

from ..configuration_glu_families import FAMILIES, GLU_FAMILY_CONFIGS, Family, mlp_attribute
from ..modeling_glu_families import GLU_FAMILY_MODELS
from ..positions import max_positions
from . import gpt2
from .checkpoint_names import head_is_tied
from .errors import ConversionError
from .init_schemes import UnitMap, check_scheme, preserved_projections

# The source model types a conversion accepts: GPT-2 (rebuilt as GluFor*) and every family row.
SUPPORTED_MODEL_TYPES = ("gpt2", *FAMILIES)

# Called with each layer's index, the source layer and its GLU MLP tensors (named as in the MLP, e.g.
# `gate_proj.weight`) while the source layer still exists.
LayerDone = Callable[[int, nn.Module, dict[str, torch.Tensor]], None]


def _bloom_unsupported(config) -> str | None:
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        return (f"slow_but_exact=true with pretraining_tp={config.pretraining_tp} is not supported: that path "
                "computes the MLP's dense_4h_to_h in slices without its bias, which the GLU down_proj keeps, so "
                "the conversion could not reproduce it; expected slow_but_exact=false or pretraining_tp=1")  # fmt: skip
    return None


# Source options a family's GLU classes cannot reproduce: model_type -> the refusal's message, or None.
_UNSUPPORTED_OPTIONS: dict[str, Callable[[object], str | None]] = {"bloom": _bloom_unsupported}

# Config fields that describe the source file rather than the model, or that the GLU class sets itself.
_DROPPED_FIELDS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype",
                   "torch_dtype")  # fmt: skip


class Surgery:
    """The architecture-specific half of a conversion (see the module docstring)."""

    projections: tuple[str, str]  # the source MLP's input and output projection names, for reports

    def config(self, source: PreTrainedModel, variant: str, init: str, width: int | None) -> object:
        raise NotImplementedError

    def target_class(self, source: PreTrainedModel) -> type[PreTrainedModel]:
        raise NotImplementedError

    def weights(
        self,
        source: PreTrainedModel,
        config,
        unit_maps: list[UnitMap] | None,
        share: bool,
        layer_done: LayerDone | None,
        mlps: list[dict[str, torch.Tensor | None]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The converted state dict. ``mlps``: each layer's GLU MLP tensors (named as
        :func:`~.init_schemes.preserved_projections` names them), used instead of the preserve map: the
        width-reduced conversion (:mod:`.width`) fits them itself."""
        raise NotImplementedError

    def activation(self, source: PreTrainedModel) -> str:
        raise NotImplementedError

    def source_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        raise NotImplementedError

    def source_mlp(self, layer: nn.Module) -> tuple[nn.Module, Callable, nn.Module]:
        """The layer's input projection, activation and output projection."""
        raise NotImplementedError

    def glu_mlps(self, model: PreTrainedModel) -> list[nn.Module]:
        raise NotImplementedError

    def max_positions(self, config) -> int | None:
        """The longest sequence the source attends over (``None``: no limit the config states)."""
        return max_positions(config)

    def preactivation(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        proj_in, act, _ = self.source_mlp(layer)
        return act(proj_in(x))


class Gpt2Surgery(Surgery):
    projections = ("c_fc", "c_proj")

    def config(self, source, variant, init, width):
        return gpt2.convert_config(source, variant, init, width)

    def target_class(self, source):
        return gpt2.target_class(source)

    def weights(self, source, config, unit_maps, share, layer_done, mlps=None):
        def mlp_done(i: int, block: nn.Module, layer: dict[str, torch.Tensor]) -> None:
            layer_done(i, block, {k.removeprefix("mlp."): v for k, v in layer.items() if k.startswith("mlp.")})

        done = mlp_done if layer_done is not None else None
        return gpt2.convert_weights(source, config, unit_maps, share=share, layer_done=done, mlps=mlps)

    def activation(self, source):
        return source.config.activation_function

    def source_layers(self, model):
        return model.base_model.h

    def source_mlp(self, layer):
        return layer.mlp.c_fc, layer.mlp.act, layer.mlp.c_proj

    def glu_mlps(self, model):
        return [block.mlp for block in model.base_model.h]


class FamilySurgery(Surgery):
    """Keeps the family's architecture: ``Glu<FamilyClass>`` with the source's tensors, MLPs replaced."""

    def __init__(self, family: Family):
        self.family = family
        self.projections = (family.proj_in, family.proj_out)

    def config(self, source, variant, init, width):
        src = source.config
        source_width = self.family.width(src)
        check_scheme(variant, init, self.activation(source), width, source_width, self.activation_field(src))
        unsupported = _UNSUPPORTED_OPTIONS.get(self.family.model_type)
        if unsupported is not None and (problem := unsupported(src)):
            raise ConversionError(problem)
        source_bias = self.family.bias(src)
        values = {k: v for k, v in src.to_dict().items() if k not in _DROPPED_FIELDS}
        values.update(
            glu_variant=variant,
            glu_intermediate_size=width or source_width,
            glu_bias=source_bias,
            # A bias-free MLP still needs a constant up path (1, or 1/s) for the preserve scheme: only a
            # bias can hold it. gate_proj keeps the source's (absent) bias; down_proj is the source's.
            glu_up_bias=True if init == "preserve" else source_bias,
            architectures=[self.target_class(source).__name__],
            tie_word_embeddings=head_is_tied(source),  # as loaded, not as the config says
        )
        try:
            config = GLU_FAMILY_CONFIGS[self.family.model_type](**values)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"the source config cannot be carried over: {e}") from None
        config._attn_implementation = src._attn_implementation
        return config

    def target_class(self, source):
        auto = next(a for a, name in self.family.heads.items() if name == type(source).__name__)
        return GLU_FAMILY_MODELS[self.family.model_type][auto]

    def activation(self, source):
        return self.family.activation(source.config)

    def activation_field(self, config) -> str:
        """The config field the family reads its activation from (for messages): the one field the
        family's ``activation`` reads, found by watching it read."""
        reads: list[str] = []

        class Watched:
            def __getattr__(self, name: str):
                reads.append(name)
                return getattr(config, name)

        self.family.activation(Watched())
        return reads[-1] if reads else "the activation"

    def source_layers(self, model):
        return attrgetter(self.family.layers)(model.base_model)

    def source_mlp(self, layer):
        family = self.family
        owner = layer if family.mlp is None else getattr(layer, family.mlp)
        return getattr(owner, family.proj_in), getattr(owner, family.act), getattr(owner, family.proj_out)

    def glu_mlps(self, model):
        return [getattr(layer, mlp_attribute(self.family)) for layer in self.source_layers(model)]

    def weights(self, source, config, unit_maps, share, layer_done, mlps=None):
        """The source's state dict with each layer's MLP tensors replaced (left out with ``unit_maps``
        None: the random scheme's fresh weights come from the model's own init)."""
        take = (lambda v: v.detach()) if share else (lambda v: v.detach().clone())
        out = {k: take(v) for k, v in source.state_dict().items()}
        module_names = {id(m): name for name, m in source.named_modules()}
        for i, layer in enumerate(self.source_layers(source)):
            proj_in, _, proj_out = self.source_mlp(layer)
            w_in, b_in = (out.pop(f"{module_names[id(proj_in)]}.{k}", None) for k in ("weight", "bias"))
            w_out, b_out = (out.pop(f"{module_names[id(proj_out)]}.{k}", None) for k in ("weight", "bias"))
            glu: dict[str, torch.Tensor] = {}
            if mlps is not None:
                glu = self._kept_biases(dict(mlps[i]), config)
            elif unit_maps is not None:
                if self.family.conv1d:  # GPT-2-style [in, out] storage
                    w_in, w_out = w_in.t().contiguous(), w_out.t().contiguous()
                glu = self._kept_biases(preserved_projections(w_in, b_in, w_out, b_out, unit_maps[i]), config)
            if layer_done is not None:
                layer_done(i, layer, glu)
            mlp = f"{module_names[id(layer)]}.{mlp_attribute(self.family)}"
            out.update({f"{mlp}.{k}": v for k, v in glu.items()})
        return out

    @staticmethod
    def _kept_biases(glu: dict[str, torch.Tensor | None], config) -> dict[str, torch.Tensor]:
        """Drop the biases the GLU config has no place for; one that is not all zero there is a bug."""
        kept = {"gate_proj.bias": config.glu_gate_down_bias, "down_proj.bias": config.glu_gate_down_bias,
                "up_proj.bias": config.glu_up_proj_bias}  # fmt: skip
        for name, keep in kept.items():
            if not keep:
                dropped = glu.pop(name)
                if dropped is not None and torch.count_nonzero(dropped):
                    raise ConversionError(f"this init map needs {name}, which the bias-free source MLP does not have")
        return glu


def surgery_for(model_type: str) -> Surgery:
    """The surgery of a source ``model_type``; unsupported types get one line listing the supported ones."""
    if model_type == "gpt2":
        return Gpt2Surgery()
    if model_type in FAMILIES:
        return FamilySurgery(FAMILIES[model_type])
    raise ConversionError(f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def build_model(
    target: type[PreTrainedModel],
    config,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    seed: int | None,
) -> PreTrainedModel:
    """``target`` holding ``state_dict``, built as Transformers' ``from_pretrained`` builds the saved checkpoint:
    so the model a conversion returns and measures is the one users get when they reload it.

    With ``seed`` None every weight must be in ``state_dict``, and the model is built on the meta device
    and takes the tensors as they are (no random init, no copy); its non-persistent buffers (rotary
    frequencies, masks), which no state dict holds, are computed by the model's own init, never copied from
    the source (whose may have been rounded by a ``.to(dtype)``). With a seed, the weights left out (the random
    scheme's MLP) keep the model's own seeded init.

    Only the floating-point parameters are cast to ``dtype``: the buffers keep the dtype their class gives them
    (float32 rotary frequencies in a bfloat16 model), as in a loaded checkpoint.
    """
    # Built under `dtype` as torch's default, as `from_pretrained` builds it: buffers made in the default
    # dtype (XGLM's sinusoidal positions, GPT-1's mask) come out in `dtype`, explicit float32 ones stay float32.
    if seed is None:
        with torch.device("meta"), _default_dtype(dtype):
            model = target(config)
    else:
        with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
            torch.manual_seed(seed)
            model = target(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=seed is None)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    left = [k for k in missing if k not in tied and (seed is None or ".gate_proj." not in k and ".up_proj." not in k
                                                     and ".down_proj." not in k)]  # fmt: skip
    if left or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"weight mapping incomplete: missing {left}, unexpected {unexpected}")
    _init_buffers(model)  # after the build, in float32: `from_pretrained` initialises outside its dtype context
    if tied:
        model.tie_weights()
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)  # in place: tied parameters stay one
    return model.eval()


@torch.no_grad()
def _init_buffers(model: PreTrainedModel) -> None:
    """Give the non-persistent buffers their values as ``from_pretrained`` does: the model's own
    ``_init_weights`` on each module holding one, with every other tensor marked initialised so that only
    the buffers are written (``__init__`` may have computed them differently, under the dtype as default)."""
    owners = [m for m in model.modules() if any(m._buffers.get(n) is not None for n in m._non_persistent_buffers_set)]
    for module in owners:
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True  # Transformers' own mark of a loaded tensor; its init skips these
    # Transformers' guard makes plain torch.nn.init calls in an _init_weights respect that mark too.
    guard = getattr(transformers_init, "guard_torch_init_functions", contextlib.nullcontext)
    with guard():
        for module in owners:
            model._init_weights(module)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
