"""Conversion at a chosen GLU width: keep the most important source units, re-fit the down projection.

``preserve`` at the source's width keeps every unit, so the GLU MLP has three matrices to the dense MLP's
two (GPT-2 small: 124M → 152M parameters). At a smaller width ``N`` (``--intermediate-size N``, or
``--match-params``: the ``N`` at which the GLU MLP has the source MLP's parameter count) each layer keeps
``N`` of its units, and its down projection (and bias) is re-fitted to the source MLP's output:

1. Calibration text runs through the model once, all windows side by side in one batch. At each layer
   the MLP's input ``x`` is captured and the GLU units of the full-width ``preserve`` map are computed
   on it, as the converted model will compute them (its dtype, glu.py's maths).
2. Importance of unit ``j``: ``mean |a_j| · ‖down[:, j]‖``, its mean contribution to the output's norm.
   The ``N`` most important are kept, in their original order.
3. ``down`` and its bias are re-fitted by ridge regression of the source MLP's output on the kept units'
   outputs (float64; intercept unpenalised; ``λ = alpha · mean diagonal of the Gram matrix``).
4. The layer's output is replaced by the re-fitted GLU MLP's before the next layer runs, so every later
   layer is fitted on the inputs the converted model really gives it: errors are seen, not compounded
   unseen.

A width equal to the source's never comes here: it is today's ``preserve``, bit for bit. Measured on a
small trained GPT-2 (``benchmarks/recovery.py``): see the recovery study in docs/results.md.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..glu import GluParams, get_variant, glu_activation
from .errors import ConversionError
from .init_schemes import UnitMap, preserved_projections
from .surgery import Surgery

DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_RIDGE_ALPHA = 1e-3
ROUND_TO = 8  # --match-params rounds the width to a multiple of this (kernels and tensor cores like it)
IMPORTANCE = "mean |GLU unit output| × ‖down_proj column‖ on the calibration text"


@dataclass
class LayerFit:
    """One layer's width-reduced GLU MLP and how well it matches the source MLP on the calibration text."""

    weights: dict[str, torch.Tensor | None]  # gate_proj.weight … down_proj.bias, as preserved_projections names them
    kept: torch.Tensor  # indices of the source units kept, ascending
    calibration_relative_error: float  # ‖GLU(x) − source MLP(x)‖ / ‖source MLP(x)‖ on the calibration inputs


def linear_layout(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as ``nn.Linear`` stores it (``[out, in]``) and its bias; GPT-2's ``Conv1D``
    stores ``[in, out]``."""
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return weight, bias


def source_mlp_shape(surgery: Surgery, model: PreTrainedModel) -> tuple[int, int]:
    """``(hidden, width)`` of the source's MLP, read from its first layer's input projection."""
    proj_in, _, _ = surgery.source_mlp(surgery.source_layers(model)[0])
    width, hidden = linear_layout(proj_in)[0].shape
    return hidden, width


def source_mlp_parameters(surgery: Surgery, model: PreTrainedModel) -> int:
    """Parameters of every layer's dense MLP (both projections, weights and biases)."""
    total = 0
    for layer in surgery.source_layers(model):
        proj_in, _, proj_out = surgery.source_mlp(layer)
        total += sum(p.numel() for module in (proj_in, proj_out) for p in module.parameters())
    return total


def glu_biases(config) -> tuple[bool, bool, bool]:
    """Whether the converted config's ``gate_proj``, ``up_proj`` and ``down_proj`` have biases."""
    if hasattr(config, "glu_gate_down_bias"):  # a family's GLU config
        return config.glu_gate_down_bias, config.glu_up_proj_bias, config.glu_gate_down_bias
    return (config.mlp_bias,) * 3  # GluConfig: one switch for all three


def glu_mlp_parameters(hidden: int, width: int, biases: tuple[bool, bool, bool]) -> int:
    """Parameters of one GLU MLP: three ``hidden × width`` matrices, plus the biases it has (``width`` for
    gate and for up, ``hidden`` for down)."""
    gate_bias, up_bias, down_bias = biases
    return 3 * hidden * width + width * (int(gate_bias) + int(up_bias)) + hidden * int(down_bias)


def matched_width(source_parameters: int, hidden: int, source_width: int, biases: tuple[bool, bool, bool]) -> int:
    """The GLU width whose MLP has ``source_parameters`` (one layer's dense MLP, biases included), rounded to
    the nearest multiple of :data:`ROUND_TO`, within ``[ROUND_TO, source_width]``."""
    gate_bias, up_bias, down_bias = biases
    per_unit = 3 * hidden + int(gate_bias) + int(up_bias)
    exact = (source_parameters - hidden * int(down_bias)) / per_unit
    return max(ROUND_TO, min(source_width, ROUND_TO * round(exact / ROUND_TO)))


def calibration_batch(ids: torch.Tensor, max_length: int) -> torch.Tensor:
    """``ids`` ([1, n]) as rows of ``max_length`` tokens for one batched pass; a partial last window is
    dropped unless it is the only one."""
    n = ids.shape[-1]
    if n <= max_length:
        return ids[:, :n]
    rows = n // max_length
    return ids[0, : rows * max_length].reshape(rows, max_length)


def _ridge(a: torch.Tensor, y: torch.Tensor, alpha: float, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W`` ([out, in]) and ``b`` minimising ``‖a Wᵀ + b − y‖² + λ‖W‖²`` in float64, with
    ``λ = alpha · mean(diag(aᵀa))`` (scale-free) on centred data when there is an intercept."""
    a, y = a.double(), y.double()
    if intercept:
        a_mean, y_mean = a.mean(0), y.mean(0)
        a, y = a - a_mean, y - y_mean
    gram = a.T @ a
    lam = alpha * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    weight = torch.linalg.solve(gram, a.T @ y).T  # [out, in]
    bias = y_mean - weight @ a_mean if intercept else None
    return weight, bias


def fit_layer(
    x: torch.Tensor,
    full: dict[str, torch.Tensor | None],
    source: tuple[torch.Tensor, torch.Tensor | None, nn.Module, torch.Tensor, torch.Tensor | None],
    variant: str,
    params: GluParams,
    width: int,
    dtype: torch.dtype,
    down_bias: bool,
    alpha: float = DEFAULT_RIDGE_ALPHA,
) -> tuple[LayerFit, torch.Tensor]:
    """One layer's fit on its calibration inputs ``x`` ([tokens, hidden]); returns the fit and the
    re-fitted GLU MLP's output on ``x`` (in ``dtype``, as the converted model computes it).

    ``full``: the full-width ``preserve`` projections; ``source``: the dense MLP's ``(w_in, b_in, act,
    w_out, b_out)`` in ``nn.Linear`` layout, whose output on ``x`` is the target.
    """
    w_in, b_in, act, w_out, b_out = source
    target = F.linear(act(F.linear(x, w_in, b_in)), w_out, b_out).float()
    xc = x.to(dtype)

    def project(name: str) -> torch.Tensor:
        bias = full[f"{name}.bias"]
        return F.linear(xc, full[f"{name}.weight"].to(dtype), None if bias is None else bias.to(dtype))

    units = glu_activation(project("gate_proj"), project("up_proj"), get_variant(variant), params)
    importance = units.float().abs().mean(0) * w_out.float().norm(dim=0)
    kept = importance.topk(width).indices.sort().values
    kept_units = units[:, kept]
    weight, bias = _ridge(kept_units, target, alpha, intercept=down_bias)
    if not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
        raise ConversionError("the width re-fit gave non-finite weights; the calibration activations are not finite")
    reference_dtype = w_out.dtype
    weights = {
        "gate_proj.weight": full["gate_proj.weight"][kept].clone(),
        "gate_proj.bias": None if full["gate_proj.bias"] is None else full["gate_proj.bias"][kept].clone(),
        "up_proj.weight": full["up_proj.weight"][kept].clone(),
        "up_proj.bias": None if full["up_proj.bias"] is None else full["up_proj.bias"][kept].clone(),
        "down_proj.weight": weight.to(reference_dtype).contiguous(),
        "down_proj.bias": None if bias is None else bias.to(reference_dtype),
    }
    down_b = weights["down_proj.bias"]
    out = F.linear(kept_units, weights["down_proj.weight"].to(dtype), None if down_b is None else down_b.to(dtype))
    error = ((out.float() - target).norm() / target.norm().clamp_min(1e-30)).item()
    return LayerFit(weights=weights, kept=kept, calibration_relative_error=error), out


@torch.no_grad()  # not inference_mode: the fitted tensors become the converted model's parameters
def fit_reduced_mlps(
    model: PreTrainedModel,
    surgery: Surgery,
    unit_maps: list[UnitMap],
    variant: str,
    params: GluParams,
    width: int,
    calibration: torch.Tensor,
    dtype: torch.dtype,
    down_bias: bool,
    alpha: float = DEFAULT_RIDGE_ALPHA,
) -> list[LayerFit]:
    """Every layer's width-``width`` GLU MLP, fitted layer by layer on ``calibration`` ([windows, tokens]).

    One pass of the base model: a hook on each input projection captures the MLP's input, and a hook on the
    output projection replaces the source MLP's output with the re-fitted GLU MLP's, so later layers see the
    converted model's hidden states. The source model's weights are not changed.
    """
    layers = surgery.source_layers(model)
    fits: list[LayerFit | None] = [None] * len(layers)
    captured: dict[int, torch.Tensor] = {}
    hooks = []

    def capture(i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[i] = args[0]

        return hook

    def replace(i: int, source: tuple, full: dict):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = captured.pop(i)
            rows = x.reshape(-1, x.shape[-1])  # inline MLPs (OPT) see [tokens, hidden] already
            fits[i], out = fit_layer(rows, full, source, variant, params, width, dtype, down_bias, alpha)
            return out.to(output.dtype).reshape(output.shape)

        return hook

    for i, layer in enumerate(layers):
        proj_in, act, proj_out = surgery.source_mlp(layer)
        (w_in, b_in), (w_out, b_out) = linear_layout(proj_in), linear_layout(proj_out)
        full = preserved_projections(w_in, b_in, w_out, b_out, unit_maps[i])
        hooks.append(proj_in.register_forward_hook(capture(i)))
        hooks.append(proj_out.register_forward_hook(replace(i, (w_in, b_in, act, w_out, b_out), full)))
    was_training = model.training
    model.eval()
    try:
        model.base_model(calibration)  # every MLP is in the base model; heads need no calibration
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    missing = [i for i, fit in enumerate(fits) if fit is None]
    if missing:  # a family whose forward skips its MLP projections: a bug in its table row, not user input
        raise RuntimeError(f"the calibration pass did not reach the MLP of layers {missing}")
    return fits  # type: ignore[return-value]


def recovery_command(source: str, destination: str) -> str:
    """The fine-tuning recipe that recovers what the width reduction lost: distillation from the source."""
    model, teacher = shlex.quote(destination), shlex.quote(source)
    return (
        f"python recipes/finetune_trainer.py --model {model} --distill-from {teacher} --kd-alpha 0.5 "
        f"--output-dir {shlex.quote(destination + '-recovered')} --max-steps 1000 --lr 1e-4"
    )
