"""The fused GLU path and the one place that decides between it and the eager reference.

The fused MLP is one differentiable op: the gate and up GEMMs (cuBLAS), one Triton kernel for the
activation, the down GEMM. Eager calls enter it through an ``autograd.Function``; under
``torch.compile`` it is the ``torch.library`` custom op ``<ns>::glu_mlp``, one graph node. It keeps for
backward only the MLP input and the gate and up pre-activations; its backward runs one Triton kernel
that reads the activation's gradient and the saved pre-activations, writes d(gate) and d(up) over them
in place and re-emits the activation output (over its own gradient) for the down projection's weight
gradient. Under ``torch.compile`` that kernel writes new tensors instead (``<ns>::glu_mlp_act_backward``):
Inductor would clone saved tensors before letting an op write over them.

How the GEMMs sit around the kernels is a design (``MLP_DESIGNS``; ``fused_mlp_from_weights(..., design=)``, or
``MODEL_MLP_DESIGN`` for the model's dispatch): the default runs separate gate and up GEMMs; the packed candidates
run one GEMM for gate|up and keep the packed pre-activation instead (same bytes), for the GPT-2 widths where
launches and passes over memory weigh against GEMMs of under a millisecond (a GPU run decides).

Projections that are not plain ``nn.Linear`` (PEFT LoRA, quantised layers, hooked modules) are called
as modules, and only the elementwise part runs fused (``<ns>::glu_act``), so adapters are never skipped.

The kernels re-implement the maths of ``glu.py`` (the single source of truth) in fp32; the tests check
them against ``glu.glu_activation`` and its autograd in float64. Gate and up may be any 2-D strided
views (separate tensors, halves or interleaved columns of one packed tensor): kernels read them in place.

Copied into checkpoints for ``trust_remote_code`` users: imports only torch, transformers and ``.glu``;
triton is optional and imported inside ``try:``. With ``TRITON_INTERPRET=1`` (set before triton is
imported) the same kernels run on CPU tensors; that is how CI tests them.

The file reads top to bottom: constants, the Triton kernels, the launchers (plain tensor functions that check
their arguments and start the kernels), the ops (custom ops and autograd.Functions around the launchers), then
the dispatch that GluMLP asks (fused or eager, and which op).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .glu import GluParams, GluVariant, get_variant, glu_activation

try:  # torch builds without distributed support have no DTensor, and then no input can be one
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    _DTensor = None

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # CPU-only installs: the eager path serves
    TRITON_AVAILABLE = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# A checkpoint copy of this file is imported under another module name next to hf_glu's own: each copy
# registers its ops under its own namespace, or the second import would fail on a duplicate op name.
NAMESPACE = "hf_glu" if __name__ == "hf_glu.glu_triton" else "hf_glu_" + re.sub(r"\W", "_", __name__)

DEFAULT_PARAMS = GluParams()


@dataclass(frozen=True)
class KernelTuning:
    """How the launchers size the elementwise kernels' programs: the knobs ``benchmarks/bench_mlp.py --sweep``
    turns on a GPU (``launch_forward(..., tuning=)``); the ops always launch with ``DEFAULT_KERNEL_TUNING``."""

    # Elements per program: large enough to hide memory latency, small enough for registers.
    block_elements: int = 4096
    # Warps per program of the forward on gate and up with column stride 1 (separate tensors, halves).
    num_warps: int = 4
    # Warps of the backward kernel, and of the forward when gate or up has a column stride other than 1
    # (interleaved views: nothing to vectorize, one address per element). Those kernels hold more live values per
    # element, and at 4 warps the registers a thread needs for its share of a block run out (spills); 8 warps halve
    # each thread's share. The contiguous forward keeps 4, where 8 ran slower. Spill counts and timings:
    # benchmarks/results/gpu_compile.md (`make gpu-compile`, bench_mlp --sweep).
    wide_num_warps: int = 8


DEFAULT_KERNEL_TUNING = KernelTuning()
# Rows a tile holds, at most. Binding only for tiles of 16 columns or fewer (intermediate widths under 16), where
# a row is too narrow for vector loads and each element takes its own 64-bit address: taller tiles of
# KernelTuning.block_elements spill registers in the backward; at this cap no narrow compile does (same record).
_MAX_BLOCK_M = 128
# Row tiles one backward program walks when it also sums the bias gradients, at most: the more rows a program
# sums, the fewer fp32 partial sums (one row per program) are written and reduced afterwards; 16 tiles of 4 rows
# make them 1/64 of [tokens, intermediate]. Fewer tokens get fewer tiles a program (_row_tiles_per_program), halving
# down to 1, so the kernel compiles for these few ROW_TILES values only (the AOT compile check enumerates them).
# Provisional: not yet timed on a GPU against other values.
_BIAS_ROW_TILES = 16
BIAS_ROW_TILE_CHOICES = tuple(1 << i for i in range(_BIAS_ROW_TILES.bit_length()))
# Programs the bias-summing backward aims for: two per SM keeps every SM busy (one waits on memory while the
# other computes). Devices that cannot be asked (the interpreter, ahead-of-time checks) count as an H100's 132.
_PROGRAMS_PER_SM = 2
_DEFAULT_SM_COUNT = 132


@dataclass(frozen=True)
class MlpDesign:
    """How the whole-MLP op arranges its GEMMs around the elementwise kernels (candidates for GPT-2's widths,
    where the GEMMs take under a millisecond and every launch and pass over memory shows).

    ``packing``: ``"separate"`` runs one GEMM each for gate and up (two [tokens, intermediate] outputs);
    ``"halves"`` / ``"interleaved"`` concatenate the gate and up weights (and biases) per call into one
    ``[2 * intermediate, hidden]`` matrix (gate rows then up rows, or alternating) and run one GEMM for both,
    the kernels reading gate and up as column views of its output; backward then writes d(gate|up) over that
    packed output and takes one GEMM for both weight gradients (returned as views) and one for the input's.
    ``bias_sums``: ``"kernel"`` sums the gate and up bias gradients inside the backward kernel (per-program
    partial sums); ``"torch"`` leaves the kernel without them and sums d(gate|up) over the tokens afterwards.
    """

    packing: str
    bias_sums: str


# The candidates benchmarks/bench_mlp.py times side by side (its --designs); "separate" is the default path.
MLP_DESIGNS = {
    "separate": MlpDesign("separate", "kernel"),
    "separate_torch_bias": MlpDesign("separate", "torch"),
    "packed": MlpDesign("halves", "kernel"),
    "packed_torch_bias": MlpDesign("halves", "torch"),
    "packed_interleaved": MlpDesign("interleaved", "kernel"),
}
DEFAULT_MLP_DESIGN = "separate"
# The design fused_mlp_forward (the model's dispatch) passes at every call: set it to time a whole model on another
# candidate; bench_mlp passes design= to fused_mlp_from_weights instead.
MODEL_MLP_DESIGN = DEFAULT_MLP_DESIGN


# Below this many tokens, a forward without autograd (generation, evaluation) runs eager under "auto": at
# decode sizes the GEMMs take microseconds and the fused path's host-side work per call (checks, launch
# configuration, the Triton launch) can cost more than the eager elementwise kernels it replaces.
# Provisional: not yet measured on a GPU; benchmarks/bench_mlp.py's inference table reports the crossover.
INFERENCE_EAGER_BELOW_TOKENS = 64
# The probe's tensor: 1024 columns pick the block shape most models' widths (>= 1024) use.
_PROBE_SHAPE = (16, 1024)
# torch.nn.modules.module's registries of hooks for every module, which _is_plain_linear asks about. Private names:
# each is read with a default, so a torch version that lacks one (checkpoint copies run on the user's torch) still
# runs this file.
_nn_module = torch.nn.modules.module
_GLOBAL_HOOK_REGISTRIES = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


# ----------------------------------------------------------------------------------------------------
# Triton kernels.


if TRITON_AVAILABLE:
    # The kernels branch on the variant at compile time, by glu.py's table position (GluVariant.kernel_id).
    _GLU, _BILINEAR, _REGLU, _GEGLU, _GEGLU_TANH, _SWIGLU, _SWIGLU_OAI = (
        tl.constexpr(get_variant(name).kernel_id)
        for name in ("glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu", "swiglu_oai")
    )

    @triton.jit
    def _sigmoid_and_grad(z):
        # σ(z) and σ'(z) = σ(z)(1 - σ(z)) from one exp and one division: with e = exp(-|z|) and
        # r = 1 / (1 + e), σ = r (z >= 0) or e·r (z < 0) and σ' = e·r². exp of minus the magnitude never
        # overflows, so ±inf and |z| = 1e4 stay exact, and σ' has none of the cancellation of 1 - σ near 1.
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        return tl.where(z >= 0, r, e * r), e * r * r

    @triton.jit
    def _exp_neg_half_square(z):
        # exp(-z²/2) with z² split as zs² + (z - zs)(z + zs): zs has few bits so zs² is exact, which keeps
        # full relative precision in the tail (rounding z² to fp32 alone costs up to 1e-5 there). Beyond
        # |z| = 40 the result is 0 in fp32; the cap also keeps inf - inf out.
        za = tl.abs(z)
        za = tl.where(za > 40.0, 40.0, za)
        zs = tl.floor(za * 16.0) / 16.0
        return tl.exp(-0.5 * zs * zs) * tl.exp(-0.5 * (za - zs) * (za + zs))

    @triton.jit
    def _normal_cdf(z):
        # Φ(z) = erfc(-z/√2) / 2, with erfc from Numerical Recipes' erfcc (relative error < 1.2e-7): unlike
        # 1 + erf(z/√2) it has no cancellation in the left tail. libdevice's erfc would do, but the
        # interpreter CI runs does not provide it.
        x = tl.abs(z) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * x)
        p = 0.17087277
        p = -0.82215223 + t * p
        p = 1.48851587 + t * p
        p = -1.13520398 + t * p
        p = 0.27886807 + t * p
        p = -0.18628806 + t * p
        p = 0.09678418 + t * p
        p = 0.37409196 + t * p
        p = 1.00002368 + t * p
        half_erfc = 0.5 * t * _exp_neg_half_square(z) * tl.exp(t * p - 1.26551223)
        return tl.where(z < 0, half_erfc, 1.0 - half_erfc)

    @triton.jit
    def _swish_and_grad(grad, g, scale):
        # The product rule in the order autograd applies it to glu.py's g * sigmoid(scale * g), so an
        # infinite upstream gradient gives NaN exactly where the reference's inf - inf does.
        s, ds = _sigmoid_and_grad(scale * g)
        return g * s, grad * s + (grad * g) * ds * scale

    @triton.jit
    def _gate_act_and_grad(g, grad, VARIANT: tl.constexpr, beta, alpha, limit):
        """(act(gate), d(gate) given grad = d(act(gate))) in fp32, sharing the exp and the division.

        The forward kernel keeps only the first; the compiler drops the unused gradient. Masks are selects,
        as torch's autograd applies them, so a NaN elsewhere does not leak through: relu passes the gradient
        unless its output is <= 0; clamp passes it inside the closed range.
        """
        if VARIANT == _GLU:
            act, dsig = _sigmoid_and_grad(g)
            dg = grad * dsig
        elif VARIANT == _BILINEAR:
            act, dg = g, grad
        elif VARIANT == _REGLU:  # where(g < 0) keeps NaN, as torch.relu does
            act, dg = tl.where(g < 0, 0.0, g), tl.where(g <= 0, 0.0, grad)
        elif VARIANT == _GEGLU:  # erf form; F.gelu's backward: one product with cdf + g * pdf
            cdf = _normal_cdf(g)
            act = g * cdf
            dg = grad * (cdf + g * _exp_neg_half_square(g) * 0.3989422804014327)
        elif VARIANT == _GEGLU_TANH:  # 0.5(1 + tanh(y)) = σ(2y), stable for any |g|
            s, ds = _sigmoid_and_grad(1.5957691216057308 * (g + 0.044715 * g * g * g))
            act = g * s
            dg = grad * (s + g * ds * 1.5957691216057308 * (1.0 + 0.134145 * g * g))
        elif VARIANT == _SWIGLU:
            act, dg = _swish_and_grad(grad, g, beta)
        elif VARIANT == _SWIGLU_OAI:  # min(gate, limit) keeps NaN, as torch.clamp does
            act, dg = _swish_and_grad(grad, tl.where(g > limit, limit, g), alpha)
            dg = tl.where(g <= limit, dg, 0.0)
        else:  # a row of glu.VARIANTS without a branch here: a compile error, never another variant's maths
            tl.static_assert(False, "the fused GLU kernels have no branch for this variant")
        return act, dg

    @triton.jit
    def _up_term(u, VARIANT: tl.constexpr, limit):
        if VARIANT == _SWIGLU_OAI:  # clamp(up, -limit, limit) + 1, NaN kept
            return tl.where(u > limit, limit, tl.where(u < -limit, -limit, u)) + 1.0
        return u

    @triton.jit
    def _tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        # int64 offsets: a packed [tokens, 2 * intermediate] tensor can pass 2**31 elements.
        return rows[:, None].to(tl.int64), cols[None, :].to(tl.int64), mask

    @triton.jit
    def _glu_fwd_kernel(
        GATE, UP, OUT, M, N,
        s_gm, s_gn, s_um, s_un, s_om, s_on,
        beta, alpha, limit,
        VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        r, c, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
        g = tl.load(GATE + r * s_gm + c * s_gn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(UP + r * s_um + c * s_un, mask=mask, other=0.0).to(tl.float32)
        act, _ = _gate_act_and_grad(g, g, VARIANT, beta, alpha, limit)
        out = act * _up_term(u, VARIANT, limit)
        tl.store(OUT + r * s_om + c * s_on, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        DOUT, GATE, UP, DGATE, DUP, OUT, BIAS_PARTIAL, M, N,
        s_dom, s_don, s_gm, s_gn, s_um, s_un, s_dgm, s_dgn, s_dum, s_dun, s_om, s_on,
        beta, alpha, limit,
        VARIANT: tl.constexpr, STORE_OUT: tl.constexpr, BIAS_GRADS: tl.constexpr, ROW_TILES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Every element is loaded before any is stored, so DGATE/DUP/OUT may alias GATE/UP/DOUT (the in-place form).
        # A program walks ROW_TILES row tiles of one column block. With BIAS_GRADS it also sums d(gate) and d(up)
        # over its rows in fp32 and writes the two partial sums to row pid_m of BIAS_PARTIAL [2, programs, N]:
        # the bias gradients without another pass over [tokens, intermediate], in a fixed order (deterministic).
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sum_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(ROW_TILES):
            r, c, mask = _tile(pid_m * ROW_TILES + tile, pid_n, M, N, BLOCK_M, BLOCK_N)
            do = tl.load(DOUT + r * s_dom + c * s_don, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(GATE + r * s_gm + c * s_gn, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(UP + r * s_um + c * s_un, mask=mask, other=0.0).to(tl.float32)
            h = _up_term(u, VARIANT, limit)
            act, dg = _gate_act_and_grad(g, do * h, VARIANT, beta, alpha, limit)
            du = do * act
            if VARIANT == _SWIGLU_OAI:  # clamp(up): the gradient passes inside the closed range only
                du = tl.where((u >= -limit) & (u <= limit), du, 0.0)
            tl.store(DGATE + r * s_dgm + c * s_dgn, dg.to(DGATE.dtype.element_ty), mask=mask)
            tl.store(DUP + r * s_dum + c * s_dun, du.to(DUP.dtype.element_ty), mask=mask)
            if STORE_OUT:
                tl.store(OUT + r * s_om + c * s_on, (act * h).to(OUT.dtype.element_ty), mask=mask)
            if BIAS_GRADS:  # select, not multiply: a NaN or inf outside the tensor must not enter the sum
                sum_g += tl.sum(tl.where(mask, dg, 0.0), axis=0)
                sum_u += tl.sum(tl.where(mask, du, 0.0), axis=0)
        if BIAS_GRADS:
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offsets = pid_m.to(tl.int64) * N + cols
            tl.store(BIAS_PARTIAL + offsets, sum_g, mask=cols < N)
            tl.store(BIAS_PARTIAL + tl.num_programs(0).to(tl.int64) * N + offsets, sum_u, mask=cols < N)


# ----------------------------------------------------------------------------------------------------
# Launchers: plain tensor functions, no autograd. launch_forward and launch_backward start the kernels; the op
# bodies after them (_act_forward, _act_grads, _mlp_act_grads, _packed_mlp_act_grads, _glu_mlp_forward) check
# their arguments (_check_kernel_inputs), allocate the outputs and call them, around the GEMMs for the whole MLP.


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, columns]; a view (no copy) for contiguous tensors and column slices of them."""
    return t.reshape(-1, t.shape[-1])


def _empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _check_kernel_inputs(name: str, t: torch.Tensor, *, in_place: bool = False, **same_as_t: torch.Tensor) -> None:
    """The argument check every op body makes before a launch: triton imports; ``t`` (``name`` in the messages)
    has a dtype the kernels take, on a device they reach; each of ``same_as_t`` has its shape, dtype and device;
    with ``in_place``, each of them can be written through its [rows, columns] view."""
    if not TRITON_AVAILABLE:
        raise ImportError("the fused GLU kernels need triton; install it with `pip install 'hf-glu[gpu]'`")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} has dtype {t.dtype}; the fused GLU kernels accept {list(SUPPORTED_DTYPES)} "
            "(use glu_kernel='eager' for others)"
        )
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(
            f"{name} is on {t.device}; the fused GLU kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is imported to run them on CPU"
        )
    for other_name, other in same_as_t.items():
        if other.shape != t.shape or other.dtype != t.dtype or other.device != t.device:
            raise ValueError(
                f"{other_name} is {tuple(other.shape)} {other.dtype} on {other.device}; expected the {name}'s "
                f"{tuple(t.shape)} {t.dtype} on {t.device}"
            )
    if in_place:  # the kernel writes through the [rows, columns] view: a reshape that copied would lose it
        for written_name, w in ((name, t), *same_as_t.items()):
            if _as_rows(w).data_ptr() != w.data_ptr() or (w.dim() != 2 and not w.is_contiguous()):
                raise ValueError(
                    f"{written_name} must be 2-D or contiguous to be written in place, got strides {w.stride()}"
                )


def split_gate_up(packed: torch.Tensor, layout: str = "halves") -> tuple[torch.Tensor, torch.Tensor]:
    """Views (no copy) of gate and up in a packed ``[..., 2 * intermediate]`` tensor.

    ``"halves"``: gate then up (``torch.chunk`` order); ``"interleaved"``: gate in even columns, up in odd
    ones (gpt-oss's layout).
    """
    if packed.shape[-1] % 2:
        raise ValueError(f"packed gate/up has {packed.shape[-1]} columns; expected an even number")
    if layout == "halves":
        return packed.chunk(2, dim=-1)
    if layout == "interleaved":
        return packed[..., 0::2], packed[..., 1::2]
    raise ValueError(f"layout={layout!r} is invalid; expected 'halves' or 'interleaved'")


def _launch_config(
    rows: int, cols: int, tuning: KernelTuning = DEFAULT_KERNEL_TUNING
) -> tuple[tuple[int, int], int, int]:
    block_n = min(triton.next_power_of_2(cols), 1024)
    block_m = max(1, min(tuning.block_elements // block_n, _MAX_BLOCK_M))
    return (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n)), block_m, block_n


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _row_tiles_per_program(row_blocks: int, col_blocks: int, target_programs: int) -> int:
    """Row tiles per program for the bias-summing backward: the most (fewest partial sums) of
    ``BIAS_ROW_TILE_CHOICES`` that still give ``target_programs`` programs, else 1 (the most programs the work
    allows). Powers of two, so each token count does not compile a kernel of its own."""
    tiles = _BIAS_ROW_TILES
    while tiles > 1 and triton.cdiv(row_blocks, tiles) * col_blocks < target_programs:
        tiles //= 2
    return tiles


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device for a launch: Triton launches on the current device and its
    stream, not the tensors', so a model spread over GPUs (``device_map="auto"``) would otherwise run the
    kernel on another GPU's memory. CPU tensors (the interpreter) need no guard."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def launch_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    out: torch.Tensor,
    variant: str,
    params: GluParams,
    tuning: KernelTuning = DEFAULT_KERNEL_TUNING,
) -> None:
    """Runs the forward kernel: ``out = act(gate) * up`` for ``variant``, all three [..., columns] of one shape.

    The bare launch the op bodies make after checking their arguments; it checks nothing itself, so the
    kernel sweep (``benchmarks/bench_mlp.py``) times the kernel alone and the compile check
    (``benchmarks/gpu_compile.py``) records its launches on meta tensors."""
    g, u, o = _as_rows(gate), _as_rows(up), _as_rows(out)
    if g.numel() == 0:  # an empty grid is not a valid CUDA launch
        return
    grid, block_m, block_n = _launch_config(*g.shape, tuning)
    warps = tuning.num_warps if g.stride(1) == u.stride(1) == 1 else tuning.wide_num_warps
    with _device_guard(g.device):
        _glu_fwd_kernel[grid](
            g, u, o, *g.shape, *_strides(g, u, o), params.beta, params.alpha, params.limit,
            VARIANT=get_variant(variant).kernel_id, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip


def launch_backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    dgate: torch.Tensor,
    dup: torch.Tensor,
    out: torch.Tensor | None,
    variant: str,
    params: GluParams,
    bias_grads: bool = False,
    tuning: KernelTuning = DEFAULT_KERNEL_TUNING,
) -> torch.Tensor | None:
    """Runs the backward kernel: d(gate) and d(up) from ``grad``, the gradient of ``act(gate) * up``, and into
    ``out`` (unless None) that product again; ``dgate``, ``dup`` and ``out`` may be ``gate``, ``up`` and ``grad``
    (in place). With ``bias_grads``, returns the column sums of d(gate) and d(up) as one fp32 ``[2, columns]``
    tensor (the bias gradients), else None. Checks nothing, as ``launch_forward``."""
    do, g, u, dg, du = (_as_rows(t) for t in (grad, gate, up, dgate, dup))
    o = do if out is None else _as_rows(out)  # unused when STORE_OUT is off
    rows, cols = g.shape
    if g.numel() == 0:
        return torch.zeros(2, cols, dtype=torch.float32, device=g.device) if bias_grads else None
    (row_blocks, col_blocks), block_m, block_n = _launch_config(rows, cols, tuning)
    target = _PROGRAMS_PER_SM * _sm_count(g.device)
    row_tiles = _row_tiles_per_program(row_blocks, col_blocks, target) if bias_grads else 1
    grid = (triton.cdiv(rows, block_m * row_tiles), col_blocks)
    # One fp32 row of partial sums per row program, for gate and for up; unused (and tiny) without bias_grads.
    partial = torch.empty((2, grid[0] if bias_grads else 1, cols), dtype=torch.float32, device=g.device)
    with _device_guard(g.device):
        _glu_bwd_kernel[grid](
            do, g, u, dg, du, o, partial, rows, cols, *_strides(do, g, u, dg, du, o),
            params.beta, params.alpha, params.limit,
            VARIANT=get_variant(variant).kernel_id, STORE_OUT=out is not None, BIAS_GRADS=bias_grads,
            ROW_TILES=row_tiles, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=tuning.wide_num_warps,
        )  # fmt: skip
    return partial.sum(1) if bias_grads else None


def _act_forward(
    gate: torch.Tensor, up: torch.Tensor, variant: str, beta: float, alpha: float, limit: float
) -> torch.Tensor:
    _check_kernel_inputs("gate", gate, up=up)
    out = _empty(gate)
    launch_forward(gate, up, out, variant, GluParams(beta, alpha, limit))
    return out


def _act_grads(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, variant: str, beta: float, alpha: float, limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d(gate), d(up)) of the elementwise op in new tensors: the caller's projections may still hold gate and up."""
    _check_kernel_inputs("gate", gate, up=up, grad=grad)
    dgate, dup = _empty(gate), _empty(up)
    launch_backward(grad, gate, up, dgate, dup, None, variant, GluParams(beta, alpha, limit))
    return dgate, dup


def _mlp_act_grads(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    variant: str,
    beta: float,
    alpha: float,
    limit: float,
    bias_grads: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MLP backward's kernel call: (d(gate), d(up), the activation output for the down projection's weight
    gradient, and with ``bias_grads`` the column sums of d(gate) and d(up) as one ``[2, columns]`` tensor in the
    gate's dtype, else an empty ``[0, columns]`` one).

    ``in_place`` (the eager backward) writes the first three over gate, up and grad, and bumps their version
    counters as a mutating op would, so a second backward through the overwritten tensors is refused rather than
    silently wrong. Without it (the traced backward's node, ``<ns>::glu_mlp_act_backward``) they are new tensors:
    Inductor never writes over a backward graph's inputs (the tensors saved by forward), so a mutating op there
    becomes a clone of each [tokens, intermediate] input first, two extra passes over memory; fresh outputs cost
    the same allocations and no copies, and the saved tensors die after it.
    """
    _check_kernel_inputs("gate", gate, in_place=in_place, up=up, grad=grad)
    if in_place:
        dgate, dup, act = gate, up, grad
    else:
        dgate, dup, act = _empty(gate), _empty(up), _empty(grad)
    sums = launch_backward(grad, gate, up, dgate, dup, act, variant, GluParams(beta, alpha, limit), bias_grads)
    if in_place:
        for t in (grad, gate, up):
            torch.autograd.graph.increment_version(t)
    return dgate, dup, act, gate.new_empty((0, gate.shape[-1])) if sums is None else sums.to(gate.dtype)


def _packed_mlp_act_grads(
    grad: torch.Tensor,
    packed: torch.Tensor,
    packing: str,
    variant: str,
    beta: float,
    alpha: float,
    limit: float,
    bias_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The traced (torch.compile) backward node of the packed designs: (d(gate|up) in a new packed tensor laid
    out as ``packed``, the activation, the bias sums or an empty ``[0, columns]`` tensor). Functional for the
    reason ``_mlp_act_grads`` is without ``in_place``."""
    gate, up = split_gate_up(packed, packing)
    _check_kernel_inputs("gate", gate, grad=grad)
    dpacked = _empty(packed)
    dgate, dup = split_gate_up(dpacked, packing)
    act = _empty(grad)
    sums = launch_backward(grad, gate, up, dgate, dup, act, variant, GluParams(beta, alpha, limit), bias_grads)
    return dpacked, act, gate.new_empty((0, gate.shape[-1])) if sums is None else sums.to(gate.dtype)


def _design_named(name: str) -> MlpDesign:
    design = MLP_DESIGNS.get(name)
    if design is None:
        raise ValueError(f"design={name!r} is not a fused MLP design; expected one of {sorted(MLP_DESIGNS)}")
    return design


def _pack_rows(gate: torch.Tensor | None, up: torch.Tensor | None, packing: str) -> torch.Tensor | None:
    """Gate and up weights ([intermediate, hidden]) or biases ([intermediate]) as one packed tensor along the
    first dimension, laid out as ``split_gate_up`` reads the GEMM's output columns; a missing bias of the two
    becomes zeros (None if both are)."""
    if gate is None and up is None:
        return None
    gate = torch.zeros_like(up) if gate is None else gate
    up = torch.zeros_like(gate) if up is None else up
    if packing == "halves":
        return torch.cat([gate, up])
    return torch.stack([gate, up], 1).flatten(0, 1)


def _unpack_rows(packed: torch.Tensor, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Views, no copy: the packed designs' weight and bias gradients come out of one GEMM or one sum.
    if packing == "halves":
        return packed.chunk(2, dim=0)
    return packed[0::2], packed[1::2]


def _glu_mlp_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    variant: str,
    beta: float,
    alpha: float,
    limit: float,
    design: str = DEFAULT_MLP_DESIGN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MLP output, then what backward keeps: the gate and up pre-activations, or for a packed design their
    packed ``[tokens, 2 * intermediate]`` tensor and an empty one)."""
    _check_kernel_inputs("x", x)
    packing = _design_named(design).packing
    rows = _as_rows(x)
    if packing == "separate":
        gate = kept = F.linear(rows, gate_weight, gate_bias)
        up = other = F.linear(rows, up_weight, up_bias)
    else:
        kept = F.linear(rows, _pack_rows(gate_weight, up_weight, packing), _pack_rows(gate_bias, up_bias, packing))
        gate, up = split_gate_up(kept, packing)
        other = kept.new_empty(0)
    act = _empty(gate)
    launch_forward(gate, up, act, variant, GluParams(beta, alpha, limit))
    out = F.linear(act, down_weight, down_bias)
    return out.view(*x.shape[:-1], out.shape[-1]), kept, other


# ----------------------------------------------------------------------------------------------------
# The ops: the op bodies above as autograd and torch.compile see them. Each is entered through an
# autograd.Function in eager mode (the custom op's Python dispatch costs more than the GPU work at small sizes,
# and the GPU waits for it) and through a torch.library custom op under torch.compile, which needs one opaque
# graph node; the _traced_* functions are the custom ops' autograd registrations. Variant and parameters travel
# as plain str/float so the schema stays simple. glu_activation_fused and fused_mlp_from_weights, at the end,
# pick the entry.


def _first_order_only(backward: Callable) -> Callable:
    """Refuses a backward that would build a graph (``create_graph=True``): the kernels' gradients are not
    themselves differentiable, so a second-order gradient through them would be silently wrong.

    Raised at once rather than deferred as ``torch.autograd.function.once_differentiable`` does: its deferred
    error sits off the path to the weights, so ``torch.autograd.grad(..., weights)`` would drop this MLP's
    second-order terms without a word. The engine enables grad mode in a backward only for create_graph.
    """

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused GLU kernels have no second-order gradient: a backward with create_graph=True (double "
                "backward) through this MLP needs glu_kernel='eager'"
            )
        return backward(ctx, *grads)

    return checked


def _glu_act_setup(ctx, inputs, output) -> None:
    gate, up, *act_args = inputs
    ctx.save_for_backward(gate, up)
    ctx.act_args = act_args


class _GluActFunction(torch.autograd.Function):
    """The eager entry of the elementwise op; ``<ns>::glu_act`` is the same under ``torch.compile``."""

    forward = staticmethod(_act_forward)
    setup_context = staticmethod(_glu_act_setup)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        return (*_act_grads(grad, *ctx.saved_tensors, *ctx.act_args), None, None, None, None)


_glu_act_op = torch.library.custom_op(f"{NAMESPACE}::glu_act", mutates_args=())(_act_forward)


@_glu_act_op.register_fake
def _(gate, up, variant, beta, alpha, limit):
    return _empty(gate)


_glu_act_backward_op = torch.library.custom_op(f"{NAMESPACE}::glu_act_backward", mutates_args=())(_act_grads)


@_glu_act_backward_op.register_fake
def _(grad, gate, up, variant, beta, alpha, limit):
    return _empty(gate), _empty(up)


@_first_order_only
def _traced_glu_act_backward(ctx, grad):
    return (*_glu_act_backward_op(grad, *ctx.saved_tensors, *ctx.act_args), None, None, None, None)


_glu_act_op.register_autograd(_traced_glu_act_backward, setup_context=_glu_act_setup)


# The schema leaves in_place out: the op is the functional form only.
_glu_mlp_act_backward_op = torch.library.custom_op(
    f"{NAMESPACE}::glu_mlp_act_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor gate, Tensor up, str variant, float beta, float alpha, float limit, "
    "bool bias_grads) -> (Tensor, Tensor, Tensor, Tensor)",
)(_mlp_act_grads)


@_glu_mlp_act_backward_op.register_fake
def _(grad, gate, up, variant, beta, alpha, limit, bias_grads):
    return _empty(gate), _empty(up), _empty(grad), gate.new_empty((2 if bias_grads else 0, gate.shape[-1]))


_glu_mlp_packed_act_backward_op = torch.library.custom_op(f"{NAMESPACE}::glu_mlp_packed_act_backward", mutates_args=())(
    _packed_mlp_act_grads
)


@_glu_mlp_packed_act_backward_op.register_fake
def _(grad, packed, packing, variant, beta, alpha, limit, bias_grads):
    return _empty(packed), _empty(grad), packed.new_empty((2 if bias_grads else 0, packed.shape[-1] // 2))


def _save_for_mlp_backward(ctx, inputs: tuple, kept: torch.Tensor, other: torch.Tensor) -> None:
    x, gate_weight, _, up_weight, _, down_weight, _, *act_args = inputs
    # The whole memory cost of backward: x and two [tokens, intermediate] tensors (weights are parameters).
    ctx.save_for_backward(x, gate_weight, up_weight, down_weight, kept, other)
    ctx.act_args = act_args[:4]
    ctx.design = act_args[4] if len(act_args) > 4 else DEFAULT_MLP_DESIGN


def _pre_activation_grads(
    act: torch.Tensor,
    kept: torch.Tensor,
    other: torch.Tensor,
    packing: str,
    act_args: list,
    bias_grads: bool,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(d gate, d up, d(gate|up) packed or None, the activation, the kernel's bias sums) from the backward
    kernel: ``in_place`` over the saved tensors in eager mode, into new ones through the ops when traced."""
    if packing == "separate":
        if in_place:
            dgate, dup, act, sums = _mlp_act_grads(act, kept, other, *act_args, bias_grads, in_place=True)
        else:
            dgate, dup, act, sums = _glu_mlp_act_backward_op(act, kept, other, *act_args, bias_grads)
        return dgate, dup, None, act, sums
    if in_place:
        gate, up = split_gate_up(kept, packing)
        _, _, act, sums = _mlp_act_grads(act, gate, up, *act_args, bias_grads, in_place=True)
        dpacked = kept
    else:
        dpacked, act, sums = _glu_mlp_packed_act_backward_op(act, kept, packing, *act_args, bias_grads)
    return *split_gate_up(dpacked, packing), dpacked, act, sums


def _glu_mlp_backward(ctx, grad_out: torch.Tensor, in_place: bool) -> tuple:
    """Gradients of ``_glu_mlp_forward``'s inputs (None for the scalars and the design) from what
    ``_save_for_mlp_backward`` kept; ``in_place`` in eager mode, not in traced graphs (see
    ``_pre_activation_grads``).

    Ordered for the smallest peak: the activation (re-emitted over its own gradient) is consumed by the
    down projection's weight gradient and freed before the other weight gradients are allocated. With the
    default design the gate and up bias gradients come out of the same kernel, not from two more passes over
    [tokens, intermediate].
    """
    x, gate_weight, up_weight, down_weight, kept, other = ctx.saved_tensors
    needs, act_args, design = ctx.needs_input_grad, ctx.act_args, _design_named(ctx.design)
    rows, grad_rows = _as_rows(x), _as_rows(grad_out)
    act = grad_rows @ down_weight
    kernel_sums = (needs[2] or needs[4]) and design.bias_sums == "kernel"
    dgate, dup, dpacked, act, bias_sums = _pre_activation_grads(
        act, kept, other, design.packing, act_args, kernel_sums, in_place
    )
    grad_down_weight = grad_rows.t() @ act if needs[5] else None
    del act
    grads = [None] * 7
    grads[5], grads[6] = grad_down_weight, grad_rows.sum(0) if needs[6] else None
    if needs[2] or needs[4]:
        if design.bias_sums == "kernel":
            grads[2], grads[4] = bias_sums[0], bias_sums[1]
        elif dpacked is None:
            grads[2], grads[4] = dgate.sum(0), dup.sum(0)
        else:
            grads[2], grads[4] = _unpack_rows(dpacked.sum(0), design.packing)
    if dpacked is None:
        grads[1] = dgate.t() @ rows if needs[1] else None
        grads[3] = dup.t() @ rows if needs[3] else None
        if needs[0]:  # addmm_ in place: the out-of-place addmm would first copy the [tokens, hidden] product
            grads[0] = (dgate @ gate_weight).addmm_(dup, up_weight).view(x.shape)
    else:  # one GEMM for both weight gradients, one for the input's
        if needs[1] or needs[3]:
            grads[1], grads[3] = _unpack_rows(dpacked.t() @ rows, design.packing)
        if needs[0]:
            grads[0] = (dpacked @ _pack_rows(gate_weight, up_weight, design.packing)).view(x.shape)
    for i in (1, 2, 3, 4):  # one packed GEMM or sum gives both halves: hand back only the gradients asked for
        grads[i] = grads[i] if needs[i] else None
    return (*grads, None, None, None, None, None)


class _GluMlpFunction(torch.autograd.Function):
    """The eager entry: a fraction of the custom op's Python dispatch cost, which the GPU waits on before
    its first GEMM. Same forward and backward as ``<ns>::glu_mlp``, which ``torch.compile`` sees instead."""

    @staticmethod
    def forward(ctx, *inputs):
        out, kept, other = _glu_mlp_forward(*inputs)
        _save_for_mlp_backward(ctx, inputs, kept, other)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        return _glu_mlp_backward(ctx, grad_out, in_place=True)


_glu_mlp_op = torch.library.custom_op(f"{NAMESPACE}::glu_mlp", mutates_args=())(_glu_mlp_forward)


@_glu_mlp_op.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, variant, beta, alpha, limit,
      design=DEFAULT_MLP_DESIGN):  # fmt: skip
    rows = math.prod(x.shape[:-1])
    out = x.new_empty((*x.shape[:-1], down_weight.shape[0]))
    if _design_named(design).packing == "separate":
        return out, x.new_empty((rows, gate_weight.shape[0])), x.new_empty((rows, up_weight.shape[0]))
    return out, x.new_empty((rows, 2 * gate_weight.shape[0])), x.new_empty(0)


def _traced_glu_mlp_setup(ctx, inputs, output) -> None:
    _, kept, other = output
    _save_for_mlp_backward(ctx, inputs, kept, other)
    ctx.mark_non_differentiable(kept, other)
    # Else autograd fills the two unused output gradients with zeros: 2 x [tokens, intermediate] more memory.
    ctx.set_materialize_grads(False)


@_first_order_only
def _traced_glu_mlp_backward(ctx, grad_out, _grad_kept, _grad_other):
    return _glu_mlp_backward(ctx, grad_out, in_place=False)


_glu_mlp_op.register_autograd(_traced_glu_mlp_backward, setup_context=_traced_glu_mlp_setup)


def _act_args(variant: str | GluVariant, params: GluParams) -> tuple[str, float, float, float]:
    """The ops' trailing scalar arguments: the variant's name and its parameters."""
    name = variant.name if isinstance(variant, GluVariant) else get_variant(variant).name
    return name, params.beta, params.alpha, params.limit


def glu_activation_fused(
    gate: torch.Tensor, up: torch.Tensor, variant: str | GluVariant, params: GluParams = DEFAULT_PARAMS
) -> torch.Tensor:
    """``glu.glu_activation`` through the Triton kernels; differentiable.

    ``gate`` and ``up`` may be views into one packed tensor (see ``split_gate_up``): they are read in place.
    """
    act_args = _act_args(variant, params)
    if torch.compiler.is_compiling():
        return _glu_act_op(gate, up, *act_args)
    return _GluActFunction.apply(gate, up, *act_args)


def _autocast(tensors: list[torch.Tensor | None], device_type: str) -> list[torch.Tensor | None]:
    # The op is opaque to autocast; cast its inputs as F.linear would so mixed precision behaves alike.
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None else t.to(dtype) for t in tensors]


def fused_mlp_from_weights(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    variant: str | GluVariant,
    params: GluParams = DEFAULT_PARAMS,
    design: str = DEFAULT_MLP_DESIGN,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` as one differentiable op; weights in ``nn.Linear`` layout.

    ``design`` names one of ``MLP_DESIGNS``: how the GEMMs are arranged around the kernels (the result is the
    same maths; benchmarks/bench_mlp.py times them against each other)."""
    _design_named(design)  # refused here, before any work, rather than inside the op
    tensors = _autocast([x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias], x.device.type)
    act_args = _act_args(variant, params)
    if torch.compiler.is_compiling():
        out, _, _ = _glu_mlp_op(*tensors, *act_args, design)
        return out
    return _GluMlpFunction.apply(*tensors, *act_args, design)


# ----------------------------------------------------------------------------------------------------
# Dispatch: whether a GLU MLP runs fused (fused_path_wanted, GluMLP's one decision point) and how its
# projections enter the ops (fused_mlp_forward).


def fused_path_wanted(glu_kernel: str, x: torch.Tensor, variant: str | GluVariant | None = None) -> bool:
    """Whether a GLU MLP given ``glu_kernel`` should run the fused path on input ``x``.

    ``"auto"`` fuses CUDA inputs of a supported dtype when triton imports, except forwards without autograd
    of fewer than ``INFERENCE_EAGER_BELOW_TOKENS`` tokens, and (given the MLP's ``variant``, outside
    ``torch.compile``, where a probe cannot run) except where the kernels failed their first use
    (``kernels_work``); ``"triton"`` always fuses (on CPU tensors this needs ``TRITON_INTERPRET=1``);
    ``"eager"`` never does. Decided from shapes, dtypes, devices and modes only, never from tensor values, so
    ``torch.compile`` and CUDA graphs see no data-dependent branch.
    """
    if glu_kernel == "eager":
        return False
    if glu_kernel == "triton":
        if not TRITON_AVAILABLE:
            raise ImportError("glu_kernel='triton' needs triton; install it with `pip install 'hf-glu[gpu]'`")
        return True
    if not (TRITON_AVAILABLE and on_cuda(x) and x.dtype in SUPPORTED_DTYPES):
        return False
    small = x.numel() < INFERENCE_EAGER_BELOW_TOKENS * x.shape[-1]
    if small and not torch.is_grad_enabled():
        return False
    return variant is None or torch.compiler.is_compiling() or kernels_work(variant, _kernel_dtype(x), x.device)


def on_cuda(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a CUDA device: the one device question ``auto`` asks (tests stand in for it)."""
    return x.is_cuda


# What auto's fail-safe learnt at the first use of each (variant, dtype, device, model design): whether the
# kernels compiled and launched there. A key that failed runs eager for the rest of the process.
_KERNELS_WORK: dict[tuple[str, torch.dtype, torch.device, str], bool] = {}


def _probe_kernels(variant: str, dtype: torch.dtype, device: torch.device, design: str) -> None:
    """Compiles and launches every kernel form the fused paths use with the model's ``design``, on small
    tensors; raises what they raise. A packed design's kernels read gate and up as column views of one
    tensor, which Triton compiles separately from contiguous ones (other strides, and for interleaved columns
    other warps), so its forms are launched too."""
    gate, up, grad = (torch.ones(_PROBE_SHAPE, dtype=dtype, device=device) for _ in range(3))
    out, dgate, dup = _empty(gate), _empty(gate), _empty(gate)
    launch_forward(gate, up, out, variant, DEFAULT_PARAMS)
    launch_backward(grad, gate, up, dgate, dup, None, variant, DEFAULT_PARAMS)  # the activation op's form
    chosen = _design_named(design)
    bias_grads = chosen.bias_sums == "kernel"
    if chosen.packing != "separate":  # the MLP's forms: the kept gate|up tensor's views, written over in place
        packed = torch.ones((_PROBE_SHAPE[0], 2 * _PROBE_SHAPE[1]), dtype=dtype, device=device)
        gate, up = split_gate_up(packed, chosen.packing)
        launch_forward(gate, up, out, variant, DEFAULT_PARAMS)
        dgate, dup = gate, up
    launch_backward(grad, gate, up, dgate, dup, out, variant, DEFAULT_PARAMS, bias_grads=bias_grads)  # the MLP's
    if device.type == "cuda":  # a launch that faults reports it asynchronously
        torch.cuda.synchronize(device)


def kernels_work(variant: str | GluVariant, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused kernels compile and launch for ``variant`` in ``dtype`` on ``device`` in the forms
    ``MODEL_MLP_DESIGN`` uses: probed at the first call for that key, remembered after. A failure warns once and
    makes ``glu_kernel="auto"`` run eager for that key from then on, so a kernel a GPU or a Triton version cannot
    build never stops a model."""
    name = variant.name if isinstance(variant, GluVariant) else get_variant(variant).name
    key = (name, dtype, device, MODEL_MLP_DESIGN)
    works = _KERNELS_WORK.get(key)
    if works is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return True  # a graph capture follows warm-up calls, which probed already; it cannot sync
        try:
            _probe_kernels(name, dtype, device, MODEL_MLP_DESIGN)
            works = True
        except Exception as error:  # a compile error, an unsupported device, a launch failure: all mean eager
            warnings.warn(
                f"the fused GLU kernels failed for variant {name!r}, {dtype} on {device} "
                f"({type(error).__name__}: {error}); glu_kernel='auto' runs the eager path for these from now on "
                "(glu_kernel='triton' raises instead)",
                RuntimeWarning,
                stacklevel=2,
            )
            works = False
        _KERNELS_WORK[key] = works
    return works


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    # The dtype the kernels would see: the autocast dtype where autocast casts the op's inputs.
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own (forward, pre-forward, backward, pre-backward) or
    one registered for every module (torch.nn.modules.module's global hooks). A fused path that does not call
    the module would skip them, so such a module runs its own forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or any(getattr(_nn_module, name, None) for name in _GLOBAL_HOOK_REGISTRIES)
    )


def _is_plain_linear(module: nn.Module) -> bool:
    # Subclasses (quantised layers), wrappers (PEFT LoRA) and hooked layers must run their own forward, and so
    # must layers that tensor parallelism sharded: Transformers replaces their `forward` on the instance (no
    # hook) and turns their weights into DTensors, which only that forward knows how to combine.
    return (
        type(module) is nn.Linear
        and not has_hooks(module)
        and "forward" not in vars(module)
        and all(type(p) is nn.Parameter for p in module.parameters(recurse=False))  # a DTensor's type is DTensor
    )


def _is_dtensor(t: torch.Tensor) -> bool:
    # A DTensor's is_cuda is its local shard's, but its data pointer is not one the kernels can read.
    return _DTensor is not None and isinstance(t, _DTensor)


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole GLU MLP through the fused kernels.

    Plain ``nn.Linear`` projections run as one op; any other projection (an adapter, a quantised layer) is
    called as a module and only the elementwise part is fused, so nothing the module does is skipped.
    """
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not _is_dtensor(x) and all(_is_plain_linear(p) for p in projections):
        weights = [t for p in projections for t in (p.weight, p.bias)]
        return fused_mlp_from_weights(x, *weights, mlp.variant, mlp.params, MODEL_MLP_DESIGN)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    # Projections that keep their outputs distributed (tensor parallelism with use_local_output=False) hand
    # over DTensors: only the eager maths, dispatched by DTensor, combines them correctly.
    activate = glu_activation if _is_dtensor(gate) or _is_dtensor(up) else glu_activation_fused
    return mlp.down_proj(activate(gate, up, mlp.variant, mlp.params))
