"""The GLU variant table: the single source of truth for every variant's maths.

A GLU feed-forward layer computes ``down(act(gate(x)) * up(x))``. This module holds, per variant, the
eager reference of the elementwise part ``(gate, up) -> out``. Everything else (the fused kernels, the
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

import torch
import torch.nn.functional as F

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
    """One GLU variant: its name, the paper or model it comes from, and its eager elementwise maths.

    ``fn(gate, up, params)`` receives tensors already in the compute dtype (fp32 or float64).
    """

    name: str
    formula: str
    origin: str
    fn: Callable[[torch.Tensor, torch.Tensor, GluParams], torch.Tensor]


def _glu(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * torch.sigmoid(gate)


def _bilinear(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * gate


def _reglu(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * torch.relu(gate)


def _geglu(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * F.gelu(gate)


def _geglu_tanh(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * F.gelu(gate, approximate="tanh")


def _swiglu(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    return up * (gate * torch.sigmoid(p.beta * gate))


def _swiglu_oai(gate: torch.Tensor, up: torch.Tensor, p: GluParams) -> torch.Tensor:
    gate = gate.clamp(max=p.limit)
    up = up.clamp(min=-p.limit, max=p.limit)
    return (up + 1) * (gate * torch.sigmoid(p.alpha * gate))


VARIANTS: dict[str, GluVariant] = {
    v.name: v
    for v in (
        GluVariant("glu", "up * sigmoid(gate)", "Dauphin et al. 2017", _glu),
        GluVariant("bilinear", "up * gate", "Shazeer 2020", _bilinear),
        GluVariant("reglu", "up * relu(gate)", "Shazeer 2020", _reglu),
        GluVariant("geglu", "up * gelu_erf(gate)", "Shazeer 2020", _geglu),
        GluVariant("geglu_tanh", "up * gelu_tanh(gate)", "GPT-2 gelu_new, Gemma gelu_pytorch_tanh", _geglu_tanh),
        GluVariant("swiglu", "up * gate * sigmoid(beta * gate)", "Shazeer 2020; Llama", _swiglu),
        GluVariant(
            "swiglu_oai",
            "(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)",
            "gpt-oss",
            _swiglu_oai,
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
