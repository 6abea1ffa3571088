"""The GLU variant table: the single source of truth for every variant.

A GLU feed-forward layer computes ``down(act(gate(x)) * up(x))``. One row of ``VARIANTS`` holds, per variant,
the eager reference of the elementwise part ``(gate, up) -> out``, the activation module of the eager MLP,
and (by its position) the id the fused kernels branch on. Everything else (the fused kernels, the
conversion schemes, the tests) is checked against these functions.

Rounding follows Transformers' eager models: inputs narrower than fp32 are upcast once, the whole
activation is computed in fp32 (float64 stays float64, so tests can build exact references), and the
result is cast back to the input dtype once.

This file is copied into checkpoints for ``trust_remote_code`` users: it imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BETA = 1.0
DEFAULT_ALPHA = 1.702  # gpt-oss's sigmoid scale
DEFAULT_LIMIT = 7.0  # gpt-oss's clamp


@dataclass(frozen=True)
class GluParams:
    """The scalar parameters a variant may read: swiglu's β, swiglu_oai's α and clamp limit."""

    beta: float = DEFAULT_BETA
    alpha: float = DEFAULT_ALPHA
    limit: float = DEFAULT_LIMIT


@dataclass(frozen=True)
class GluVariant:
    """One GLU variant: its name, the paper or model it comes from, its eager elementwise maths and the
    activation module of its eager MLP.

    ``fn(gate, up, params)`` receives tensors already in the compute dtype (fp32 or float64).
    ``module(variant, params)`` builds the activation module (see ``activation_module``).
    ``gate_act(gate, params)``: the activation applied to the gate alone, for the variants that are
    ``gate_act(gate) * up``; ``None`` for a variant that also transforms ``up`` (gpt-oss's clamped SwiGLU).
    ``param_names``: the fields of :class:`GluParams` the maths reads.
    """

    name: str
    formula: str
    origin: str
    fn: Callable[[torch.Tensor, torch.Tensor, GluParams], torch.Tensor]
    module: Callable[[GluVariant, GluParams], nn.Module]
    gate_act: Callable[[torch.Tensor, GluParams], torch.Tensor] | None = None
    param_names: tuple[str, ...] = ()

    @property
    def kernel_id(self) -> int:
        """The id the fused kernels branch on (a compile-time constant): this variant's position in ``VARIANTS``."""
        return list(VARIANTS).index(self.name)

    def reads_defaults_only(self, params: GluParams) -> bool:
        """Whether every parameter this variant reads has its default value in ``params``."""
        return all(getattr(params, field) == getattr(GluParams(), field) for field in self.param_names)


def _sigmoid(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return torch.sigmoid(gate)


def _identity(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return gate


def _relu(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return torch.relu(gate)


def _gelu(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return F.gelu(gate)


def _gelu_tanh(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh")


def _swish(gate: torch.Tensor, p: GluParams) -> torch.Tensor:
    return gate * torch.sigmoid(p.beta * gate)


def _swiglu_oai(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    gate = gate.clamp(max=p.limit)
    up = up.clamp(min=-p.limit, max=p.limit)
    return (up + 1) * (gate * torch.sigmoid(p.alpha * gate))


# ----------------------------------------------------------------------------------------------------
# The activation as a module, for the GLU MLP's eager form ``down(act_fn(gate(x)) * up(x))``.
#
# Serving engines recognise that form by the activation module's EXACT class (vLLM's GLU fuser looks
# ``type(act_fn)`` up in Transformers' ``ACT2CLS`` or tests ``type(act_fn) is nn.GELU``) and put their own
# ``SiluAndMul``/``GeluAndMul`` kernels in its place. So where torch has the module for a variant's activation
# it is that module itself, not a subclass: ``nn.SiLU`` (swiglu with beta = 1), ``nn.GELU`` (geglu) and
# ``nn.GELU(approximate="tanh")`` (geglu_tanh). They round as the table does for half-precision inputs: torch
# computes these activations in fp32 internally and rounds once to the input dtype. Every other variant gets a
# class of its own that no engine maps by exact class (engines have no fused kernel for them): glu, bilinear and
# reglu (computed by the table in fp32; subclasses of torch's Sigmoid/Identity/ReLU, which compute the same
# function, for engines that test ``isinstance``), swiglu with beta != 1 (``Swish``, not SiLU) and gpt-oss's
# clamped SwiGLU, which takes ``up`` too, so its MLP is not even ``act(gate) * up``.


@torch.fx.wrap
def _upcast(t: torch.Tensor) -> torch.Tensor:
    # One node under torch.fx (which records rather than runs it): choosing the dtype is a branch that a traced
    # tensor cannot take, and an engine tracing the MLP must get through these modules too.
    return t.to(compute_dtype(t.dtype))


class _TableActivation(nn.Module):
    """``gate_act(gate)`` of one variant, computed in fp32 (float64 stays float64) and cast back once."""

    def __init__(self, variant: GluVariant, params: GluParams):
        super().__init__()
        self.variant = variant
        self.params = params

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        return self.variant.gate_act(_upcast(gate), self.params).to(gate.dtype)

    def extra_repr(self) -> str:
        return self.variant.formula


class Sigmoid(_TableActivation, nn.Sigmoid):
    """``sigmoid(gate)``: the ``glu`` variant."""


class Identity(_TableActivation, nn.Identity):
    """``gate``: the ``bilinear`` variant."""


class ReLU(_TableActivation, nn.ReLU):
    """``relu(gate)``: the ``reglu`` variant."""


class Swish(_TableActivation):
    """``gate * sigmoid(beta * gate)``: the ``swiglu`` variant with beta != 1. Deliberately not an ``nn.SiLU``."""

    def extra_repr(self) -> str:
        return f"{self.variant.formula}, beta={self.params.beta}"


class ClampedSwiGLU(nn.Module):
    """gpt-oss's clamped SwiGLU of ``(gate, up)``: ``up`` is clamped and shifted too, so it is no ``act(gate)``."""

    def __init__(self, variant: GluVariant, params: GluParams):
        super().__init__()
        self.variant = variant
        self.params = params

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # glu_activation's maths, written without its checks (branches a traced tensor cannot take): gate and up
        # come from two projections of one input here.
        return self.variant.fn(_upcast(gate), _upcast(up), self.params).to(gate.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.params.alpha}, limit={self.params.limit}"


def _gelu_module(variant: GluVariant, params: GluParams) -> nn.Module:
    return nn.GELU()


def _gelu_tanh_module(variant: GluVariant, params: GluParams) -> nn.Module:
    return nn.GELU(approximate="tanh")


def _silu_or_swish(variant: GluVariant, params: GluParams) -> nn.Module:
    # swish with beta = 1 is SiLU exactly; any other beta is a function no engine has a kernel for.
    return nn.SiLU() if params.beta == 1.0 else Swish(variant, params)


def _gated(
    name: str,
    formula: str,
    origin: str,
    gate_act: Callable[[torch.Tensor, GluParams], torch.Tensor],
    module: Callable[[GluVariant, GluParams], nn.Module],
    param_names: tuple[str, ...] = (),
) -> GluVariant:
    """A variant of the form ``gate_act(gate) * up``: its ``fn`` is derived from ``gate_act``, never restated."""
    return GluVariant(name, formula, origin, partial(_times_up, gate_act), module, gate_act, param_names)


def _times_up(
    gate_act: Callable[[torch.Tensor, GluParams], torch.Tensor], gate: torch.Tensor, up: torch.Tensor, p: GluParams
) -> torch.Tensor:
    # A module-level function under functools.partial, not a lambda: models holding a variant stay picklable.
    return up * gate_act(gate, p)


# The table. Its order is the kernels' variant ids (GluVariant.kernel_id): append, never reorder.
VARIANTS: dict[str, GluVariant] = {
    v.name: v
    for v in (
        _gated("glu", "up * sigmoid(gate)", "Dauphin et al. 2017", _sigmoid, Sigmoid),
        _gated("bilinear", "up * gate", "Shazeer 2020", _identity, Identity),
        _gated("reglu", "up * relu(gate)", "Shazeer 2020", _relu, ReLU),
        _gated("geglu", "up * gelu_erf(gate)", "Shazeer 2020", _gelu, _gelu_module),
        _gated(
            "geglu_tanh",
            "up * gelu_tanh(gate)",
            "GPT-2 gelu_new, Gemma gelu_pytorch_tanh",
            _gelu_tanh,
            _gelu_tanh_module,
        ),
        _gated("swiglu", "up * gate * sigmoid(beta * gate)", "Shazeer 2020; Llama", _swish, _silu_or_swish, ("beta",)),
        GluVariant(
            "swiglu_oai",
            "(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)",
            "gpt-oss",
            _swiglu_oai,
            ClampedSwiGLU,
            param_names=("alpha", "limit"),
        ),
    )
}


def get_variant(name: str) -> GluVariant:
    """Return the spec of ``name``; an unknown name raises ValueError listing the known variants."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        known = sorted(VARIANTS)
        raise ValueError(f"glu_variant={name!r} is not a known GLU variant; expected one of {known}") from None


def require_finite_positive(field: str, value: object) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; expected a finite number > 0")


def check_params(params: GluParams) -> None:
    """Raise ValueError naming the parameter when β, α or the limit is not a finite positive number."""
    for field, value in (("glu_beta", params.beta), ("glu_alpha", params.alpha), ("glu_limit", params.limit)):
        require_finite_positive(field, value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the activation maths runs in for inputs of ``dtype``: at least fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def glu_activation(
    gate: torch.Tensor, up: torch.Tensor, variant: str | GluVariant, params: GluParams = GluParams()
) -> torch.Tensor:
    """The eager reference of the elementwise GLU: ``act(gate) * up`` for ``variant``.

    Differentiable by autograd; computed in fp32 (float64 for float64 inputs) and cast back once to
    the dtype of ``gate`` and ``up`` (which must match).
    """
    spec = variant if isinstance(variant, GluVariant) else get_variant(variant)
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    work = compute_dtype(gate.dtype)
    return spec.fn(gate.to(work), up.to(work), params).to(gate.dtype)


def activation_module(variant: str | GluVariant, params: GluParams = GluParams()) -> nn.Module:
    """The activation module of ``variant``: called as ``act(gate)``, or ``act(gate, up)`` where the variant's
    ``gate_act`` is ``None``. torch's own module (``nn.SiLU``, ``nn.GELU``) where one computes the variant."""
    spec = variant if isinstance(variant, GluVariant) else get_variant(variant)
    return spec.module(spec, params)
