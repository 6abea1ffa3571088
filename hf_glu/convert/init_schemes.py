"""How a GLU layer takes over a dense MLP: the ``preserve`` scheme per variant, with its error bound.

A GPT-2 MLP computes ``c_proj(act(z))`` with ``z = c_fc(x)``. The ``preserve`` scheme keeps ``c_proj`` as
``down_proj`` and builds ``gate_proj`` and ``up_proj`` as affine functions of the same ``z``:

    gate = gate_scale * z + gate_shift        (weights: gate_scale * c_fc.W, bias: gate_scale * c_fc.b + gate_shift)
    up   = up_scale * z + up_shift            (weights: up_scale * c_fc.W,   bias: up_scale * c_fc.b + up_shift)

so the GLU computes ``f(z) = variant(gate, up)`` elementwise, and the conversion is as faithful as
``f`` is close to ``act``. Per variant (``c`` = the maps below; bounds are ``max |f(z) - act(z)|`` per
intermediate unit for GPT-2's ``gelu_new``, computed in float64 by :func:`fit_unit_map`):

=============  ==========================================  ===============================================
variant        map (gate; up)                               bound vs gelu_new
=============  ==========================================  ===============================================
geglu_tanh     z; 0·x + 1                                   exact (also from gelu_pytorch_tanh)
geglu          z; 0·x + 1                                   4.8e-4 for all z (exact from erf gelu)
reglu          z; 0·x + 1                                   0.171 for all z (exact from relu)
swiglu         s·z; 0·x + 1/s, s = 1.7745 (minimax)         1.5e-2 for all z (exact from silu, s = 1)
glu            s·z; z, s = 1.7745 (minimax)                 1.5e-2 for all z; here up is NOT zero
swiglu_oai     s·z; 0·x + (1/s − 1), s minimax per layer    1.5e-2 while s·z < glu_limit; fitted on the
               on the recorded range of z                   recorded range, so the clamp is accounted for
bilinear       a·z + b; c·z + d, least squares per layer    measured per layer on the recorded range (a
               on recorded pre-activations                  quadratic only follows GELU on a finite range)
=============  ==========================================  ===============================================

The config's β, α and limit stay at their standard values (swiglu's β = 1, gpt-oss's α = 1.702 and
limit 7): the scale ``s`` lives in the weights, so the result is a plain SwiGLU that any SwiGLU code
runs, and fine-tuning moves ``s`` freely. ``up`` weights start at zero but are ordinary parameters:
their gradient is ``grad_out * act(gate)``, non-zero, so fine-tuning learns the gated path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import torch
from transformers.activations import ACT2FN

from ..glu import GluParams, get_variant
from .errors import ConversionError

INIT_SCHEMES = ("preserve", "random")
# Source activations we can reproduce, and for each variant the sources it matches exactly.
SUPPORTED_ACTIVATIONS = (
    "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "quick_gelu", "relu", "silu", "swish", "relu2"
)  # fmt: skip
EXACT_SOURCES = {
    "geglu_tanh": ("gelu_new", "gelu_pytorch_tanh"),
    "geglu": ("gelu",),
    "reglu": ("relu", "relu2"),  # relu(z)² = relu(z)·z: reglu with up = a copy of the gate
    "swiglu": ("silu", "swish"),
}
DOCUMENTED_BOUNDS_GELU_NEW = {"geglu_tanh": 0.0, "geglu": 4.8e-4, "reglu": 0.171, "swiglu": 1.5e-2, "glu": 1.5e-2}
# Variants whose map is fitted per layer on pre-activations recorded from calibration text.
CALIBRATED_VARIANTS = ("swiglu_oai", "bilinear")

# The range on which a fixed (data-independent) map is fitted: beyond it z·σ(sz) and GELU agree even
# better, so the bound holds for every z.
_FIXED_RANGE = (-10.0, 10.0)
_GRID_POINTS = 4001
_FINE_POINTS = 1001  # per refined grid peak: two grid steps searched again, 500 times finer
_REFINED_PEAKS = 32
# Significant digits of the bounds and fitted ranges the report and card state: ranges are rounded outwards,
# then the bound is computed over that range and rounded up, so every printed (bound, range) pair holds.
STATED_DIGITS = 3
_SCALE_SEARCH = (0.25, 8.0)


@dataclass(frozen=True)
class UnitMap:
    """The affine maps from the source pre-activation ``z`` to the GLU's gate and up inputs."""

    gate_scale: float
    gate_shift: float
    up_scale: float
    up_shift: float
    bound: float  # >= max |variant(gate, up) - act(z)| for every z in ``fit_range``, rounded up to STATED_DIGITS
    fit_range: tuple[float, float]
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


def check_activation(activation: str, field: str = "activation_function") -> None:
    """Raise ConversionError unless the source MLP activation is one we can convert from; ``field`` is the
    config field that holds it (``hidden_act`` in most families), named in the message."""
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConversionError(
            f"{field}={activation!r} is not supported; expected one of {list(SUPPORTED_ACTIVATIONS)}"
        )


def check_scheme(
    variant: str, init: str, activation: str, width: int | None, source_width: int, field: str = "activation_function"
) -> None:
    """The choices every conversion checks against its source (variant, init scheme, the source's activation,
    held in the config's ``field``, the GLU width); each refusal names what is accepted."""
    try:
        get_variant(variant)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if init not in INIT_SCHEMES:
        raise ConversionError(f"init={init!r} is not a known init scheme; expected one of {list(INIT_SCHEMES)}")
    check_activation(activation, field)
    if init == "preserve" and width is not None and width > source_width:
        # preserve keeps a subset of the source's units (hf_glu.convert.width): it cannot invent more.
        raise ConversionError(
            f"intermediate_size={width} is larger than the source's MLP width {source_width}; init='preserve' "
            f"keeps at most the source's units: expected an integer <= {source_width}, or init='random'"
        )


def _source_act(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACT2FN[activation]


def unit_output(variant: str, params: GluParams, m: UnitMap, z: torch.Tensor) -> torch.Tensor:
    """``variant(gate, up)`` for the map ``m`` applied to ``z``, through glu.py's reference maths."""
    gate = m.gate_scale * z + m.gate_shift
    up = m.up_scale * z + m.up_shift
    return get_variant(variant).fn(gate, up, params)


def _max_error(variant: str, params: GluParams, m: UnitMap, act: Callable, z: torch.Tensor) -> float:
    return (unit_output(variant, params, m, z) - act(z)).abs().max().item()


def _grid(lo: float, hi: float, points: int = _GRID_POINTS) -> torch.Tensor:
    return torch.linspace(lo, hi, points, dtype=torch.float64)


def _sup_error(variant: str, params: GluParams, m: UnitMap, act: Callable, lo: float, hi: float) -> float:
    """An upper bound of ``max |variant(gate, up) - act(z)|`` over every z in [lo, hi], not only grid points.

    Between two grid points the error may rise above both (by up to slope × spacing at a kink such as
    swiglu_oai's clamp or ReLU's corner), so each grid peak that could hide the maximum is searched again
    on a fine grid between its neighbours, and what that grid's spacing can still hide is added.
    """
    z = _grid(lo, hi)
    error = (unit_output(variant, params, m, z) - act(z)).abs()
    step = (z[1] - z[0]).item()
    rise = (error.diff().abs().max().item() if error.numel() > 1 else 0.0) * 2  # most a peak can hide between points
    padded = torch.cat([error.new_full((1,), -1.0), error, error.new_full((1,), -1.0)])
    is_peak = (error >= padded[:-2]) & (error >= padded[2:]) & (error >= error.max() - rise)
    peaks = torch.nonzero(is_peak).flatten()
    peaks = peaks[error[peaks].argsort(descending=True)[:_REFINED_PEAKS]]
    best = error.max().item()
    for i in peaks.tolist():
        fine = _grid(max(lo, z[i].item() - step), min(hi, z[i].item() + step), _FINE_POINTS)
        fine_error = (unit_output(variant, params, m, fine) - act(fine)).abs()
        # Between two fine points the error exceeds both by less than the largest step between neighbours.
        hidden = fine_error.diff().abs().max().item() if fine.numel() > 1 else 0.0
        best = max(best, fine_error.max().item() + hidden)
    return best


def _rounded(x: float, up: bool) -> float:
    """``x`` to :data:`STATED_DIGITS` significant digits, rounded up or down: what ``%.3g`` prints of the result
    is the result itself, so a bound rounded up stays true as printed."""
    if x == 0.0 or not math.isfinite(x):
        return x
    exponent = math.floor(math.log10(abs(x))) - (STATED_DIGITS - 1)
    digits = Decimal(repr(x)).scaleb(-exponent).to_integral_value(ROUND_CEILING if up else ROUND_FLOOR)
    return float(digits.scaleb(exponent))


def _scaled_family(variant: str, s: float) -> tuple[float, float, float, float]:
    """The one-parameter maps whose output is ``z·σ(s·z)``-like, each with ``s`` in the gate."""
    if variant == "swiglu":  # (1/s)·(sz)·σ(sz) = z·σ(sz)
        return s, 0.0, 0.0, 1.0 / s
    if variant == "glu":  # z·σ(sz)
        return s, 0.0, 1.0, 0.0
    if variant == "swiglu_oai":  # (b + 1)·g·σ(αg), g = min(sz, limit), b + 1 = 1/s
        return s, 0.0, 0.0, 1.0 / s - 1.0
    return 1.0, 0.0, 0.0, 1.0  # geglu, geglu_tanh, reglu: act(z)·1


def _minimax_scale(variant: str, params: GluParams, act: Callable, z: torch.Tensor) -> float:
    """The gate scale minimising the max error on ``z``: a coarse log-grid scan, then golden section."""

    def err(s: float) -> float:
        m = UnitMap(*_scaled_family(variant, s), bound=0.0, fit_range=(0.0, 0.0), exact=False)
        return _max_error(variant, params, m, act, z)

    lo, hi = _SCALE_SEARCH
    if variant == "swiglu_oai":  # the up clamp caps 1/s − 1 at the limit
        lo = max(lo, 1.0 / (params.limit + 1.0))
    scan = [lo * (hi / lo) ** (i / 96) for i in range(97)]
    best = min(range(len(scan)), key=lambda i: err(scan[i]))
    a, b = scan[max(best - 1, 0)], scan[min(best + 1, len(scan) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if err(c) <= err(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def _least_squares_quadratic(act: Callable, z: torch.Tensor) -> tuple[float, float, float, float]:
    """Fit ``act(z) ≈ p z² + q z + r`` and factor it as ``(a z + b)(c z + d)``.

    A quadratic with complex roots cannot be factored over the reals; then ``r`` is moved to the
    nearest value with a double root (``q² = 4pr``), the closest factorable quadratic in that
    coordinate.
    """
    basis = torch.stack([z * z, z, torch.ones_like(z)], dim=1)
    p, q, r = torch.linalg.lstsq(basis, act(z).unsqueeze(1)).solution.squeeze(1).tolist()
    if abs(p) < 1e-12:  # a line: gate carries it, up is the constant 1
        return q, r, 0.0, 1.0
    disc = q * q - 4 * p * r
    if disc < 0:
        r, disc = q * q / (4 * p), 0.0
    root = math.sqrt(disc)
    # p z² + q z + r = p (z − z1)(z − z2) = (p z − p z1)(z − z2)
    z1, z2 = (-q + root) / (2 * p), (-q - root) / (2 * p)
    return p, -p * z1, 1.0, -z2


def fit_unit_map(
    variant: str,
    activation: str,
    params: GluParams,
    recorded: torch.Tensor | None = None,
) -> UnitMap:
    """The ``preserve`` map for one layer, with its error bound.

    ``recorded``: that layer's pre-activations ``z`` from calibration text (any shape), needed by the
    calibrated variants (:data:`CALIBRATED_VARIANTS`); the others are fitted on a fixed range.
    """
    check_activation(activation)
    act = _source_act(activation)
    if activation == "relu2":
        # Squared ReLU grows without bound: no fixed or fitted gate reproduces it but ReGLU's up = z.
        if variant != "reglu":
            raise ConversionError(
                f"glu_variant={variant!r} cannot preserve a relu2 MLP; use 'reglu' (exact) or init='random'"
            )
        return UnitMap(1.0, 0.0, 1.0, 0.0, bound=0.0, fit_range=_FIXED_RANGE, exact=True)
    if variant in CALIBRATED_VARIANTS:
        if recorded is None or recorded.numel() == 0:
            raise ConversionError(f"glu_variant={variant!r} needs pre-activations recorded from calibration text")
        samples = recorded.detach().reshape(-1).to(torch.float64)
        # Outwards to the stated digits: the range covers every recorded sample, and the bound is computed
        # over exactly the range the card prints.
        low, high = min(samples.min().item(), -1.0), max(samples.max().item(), 1.0)
        fit_range = (_rounded(low, up=False), _rounded(high, up=True))
    else:
        samples, fit_range = None, _FIXED_RANGE
    grid = _grid(*fit_range)

    exact = activation in EXACT_SOURCES.get(variant, ())
    if variant == "bilinear":
        coefficients = _least_squares_quadratic(act, samples)
    elif variant in ("swiglu", "glu", "swiglu_oai") and not exact:
        coefficients = _scaled_family(variant, _minimax_scale(variant, params, act, grid))
    else:
        coefficients = _scaled_family(variant, 1.0)
    m = UnitMap(*coefficients, bound=0.0, fit_range=fit_range, exact=exact)
    bound = 0.0 if exact else _rounded(_sup_error(variant, params, m, act, *fit_range), up=True)
    return UnitMap(*coefficients, bound=bound, fit_range=fit_range, exact=exact)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t · scale`` rounded once to ``t``'s dtype: through float64, or directly when the product is exact
    anyway (a zero or a power-of-two scale), which gives the same bits without the float64 copies."""
    if scale == 0.0 or abs(math.frexp(scale)[0]) == 0.5:
        return t * scale
    return (t.double() * scale).to(t.dtype)


def preserved_projections(
    w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, m: UnitMap
) -> dict[str, torch.Tensor | None]:
    """The GLU projections of the ``preserve`` scheme for a dense MLP ``proj_out(act(proj_in(x)))``.

    Weights in ``nn.Linear`` layout (``[out, in]``). gate = gate_scale·z + gate_shift and
    up = up_scale·z + up_shift with z = proj_in(x); down = proj_out. A bias-free ``proj_in`` counts as a
    zero bias, so the shifts still land in the gate and up biases; ``down_proj.bias`` is ``b_out``.
    """
    b = b_in if b_in is not None else torch.zeros(w_in.shape[0], dtype=w_in.dtype)

    def affine(scale: float, shift: float, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Scale in float64 so the only rounding is the final cast; a zero scale gives exact zeros.
        # A unit scale keeps the input weight itself (once: two parameters never share a tensor).
        weight = w_in if reuse and scale == 1.0 else _scaled(w_in, scale)
        return weight, (b.double() * scale + shift).to(b.dtype)

    gate_w, gate_b = affine(m.gate_scale, m.gate_shift, reuse=True)
    up_w, up_b = affine(m.up_scale, m.up_shift, reuse=m.gate_scale != 1.0)
    return {
        "gate_proj.weight": gate_w,
        "gate_proj.bias": gate_b,
        "up_proj.weight": up_w,
        "up_proj.bias": up_b,
        "down_proj.weight": w_out,
        "down_proj.bias": b_out,
    }
