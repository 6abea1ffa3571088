"""The fused Triton path against the eager reference of hf_glu.glu in float64.

On CPU the kernels run in Triton's interpreter: run with ``TRITON_INTERPRET=1`` (``make test`` sets it; it
must be set before triton is imported). On a CUDA machine without it, the same tests run on the GPU
(``benchmarks/gpu_check.sh``). Shapes stay tiny because the interpreter is slow.
"""

import dataclasses
import functools
import importlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_glu import GluForCausalLM, GluMLP
from hf_glu import glu_triton as gt
from hf_glu.glu import VARIANTS, GluParams, glu_activation

from helpers import REPO, tiny_config

if not gt.TRITON_AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)
if not gt.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

DEVICE = "cpu" if gt.INTERPRETED else "cuda"
PARAMS = GluParams(beta=1.3, alpha=1.702, limit=2.5)  # a small limit so swiglu_oai's clamps are exercised
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def reference(gate, up, grad, variant, params=PARAMS):
    """(out, d gate, d up) of glu.glu_activation by autograd in float64."""
    g, u = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    out = glu_activation(g, u, variant, params)
    return (out.detach(), *torch.autograd.grad(out, (g, u), grad.double()))


def fused(gate, up, grad, variant, params=PARAMS):
    """(out, d gate, d up) of the fused op; gate and up must be leaves or views of one."""
    out = gt.glu_activation_fused(gate, up, variant, params)
    return (out, *torch.autograd.grad(out, (gate, up), grad))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: 1e-5 relative; bf16/fp16: one unit of the dtype's rounding of the float64 reference.

    The absolute floor (1e-6 of the largest element) covers zero crossings of the derivatives (e.g. of
    swiglu near β·g = -1.28), where the sum of O(1) terms cancels and no fp32 code is relatively exact.
    """
    info = torch.finfo(actual.dtype)
    rtol = 1e-5 if actual.dtype == torch.float32 else info.eps
    finite = expected[torch.isfinite(expected)]
    # The smallest subnormal: a reference below it rounds to 0 in the dtype.
    atol = max(1e-6 * float(finite.abs().max()) if finite.numel() else 0.0, info.smallest_normal * info.eps)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_all_match(actual, expected) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e)


def random_inputs(rows, cols, dtype, scale=2.0):
    gate, up, grad = (torch.randn(rows, cols, device=DEVICE) * scale for _ in range(3))
    return gate.to(dtype), up.to(dtype), (grad / scale).to(dtype)


def test_a_table_row_without_a_kernel_branch_fails_to_compile(monkeypatch):
    # The kernels' variant id is the row's position in glu.VARIANTS: a row appended without a kernel branch must
    # be a compile error (auto's probe then runs it eager), never another variant's maths.
    monkeypatch.setitem(VARIANTS, "new_variant", dataclasses.replace(VARIANTS["glu"], name="new_variant"))
    gate, up, _ = random_inputs(4, 8, torch.float32)
    with pytest.raises(Exception, match="no branch for this variant"):
        gt.glu_activation_fused(gate, up, "new_variant", PARAMS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_and_backward_match_float64(variant, dtype):
    # 9 x 1030: several programs along both axes (blocks of 4 x 1024), and neither a multiple of its block.
    gate, up, grad = random_inputs(9, 1030, dtype)
    actual = fused(_leaf(gate), _leaf(up), grad, variant)
    assert all(t.dtype == dtype for t in actual)
    assert_all_match(actual, reference(gate, up, grad, variant))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    variant=st.sampled_from(sorted(VARIANTS)),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["separate", "halves", "interleaved"]),
    seed=st.integers(0, 2**16),
)
def test_drawn_shapes_and_layouts_match_float64(rows, cols, variant, dtype, layout, seed):
    torch.manual_seed(seed)
    if layout == "separate":
        gate, up = _leaf(torch.randn(rows, cols, device=DEVICE).to(dtype)), None
        up = _leaf(torch.randn(rows, cols, device=DEVICE).to(dtype))
        leaves = (gate, up)
    else:
        packed = _leaf((torch.randn(rows, 2 * cols, device=DEVICE) * 2).to(dtype))
        gate, up = gt.split_gate_up(packed, layout)
        leaves = (packed,)
    grad = torch.randn(rows, cols, device=DEVICE).to(dtype)
    out = gt.glu_activation_fused(gate, up, variant, PARAMS)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_out, ref_dgate, ref_dup = reference(gate, up, grad, variant)
    assert_matches(out, ref_out)
    if layout == "separate":
        assert_all_match(grads, (ref_dgate, ref_dup))
    else:
        ref_packed = torch.zeros(rows, 2 * cols, dtype=torch.float64, device=DEVICE)
        ref_gate_view, ref_up_view = gt.split_gate_up(ref_packed, layout)
        ref_gate_view.copy_(ref_dgate)
        ref_up_view.copy_(ref_dup)
        assert_matches(grads[0], ref_packed)


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_packed_3d_and_transposed_views_are_read_in_place(layout, monkeypatch):
    packed = torch.randn(3, 5, 2 * 33, device=DEVICE)
    gate, up = gt.split_gate_up(packed, layout)
    copies = []
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(self) or self)
    out = gt.glu_activation_fused(gate, up, "swiglu", PARAMS)
    assert not copies
    assert_matches(out, reference(gate, up, torch.ones_like(gate), "swiglu")[0])
    transposed = torch.randn(33, 15, device=DEVICE).t()  # column-major gate: strides (1, 15)
    out = gt.glu_activation_fused(transposed, up.reshape(15, 33), "geglu", PARAMS)
    assert_matches(out, reference(transposed, up.reshape(15, 33), torch.ones_like(out), "geglu")[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_large_magnitudes_overflow_only_where_the_reference_does(variant, dtype):
    gate, up, grad = (torch.empty(16, 40, device=DEVICE).uniform_(-1e4, 1e4).to(dtype) for _ in range(3))
    actual = fused(_leaf(gate), _leaf(up), grad, variant)
    for a, e in zip(actual, reference(gate, up, grad, variant), strict=True):
        rounded = e.to(dtype)  # what a correct result in this dtype is: inf exactly where it overflows
        assert torch.equal(torch.isnan(a), torch.isnan(rounded))
        assert torch.equal(torch.isinf(a), torch.isinf(rounded))
        finite = torch.isfinite(rounded)
        assert_matches(a[finite], e[finite])


SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, PARAMS.limit, -PARAMS.limit, 1e4, -1e4, 0.5, -3.0]


@pytest.mark.parametrize("which", ["gate", "up"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nan_and_inf_propagate_as_in_the_reference(variant, which):
    specials = torch.tensor(SPECIALS, device=DEVICE)
    finite = torch.linspace(-4, 4, 7, device=DEVICE)
    grid = specials[:, None].expand(-1, finite.numel())
    others = finite[None, :].expand(len(SPECIALS), -1)
    gate, up = (grid, others) if which == "gate" else (others, grid)
    gate, up = gate.contiguous(), up.contiguous()
    grad = torch.ones_like(gate)
    actual = fused(_leaf(gate), _leaf(up), grad, variant)
    for a, e in zip(actual, reference(gate, up, grad, variant), strict=True):
        a64 = a.double()
        for predicate in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(predicate(a64), predicate(e)), (predicate.__name__, a64, e)
        assert_matches(a, e)


def test_empty_inputs():
    gate = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    out = gt.glu_activation_fused(gate, gate, "swiglu")
    out.sum().backward()
    assert out.shape == gate.grad.shape == (0, 8)
    mlp = make_mlp()
    x = torch.randn(0, 3, 24, device=DEVICE, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad.shape == x.shape and not mlp.down_proj.weight.grad.any()


@pytest.mark.parametrize("bias_grads", [False, True], ids=["no_sums", "sums"])
def test_in_place_backward_overwrites_gate_up_and_grad(bias_grads):
    gate, up, grad = random_inputs(9, 21, torch.float32)
    expected_out = gt.glu_activation_fused(gate, up, "swiglu_oai", PARAMS)
    expected_dgate, expected_dup = torch.ops.hf_glu.glu_act_backward(grad, gate, up, "swiglu_oai", *_params())
    functional = torch.ops.hf_glu.glu_mlp_act_backward(grad, gate, up, "swiglu_oai", *_params(), bias_grads)
    *_, sums = gt._mlp_act_grads(grad, gate, up, "swiglu_oai", *_params(), bias_grads, in_place=True)
    assert torch.equal(gate, expected_dgate) and torch.equal(up, expected_dup) and torch.equal(grad, expected_out)
    # The traced graphs' functional form computes the same, bit for bit.
    for a, e in zip(functional, (gate, up, grad, sums), strict=True):
        assert torch.equal(a, e)
    if bias_grads:
        expected_sums = torch.stack([expected_dgate.double().sum(0), expected_dup.double().sum(0)])
        torch.testing.assert_close(sums.double(), expected_sums, rtol=1e-5, atol=1e-6)
    else:
        assert sums.shape == (0, 21)


def _params(p=PARAMS):
    return p.beta, p.alpha, p.limit


# --- The whole-MLP op --------------------------------------------------------------------------------


def make_mlp(variant="swiglu", bias=True, hidden=24, inner=40, dtype=torch.float32, kernel="triton"):
    config = tiny_config(
        glu_variant=variant,
        glu_beta=PARAMS.beta,
        glu_limit=PARAMS.limit,
        mlp_bias=bias,
        n_embd=hidden,
        n_inner=inner,
        glu_kernel=kernel,
    )
    return GluMLP(config).to(DEVICE, dtype)


def run_mlp(mlp: GluMLP, x: torch.Tensor, grad: torch.Tensor, kernel: str):
    """Output and gradients (input, then parameters) of ``mlp`` with ``glu_kernel=kernel``."""
    mlp.config.glu_kernel = kernel
    x = _leaf(x)
    out = mlp(x)
    return (out.detach(), *torch.autograd.grad(out, (x, *mlp.parameters()), grad))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_mlp_matches_float64_eager(variant, bias):
    mlp = make_mlp(variant, bias)
    x, grad = torch.randn(2, 7, 24, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    actual = run_mlp(mlp, x, grad, "triton")
    expected = run_mlp(mlp.double(), x.double(), grad.double(), "eager")
    assert len(actual) == len(expected) == (8 if bias else 5)
    for a, e in zip(actual, expected, strict=True):
        # GEMM rounding in fp32 adds to the kernel's: compare normwise against float64.
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bias_gradients_summed_in_the_kernel_match_float64(variant, dtype, monkeypatch):
    # Tiles of 2 x 1024 and two of them a program: 37 rows make 10 row programs, the last one partly outside
    # the tensor, and 1030 columns two column blocks, so the partial sums and their reduction are all exercised.
    tuning = gt.KernelTuning(block_elements=2048)
    monkeypatch.setattr(gt, "launch_backward", functools.partial(gt.launch_backward, tuning=tuning))
    monkeypatch.setattr(gt, "_BIAS_ROW_TILES", 2)
    monkeypatch.setattr(gt, "_PROGRAMS_PER_SM", 0)  # no program count to reach: the most tiles a program
    assert gt._launch_config(37, 1030, tuning) == ((19, 2), 2, 1024)
    gate, up, grad = random_inputs(37, 1030, dtype)
    _, ref_dgate, ref_dup = reference(gate, up, grad, variant)
    *_, sums = gt._mlp_act_grads(grad.clone(), gate.clone(), up.clone(), variant, *_params(), True, in_place=True)
    assert sums.dtype == dtype and sums.shape == (2, 1030)
    for actual, expected in zip(sums, (ref_dgate.sum(0), ref_dup.sum(0)), strict=True):
        # fp32 sums of unrounded terms, rounded once to the dtype; cancellation bounded by the terms' sizes.
        bound = float(expected.abs().max()) + 1.0
        rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-5 * bound)


def test_narrow_widths_tile_rows_in_several_blocks_and_sum_them():
    # Under 16 columns a tile holds at most _MAX_BLOCK_M rows (wider tiles spilled registers): 300 rows of 5
    # columns are three row blocks, the last one partly outside the tensor; every output and both bias sums
    # cover all of them.
    rows = 2 * gt._MAX_BLOCK_M + 44
    (row_blocks, _), block_m, _ = gt._launch_config(rows, 5)
    assert block_m == gt._MAX_BLOCK_M and row_blocks == 3
    gate, up, grad = random_inputs(rows, 5, torch.float32)
    ref_out, ref_dgate, ref_dup = reference(gate, up, grad, "swiglu_oai")
    out = gt._act_forward(gate, up, "swiglu_oai", *_params())
    dgate, dup, act = gate.clone(), up.clone(), grad.clone()
    *_, sums = gt._mlp_act_grads(act, dgate, dup, "swiglu_oai", *_params(), True, in_place=True)
    assert_all_match((out, act, dgate, dup), (ref_out, ref_out, ref_dgate, ref_dup))
    for actual, expected in zip(sums, (ref_dgate.sum(0), ref_dup.sum(0)), strict=True):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * (float(expected.abs().max()) + 1))


class _GridOnlyKernel:
    """Stands in for the backward kernel: records grid and ROW_TILES, launches nothing (shapes too big to run)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs["ROW_TILES"]))


@pytest.mark.parametrize("tokens", [256, 1024, 2048, 4096, 8192])
def test_bias_summing_backward_fills_the_gpu_and_compiles_few_variants(tokens, monkeypatch):
    # gpt2-small's GLU width (3072 columns: 3 column blocks of 4 x 1024) on a 132-SM device.
    kernel = _GridOnlyKernel()
    monkeypatch.setattr(gt, "_glu_bwd_kernel", kernel)
    monkeypatch.setattr(gt, "_sm_count", lambda device: 132, raising=False)
    gate = torch.empty(tokens, 3072, device=DEVICE)
    gt.launch_backward(gate, gate, gate, gate, gate, gate, "swiglu", PARAMS, bias_grads=True)
    ((grid, row_tiles),) = kernel.launches
    (row_blocks, col_blocks), block_m, _ = gt._launch_config(tokens, 3072)
    assert row_tiles in gt.BIAS_ROW_TILE_CHOICES and grid == (math.ceil(row_blocks / row_tiles), col_blocks)
    programs = grid[0] * grid[1]
    # At least two programs an SM where the work allows it (one a row block), and no smaller partial-sum
    # buffer (more tiles a program) would still reach that.
    assert programs >= min(2 * 132, row_blocks * col_blocks)
    if row_tiles < gt._BIAS_ROW_TILES:
        assert math.ceil(row_blocks / (2 * row_tiles)) * col_blocks < 2 * 132


def test_bias_row_tiles_take_few_values_over_all_token_counts():
    # Each ROW_TILES value is one more compile of the backward kernel: token counts must share them.
    chosen = {gt._row_tiles_per_program(row_blocks, 3, 264) for row_blocks in range(1, 5000)}
    assert chosen == set(gt.BIAS_ROW_TILE_CHOICES) == {1, 2, 4, 8, 16}


class _ConfigRecordingKernel:
    """Wraps a kernel: records each launch's (kernel, BLOCK_M, num_warps), then launches it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, kwargs["BLOCK_M"], kwargs["num_warps"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_a_kernel_tuning_sets_the_launch_and_keeps_the_maths(monkeypatch):
    # The knobs bench_mlp --sweep turns: rows a tile holds follow block_elements (16 columns: block_elements / 16,
    # capped at _MAX_BLOCK_M), the forward on contiguous inputs takes num_warps, the backward and the forward on
    # interleaved views take wide_num_warps; any tuning computes the reference's results.
    launches = []
    for name in ("_glu_fwd_kernel", "_glu_bwd_kernel"):
        monkeypatch.setattr(gt, name, _ConfigRecordingKernel(name, getattr(gt, name), launches))
    gate, up, grad = random_inputs(37, 16, torch.float32)
    gate_view, up_view = gt.split_gate_up(torch.stack([gate, up], -1).flatten(-2), "interleaved")
    ref_out, ref_dgate, ref_dup = reference(gate, up, grad, "geglu")
    for tuning, expected_launches in (
        (gt.KernelTuning(block_elements=64, num_warps=2, wide_num_warps=1), [(4, 2), (4, 1), (4, 1)]),
        (gt.DEFAULT_KERNEL_TUNING, [(gt._MAX_BLOCK_M, 4), (gt._MAX_BLOCK_M, 8), (gt._MAX_BLOCK_M, 8)]),
    ):
        launches.clear()
        out, strided_out, act, dgate, dup = (torch.empty_like(gate) for _ in range(5))
        gt.launch_forward(gate, up, out, "geglu", PARAMS, tuning=tuning)
        gt.launch_forward(gate_view, up_view, strided_out, "geglu", PARAMS, tuning=tuning)
        sums = gt.launch_backward(grad, gate, up, dgate, dup, act, "geglu", PARAMS, bias_grads=True, tuning=tuning)
        assert launches == [(kernel, *launch) for kernel, launch in zip(
            ("_glu_fwd_kernel", "_glu_fwd_kernel", "_glu_bwd_kernel"), expected_launches, strict=True
        )]  # fmt: skip
        assert_all_match((out, strided_out, act, dgate, dup), (ref_out, ref_out, ref_out, ref_dgate, ref_dup))
        assert_all_match(sums, torch.stack([ref_dgate.sum(0), ref_dup.sum(0)]))


def test_an_up_bias_alone_gets_its_gradient():
    # Exact conversions of bias-free MLPs give up_proj a bias and gate_proj none.
    config = tiny_config(glu_variant="geglu_tanh", n_embd=24, n_inner=40, glu_kernel="triton")
    mlp = GluMLP(config, bias=False, up_bias=True).to(DEVICE)
    x, grad = torch.randn(11, 24, device=DEVICE), torch.randn(11, 24, device=DEVICE)
    actual = run_mlp(mlp, x, grad, "triton")
    expected = run_mlp(mlp.double(), x.double(), grad.double(), "eager")
    assert len(actual) == 6  # output, input, gate weight, up weight and bias, down weight
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


class _AtenCalls(TorchDispatchMode):
    """Records every aten call with its tensor arguments' shapes; raises on a host sync."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        syncs = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero)
        if func.overloadpacket in syncs:
            raise AssertionError(f"{func} waits for the device: no CUDA graph can hold it")
        self.calls.append((func.overloadpacket, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_backward_takes_no_extra_pass_over_the_pre_activations_and_never_syncs():
    mlp = make_mlp("geglu_tanh", bias=True, hidden=24, inner=40)
    x = torch.randn(14, 24, device=DEVICE, requires_grad=True)
    with _AtenCalls() as calls:
        mlp(x).sum().backward()
    reductions = [shapes for op, shapes in calls.calls if op is torch.ops.aten.sum]
    assert (14, 40) not in {shape for shapes in reductions for shape in shapes}, reductions
    assert mlp.gate_proj.bias.grad is not None and mlp.up_proj.bias.grad is not None


# --- Candidate designs of the whole-MLP op: the default is chosen per shape by a GPU run of benchmarks/gpu_check.sh


def _mlp_weights(mlp: GluMLP) -> list:
    return [t for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for t in (p.weight, p.bias)]


def _design_grads(mlp: GluMLP, x: torch.Tensor, grad: torch.Tensor, design: str, entry: str = "function"):
    """Output and gradients (input, then each parameter) of the whole-MLP op in ``design``, entered through the
    eager ``autograd.Function`` or the custom op torch.compile sees."""
    x_leaf, weights = _leaf(x), _mlp_weights(mlp)
    if entry == "function":
        out = gt.fused_mlp_from_weights(x_leaf, *weights, mlp.variant, mlp.params, design)
    else:
        out, _, _ = torch.ops.hf_glu.glu_mlp(x_leaf, *weights, mlp.variant.name, *_params(mlp.params), design)
    inputs = [x_leaf, *(w for w in weights if w is not None)]
    return (out.detach(), *torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("variant", ["geglu_tanh", "swiglu", "swiglu_oai"])
@pytest.mark.parametrize("design", sorted(gt.MLP_DESIGNS))
def test_every_mlp_design_matches_float64_eager(design, variant, bias):
    # Each candidate, through both entries: the eager Function (in-place backward over the saved pre-activations,
    # packed or not) and the custom op (functional backward ops), against the float64 reference.
    mlp = make_mlp(variant, bias, hidden=24, inner=40)
    x, grad = torch.randn(2, 7, 24, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    expected = run_mlp(mlp.double(), x.double(), grad.double(), "eager")
    mlp.float()
    results = [_design_grads(mlp, x, grad, design, entry) for entry in ("function", "op")]
    for actual in results:
        assert len(actual) == len(expected) == (8 if bias else 5)
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape and a.dtype == torch.float32
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    for a, e in zip(*results, strict=True):  # the two entries are the same maths, bit for bit
        assert torch.equal(a, e)


@pytest.mark.parametrize("design", ["packed", "packed_interleaved"])
def test_an_up_bias_alone_gets_its_gradient_in_packed_designs(design):
    # The packed bias is the gate's zeros beside the up bias; the gate bias has no gradient to return.
    config = tiny_config(glu_variant="geglu_tanh", n_embd=24, n_inner=40, glu_kernel="triton")
    mlp = GluMLP(config, bias=False, up_bias=True).to(DEVICE)
    x, grad = torch.randn(11, 24, device=DEVICE), torch.randn(11, 24, device=DEVICE)
    expected = run_mlp(mlp.double(), x.double(), grad.double(), "eager")
    actual = _design_grads(mlp.float(), x, grad, design)
    assert len(actual) == len(expected) == 6
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def _gemm_shapes(mlp: GluMLP, x: torch.Tensor, design: str) -> tuple[list, list]:
    """(forward, backward) GEMM calls of one forward+backward in ``design``: the shapes of their operands."""
    gemms = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
    x = _leaf(x)
    with _AtenCalls() as forward:
        out = gt.fused_mlp_from_weights(x, *_mlp_weights(mlp), mlp.variant, mlp.params, design)
    with _AtenCalls() as backward:
        out.sum().backward()
    return [[s for op, s in calls.calls if op in gemms] for calls in (forward, backward)]


def test_packed_designs_run_one_gemm_for_gate_and_up_and_fewer_in_backward():
    mlp = make_mlp("geglu_tanh", bias=True, hidden=24, inner=40)
    x = torch.randn(14, 24, device=DEVICE)
    forward, backward = _gemm_shapes(mlp, x, "separate")
    assert len(forward) == 3 and len(backward) == 6  # gate, up, down; d act, d down, d gate, d up, d x (2)
    for design in ("packed", "packed_interleaved"):
        forward, backward = _gemm_shapes(mlp, x, design)
        # One [tokens, 2 x intermediate] GEMM (bias added in it: addmm), the down GEMM.
        assert len(forward) == 2 and forward[0][1:] == [(14, 24), (24, 80)]
        # d act, d down, one GEMM for both weight gradients, one for d x.
        assert len(backward) == 4 and [(80, 14), (14, 24)] in backward and [(14, 80), (80, 24)] in backward


@pytest.mark.parametrize("design", sorted(gt.MLP_DESIGNS))
def test_every_design_saves_the_input_and_two_pre_activations_only(design):
    mlp = make_mlp("swiglu", bias=True, hidden=24, inner=40)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gt.fused_mlp_from_weights(x, *_mlp_weights(mlp), mlp.variant, mlp.params, design).sum().backward()
    assert sum(saved.values()) == 4 * (14 * 24 + 2 * 14 * 40)  # fp32: x, then gate and up (apart or packed)


def test_the_model_dispatch_reads_the_module_level_design(monkeypatch):
    mlp = make_mlp("geglu_tanh", bias=True, hidden=24, inner=40)
    x, grad = torch.randn(14, 24, device=DEVICE), torch.randn(14, 24, device=DEVICE)
    seen = []
    real = gt.fused_mlp_from_weights
    monkeypatch.setattr(gt, "fused_mlp_from_weights", lambda *args: seen.append(args[-1]) or real(*args))
    default = run_mlp(mlp, x, grad, "triton")
    monkeypatch.setattr(gt, "MODEL_MLP_DESIGN", "packed_interleaved")
    packed = run_mlp(mlp, x, grad, "triton")
    assert seen == [gt.DEFAULT_MLP_DESIGN, "packed_interleaved"] and gt.DEFAULT_MLP_DESIGN == "separate"
    for a, e in zip(packed, default, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_an_unknown_design_is_refused_naming_the_choices():
    mlp = make_mlp()
    with pytest.raises(ValueError, match=r"design='fast' is not a fused MLP design; expected one of \['packed'"):
        gt.fused_mlp_from_weights(torch.randn(3, 24, device=DEVICE), *_mlp_weights(mlp), "swiglu", PARAMS, "fast")


def test_packed_designs_compile_with_fullgraph_and_match_eager():
    mlp = make_mlp("swiglu", bias=True, hidden=24, inner=40)
    x, grad = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE)
    for design in ("packed", "packed_torch_bias"):
        expected = _design_grads(mlp, x, grad, design)
        torch._dynamo.reset()

        def step(x, *weights, design=design):
            return gt.fused_mlp_from_weights(x, *weights, "swiglu", mlp.params, design)

        x_leaf = _leaf(x)
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(x_leaf, *_mlp_weights(mlp))
        actual = (out.detach(), *torch.autograd.grad(out, [x_leaf, *mlp.parameters()], grad))
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_mlp_matches_eager_in_half_precision(dtype):
    mlp = make_mlp("geglu_tanh", bias=True, dtype=dtype)
    x, grad = (torch.randn(2, 7, 24, device=DEVICE, dtype=dtype) for _ in range(2))
    # Same GEMMs on both paths, so the only difference is the activation's rounding (one unit).
    for a, e in zip(run_mlp(mlp, x, grad, "triton"), run_mlp(mlp, x, grad, "eager"), strict=True):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a, e, rtol=4 * eps, atol=4 * eps * float(e.abs().max()))


def test_only_the_input_and_two_pre_activations_are_saved_for_backward():
    mlp = make_mlp("swiglu", bias=True, hidden=24, inner=40)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    params = {p.data_ptr() for p in mlp.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum().backward()
    assert sorted(tuple(t.shape) for t in saved) == [(2, 7, 24), (14, 40), (14, 40)]
    assert saved[0].data_ptr() == x.data_ptr()  # the input itself, not a copy


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_eager_entry_and_custom_op_compute_the_same(bias):
    # Eager calls run through an autograd.Function (cheap dispatch); torch.compile sees the custom op.
    # Both must be the same maths, bit for bit, and the op's backward must not need its unused outputs' grads.
    mlp = make_mlp("geglu", bias=bias)
    x, grad = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE)
    weights = [t for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for t in (p.weight, p.bias)]
    results = []
    for entry in ("function", "op"):
        x_leaf = _leaf(x)
        if entry == "function":
            out = gt.fused_mlp_from_weights(x_leaf, *weights, "geglu", PARAMS)
        else:
            out, gate, up = torch.ops.hf_glu.glu_mlp(x_leaf, *weights, "geglu", *_params())
            assert not gate.requires_grad and not up.requires_grad
        inputs = [x_leaf, *(w for w in weights if w is not None)]
        results.append((out.detach(), *torch.autograd.grad(out, inputs, grad)))
    for a, e in zip(*results, strict=True):
        assert torch.equal(a, e)


def test_eager_entry_and_custom_op_of_the_activation_compute_the_same():
    gate, up, grad = random_inputs(6, 40, torch.float32)
    results = []
    for entry in (gt.glu_activation_fused, torch.ops.hf_glu.glu_act):
        g, u = _leaf(gate), _leaf(up)
        out = (
            entry(g, u, "swiglu_oai", PARAMS)
            if entry is gt.glu_activation_fused
            else entry(g, u, "swiglu_oai", *_params())
        )
        results.append((out.detach(), *torch.autograd.grad(out, (g, u), grad)))
    for a, e in zip(*results, strict=True):
        assert torch.equal(a, e)


def test_a_second_backward_through_overwritten_activations_is_refused():
    mlp = make_mlp()
    out = mlp(torch.randn(3, 24, device=DEVICE, requires_grad=True))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _double_backward_entries():
    gate, up = (_leaf(torch.randn(3, 24, device=DEVICE)) for _ in range(2))
    activation = ("activation", lambda: (gt.glu_activation_fused(gate, up, "swiglu", PARAMS), gate, gate))
    mlp = make_mlp("swiglu")
    x = _leaf(torch.randn(3, 24, device=DEVICE))
    whole = ("mlp", lambda: (mlp(x), x, mlp.gate_proj.weight))
    args = (*(p for n in ("gate", "up", "down") for p in getattr(mlp, f"{n}_proj").parameters()), "swiglu", *_params())
    # The custom op (what torch.compile sees) called directly: its registered backward is also once-only.
    op = ("mlp_op", lambda: (torch.ops.hf_glu.glu_mlp(x, *args)[0], x, mlp.gate_proj.weight))
    return [activation, whole, op]


@pytest.mark.parametrize("entry", range(3), ids=["activation", "mlp", "mlp_op"])
def test_double_backward_raises_instead_of_a_wrong_second_order_gradient(entry):
    _, build = _double_backward_entries()[entry]
    out, first, second = build()  # the input whose gradient is built, and a weight a second order would reach
    # Before any second-order gradient is asked for: the graph it would come from is already wrong.
    with pytest.raises(RuntimeError, match="no second-order gradient.*create_graph=True.*glu_kernel='eager'"):
        torch.autograd.grad(out.square().sum(), first, create_graph=True)
    # A first-order backward of the same graph is unaffected.
    assert torch.autograd.grad(out.square().sum(), second)[0].shape == second.shape


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_is_not_mistaken_for_a_double_backward(reentrant):
    # Both checkpoint forms recompute under grad mode; the kernels' backward itself must still run (first order).
    mlp = make_mlp("swiglu")
    x, grad = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    expected = run_mlp(mlp, x, grad, "eager")
    mlp.config.glu_kernel = "triton"
    x_leaf = _leaf(x)
    out = torch.utils.checkpoint.checkpoint(mlp, x_leaf, use_reentrant=reentrant)
    out.backward(grad)  # not autograd.grad: the reentrant form refuses it
    actual = (out.detach(), x_leaf.grad, *(p.grad for p in mlp.parameters()))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


class _StandInCudaDevice:
    """Stands in for ``torch.cuda.device``: records which device each launch ran under."""

    current = "cuda:0"  # the process's current device, which a launch must not fall back to

    def __init__(self, device):
        self.device, self.previous = device, None

    def __enter__(self):
        self.previous, _StandInCudaDevice.current = _StandInCudaDevice.current, self.device
        return self

    def __exit__(self, *exc):
        _StandInCudaDevice.current = self.previous


def _device_of_launch(args):
    return _StandInCudaDevice.current, args[0].device


class _RecordingKernel:
    """Runs the kernel and appends ``record(its positional arguments)`` to ``launches`` at each launch."""

    def __init__(self, kernel, launches, record=_device_of_launch):
        self.kernel, self.launches, self.record = kernel, launches, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.record(args))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _StandInCudaDevice)
    with gt._device_guard(torch.device("cuda", 1)):
        assert _StandInCudaDevice.current == torch.device("cuda", 1)
    assert _StandInCudaDevice.current == "cuda:0"


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    launches = []
    monkeypatch.setattr(gt, "_device_guard", _StandInCudaDevice)
    for name in ("_glu_fwd_kernel", "_glu_bwd_kernel"):
        monkeypatch.setattr(gt, name, _RecordingKernel(getattr(gt, name), launches))
    mlp = make_mlp("geglu", bias=True)
    mlp(torch.randn(3, 24, device=DEVICE, requires_grad=True)).sum().backward()
    gate, up = (_leaf(torch.randn(3, 24, device=DEVICE)) for _ in range(2))
    gt.glu_activation_fused(gate, up, "geglu", PARAMS).sum().backward()
    assert len(launches) == 4  # forward and backward of the MLP op and of the activation op
    assert all(current == device for current, device in launches), launches


def test_autocast_runs_the_fused_mlp_in_the_autocast_dtype():
    mlp = make_mlp()
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = mlp(x)
        expected = make_mlp_eager_like(mlp)(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and mlp.gate_proj.weight.grad.dtype == torch.float32


def make_mlp_eager_like(mlp: GluMLP):
    def run(x):
        mlp.config.glu_kernel = "eager"
        try:
            return mlp(x)
        finally:
            mlp.config.glu_kernel = "triton"

    return run


def test_opcheck_passes():
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    weights = [
        torch.randn(s, device=DEVICE, requires_grad=True) for s in [(12, 8), (12,), (12, 8), (12,), (8, 12), (8,)]
    ]
    gate, up, grad = (torch.randn(5, 12, device=DEVICE) for _ in range(3))
    act_args = ("swiglu_oai", *_params())
    torch.library.opcheck(torch.ops.hf_glu.glu_act, (_leaf(gate), _leaf(up), *act_args))
    torch.library.opcheck(torch.ops.hf_glu.glu_act_backward, (grad, gate, up, *act_args))
    packed = torch.randn(5, 24, device=DEVICE)
    for bias_grads in (False, True):
        torch.library.opcheck(torch.ops.hf_glu.glu_mlp_act_backward, (grad, gate, up, *act_args, bias_grads))
        for packing in ("halves", "interleaved"):
            args = (grad, packed, packing, *act_args, bias_grads)
            torch.library.opcheck(torch.ops.hf_glu.glu_mlp_packed_act_backward, args)
    # glu_mlp hands its saved pre-activations out as outputs that its backward overwrites; the
    # aot_dispatch check returns them to the caller, which no user of fused_mlp_from_weights can do, so that
    # one check runs instead through torch.compile in test_compile_* below.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for w in (weights, [w if w.dim() == 2 else None for w in weights]):
        torch.library.opcheck(torch.ops.hf_glu.glu_mlp, (x, *w, *act_args), test_utils=checks)
        for design in ("packed", "packed_interleaved"):
            torch.library.opcheck(torch.ops.hf_glu.glu_mlp, (x, *w, *act_args, design), test_utils=checks)


def test_compile_fullgraph_sees_one_node():
    mlp = make_mlp("geglu")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(mlp, backend=capture, fullgraph=True)
    compiled(torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)).sum().backward()
    (graph,) = graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.hf_glu.glu_mlp.default) == 1
    assert not any(t in (torch._C._nn.linear, torch.nn.functional.linear) for t in targets)


def test_compile_sees_the_activation_op_as_one_node():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda g, u: gt.glu_activation_fused(g, u, "glu", PARAMS), backend=capture, fullgraph=True)
    gate, up, grad = random_inputs(4, 24, torch.float32)
    g, u = _leaf(gate), _leaf(up)
    actual = torch.autograd.grad(compiled(g, u), (g, u), grad)
    (graph,) = graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.hf_glu.glu_act.default]
    for a, e in zip(actual, reference(gate, up, grad, "glu")[1:], strict=True):
        assert_matches(a, e)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(backend):
    mlp = make_mlp("swiglu", bias=True)
    x, grad = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE)
    expected = run_mlp(mlp, x, grad, "triton")
    torch._dynamo.reset()
    # Inductor's on-disk caches key on the traced forward graph, not on the op's registered backward: an
    # entry written by an older version of the op would be replayed with its old schema.
    with torch.compiler.config.patch(force_disable_caches=True):
        compiled = torch.compile(mlp, backend=backend, fullgraph=True, dynamic=True)
        x_leaf = _leaf(x)
        out = compiled(x_leaf)
        actual = (out.detach(), *torch.autograd.grad(out, (x_leaf, *mlp.parameters()), grad))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_inductor_backward_copies_no_tokens_by_intermediate_tensor(monkeypatch):
    # Inductor cannot write over a tensor saved from forward (a backward graph input): an op that mutates the
    # saved pre-activations becomes a clone of each first. Count copies in the graphs after the post-grad
    # passes (where those clones are made), forward and backward.
    import torch._inductor.compile_fx as compile_fx

    tokens, inner = 10, 40
    copies = []
    real = compile_fx.post_grad_passes

    def record(gm, is_inference):
        real(gm, is_inference)
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            # By size: Inductor clones the flat storage ([tokens * intermediate]), not the 2-D view.
            if node.op == "call_function" and isinstance(value, torch.Tensor) and value.numel() == tokens * inner:
                name = str(node.target)
                if "clone" in name or "copy" in name:
                    copies.append(name)

    monkeypatch.setattr(compile_fx, "post_grad_passes", record)
    mlp = make_mlp("swiglu", bias=True, inner=inner)
    x = torch.randn(2, tokens // 2, 24, device=DEVICE, requires_grad=True)
    expected = run_mlp(mlp, x, torch.ones(2, tokens // 2, 24, device=DEVICE), "triton")
    torch._dynamo.reset()
    with torch.compiler.config.patch(force_disable_caches=True):
        compiled = torch.compile(mlp, backend="inductor", fullgraph=True)
        out = compiled(x)
        out.sum().backward()
    assert copies == []
    for a, e in zip((out, x.grad, *(p.grad for p in mlp.parameters())), expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# --- Dispatch and fallbacks ----------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    x = torch.randn(2, 3)
    assert not gt.fused_path_wanted("eager", x)
    assert gt.fused_path_wanted("triton", x)
    assert not gt.fused_path_wanted("auto", x)  # CPU tensors take the eager path unless forced
    assert not gt.fused_path_wanted("auto", x.double())
    if DEVICE == "cuda":
        assert gt.fused_path_wanted("auto", x.cuda()) and not gt.fused_path_wanted("auto", x.cuda().double())
    monkeypatch.setattr(gt, "TRITON_AVAILABLE", False)
    assert not gt.fused_path_wanted("auto", x)
    with pytest.raises(ImportError, match="glu_kernel='triton' needs triton"):
        gt.fused_path_wanted("triton", x)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_auto_runs_small_inference_calls_eager_and_larger_ones_fused(no_grad, monkeypatch):
    import hf_glu.modeling_glu

    monkeypatch.setattr(gt, "on_cuda", lambda x: True)  # stands in for CUDA: auto would fuse
    ran_fused = []
    real = hf_glu.modeling_glu.fused_mlp_forward
    monkeypatch.setattr(
        hf_glu.modeling_glu, "fused_mlp_forward", lambda mlp, x: ran_fused.append(x.shape) or real(mlp, x)
    )
    mlp = make_mlp("geglu_tanh", kernel="auto")
    threshold = gt.INFERENCE_EAGER_BELOW_TOKENS
    for tokens, fused_expected in ((1, False), (threshold - 1, False), (threshold, True)):
        x = torch.randn(1, tokens, 24, device=DEVICE)
        ran_fused.clear()
        with no_grad():
            out = mlp(x)
        assert bool(ran_fused) is fused_expected, tokens
        mlp.config.glu_kernel = "eager"
        with no_grad():
            torch.testing.assert_close(out, mlp(x), rtol=1e-5, atol=1e-6)
        mlp.config.glu_kernel = "auto"
    # With autograd on (training), even one token takes the fused path.
    ran_fused.clear()
    mlp(torch.randn(1, 1, 24, device=DEVICE))
    assert ran_fused == [(1, 1, 24)]


class _BrokenKernel:
    """A kernel that fails as a compile error would, at every launch; counts the attempts."""

    def __init__(self):
        self.attempts = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.attempts += 1
            raise RuntimeError("PTX assembly failed (stand-in)")

        return launch


def test_auto_falls_back_to_eager_once_per_key_when_a_kernel_fails(monkeypatch):
    import warnings

    monkeypatch.setattr(gt, "on_cuda", lambda x: True)  # stands in for CUDA: auto would fuse
    monkeypatch.setattr(gt, "_KERNELS_WORK", {})
    broken = _BrokenKernel()
    monkeypatch.setattr(gt, "_glu_fwd_kernel", broken)
    mlp = make_mlp("geglu", kernel="auto")
    x, grad = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    expected = run_mlp(mlp, x, grad, "eager")
    with pytest.warns(RuntimeWarning, match=r"failed for variant 'geglu', torch.float32 on cpu.*PTX.*eager path"):
        actual = run_mlp(mlp, x, grad, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the key is settled
        again = run_mlp(mlp, x, grad, "auto")
    assert broken.attempts == 1  # only the first use tried the kernel
    for a, b, e in zip(actual, again, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, e, rtol=1e-5, atol=1e-6)
    # Another dtype is another key, probed (and warned about) on its own.
    with pytest.warns(RuntimeWarning, match="torch.bfloat16"):
        run_mlp(mlp.to(torch.bfloat16), x.bfloat16(), grad.bfloat16(), "auto")
    assert broken.attempts == 2
    # glu_kernel="triton" is a demand: the failure surfaces.
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        run_mlp(mlp, x.bfloat16(), grad.bfloat16(), "triton")


def test_auto_probes_working_kernels_once_and_then_fuses(monkeypatch):
    import warnings

    monkeypatch.setattr(gt, "on_cuda", lambda x: True)
    monkeypatch.setattr(gt, "_KERNELS_WORK", {})
    launches = []
    for name in ("_glu_fwd_kernel", "_glu_bwd_kernel"):
        monkeypatch.setattr(gt, name, _RecordingKernel(getattr(gt, name), launches))
    mlp = make_mlp("reglu", kernel="auto")
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlp(x).sum().backward()
        probe = 3  # forward, the activation op's backward, the MLP's backward with bias sums
        assert len(launches) == probe + 2
        assert gt._KERNELS_WORK == {("reglu", torch.float32, x.device, "separate"): True}
        mlp(x).sum().backward()
    assert len(launches) == probe + 4  # no second probe: the fused path's own two launches


@pytest.mark.parametrize(("design", "column_stride"), [("packed", 1), ("packed_interleaved", 2)])
def test_auto_probes_the_views_a_packed_model_design_launches_on(monkeypatch, design, column_stride):
    # A packed design's kernels read gate and up as column views of one [tokens, 2 * intermediate] tensor, a
    # form Triton compiles on its own: auto's probe must launch it, or a default switched to a packed design
    # could fail at its first real step instead of falling back to eager.
    monkeypatch.setattr(gt, "on_cuda", lambda x: True)
    monkeypatch.setattr(gt, "_KERNELS_WORK", {})
    monkeypatch.setattr(gt, "_PROBE_SHAPE", (4, 80))
    forward, backward = [], []
    # The strides of the gate each launch reads: the forward kernel's first argument, the backward's second.
    monkeypatch.setattr(gt, "_glu_fwd_kernel", _RecordingKernel(gt._glu_fwd_kernel, forward, lambda a: a[0].stride()))
    monkeypatch.setattr(gt, "_glu_bwd_kernel", _RecordingKernel(gt._glu_bwd_kernel, backward, lambda a: a[1].stride()))
    mlp = make_mlp("geglu_tanh", hidden=24, inner=40, kernel="auto")
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    mlp(x).sum().backward()
    # The separate design: the probe's contiguous forms (forward; the activation op's and the MLP's backward),
    # then the MLP's own forward and backward.
    assert (forward, backward) == ([(80, 1), (40, 1)], [(80, 1), (80, 1), (40, 1)])
    forward.clear(), backward.clear()
    monkeypatch.setattr(gt, "MODEL_MLP_DESIGN", design)
    mlp(x).sum().backward()  # another design is another key: probed again, now with the packed views
    probe_view, model_view = (160, column_stride), (80, column_stride)
    assert forward == [(80, 1), probe_view, model_view] and backward == [(80, 1), probe_view, model_view]
    assert gt._KERNELS_WORK == {("geglu_tanh", torch.float32, x.device, key): True for key in ("separate", design)}


def test_a_model_on_the_fused_op_compiles_to_one_graph():
    # What CUDA graphs (mode="reduce-overhead") need from us: no graph break anywhere in the model, the MLP
    # one opaque node. The capture itself needs a GPU (benchmarks/gpu_check.sh).
    model = GluForCausalLM(tiny_config(glu_kernel="triton")).to(DEVICE)
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    expected = _causal_lm_logits_and_grads(model, ids, "triton")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture, fullgraph=True)
    model.zero_grad()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    (graph,) = graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.hf_glu.glu_mlp.default) == model.config.n_layer
    torch.testing.assert_close(out.logits, expected[0], rtol=1e-5, atol=1e-5)
    for name, grad in expected[1].items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_errors_naming_them():
    gate = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"torch.float64.*glu_kernel='eager'"):
        gt.glu_activation_fused(gate.double(), gate.double(), "swiglu")
    with pytest.raises(ValueError, match=r"up is \(4, 5\)"):
        gt.glu_activation_fused(gate, gate[:, :5], "swiglu")
    with pytest.raises(ValueError, match="not a known GLU variant"):
        gt.glu_activation_fused(gate, gate, "swish")
    with pytest.raises(ValueError, match="expected an even number"):
        gt.split_gate_up(torch.randn(2, 5))
    with pytest.raises(ValueError, match="'halves' or 'interleaved'"):
        gt.split_gate_up(gate, "stacked")


def test_in_place_backward_refuses_a_tensor_it_cannot_write_through_a_rows_view():
    # A transposed 3-D tensor reshapes to [rows, columns] by copying: results written there would be lost.
    gate = torch.randn(2, 3, 4, device=DEVICE).transpose(0, 1)
    up, grad = gate.clone(), gate.clone()
    with pytest.raises(ValueError, match=r"gate must be 2-D or contiguous to be written in place"):
        gt._mlp_act_grads(grad, gate, up, "swiglu", *_params(), False, in_place=True)
    dgate, *_ = gt._mlp_act_grads(grad, gate, up, "swiglu", *_params(), False)  # new tensors: nothing to lose
    assert dgate.shape == gate.shape


class CountingLinear(nn.Linear):
    """A subclass, as quantised layers are: the fused path must call its forward."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x) * 1.5


def test_non_linear_projections_are_called_and_only_the_activation_fused():
    mlp = make_mlp("reglu")
    counting = CountingLinear(24, 40).to(DEVICE)
    counting.load_state_dict(mlp.up_proj.state_dict())
    mlp.up_proj = counting
    x, grad = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    actual = run_mlp(mlp, x, grad, "triton")
    assert CountingLinear.calls == 1
    for a, e in zip(actual, run_mlp(mlp, x, grad, "eager"), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_forward_hooks_on_projections_still_fire():
    mlp = make_mlp()
    seen = []
    mlp.gate_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    mlp(torch.randn(3, 24, device=DEVICE))
    assert seen == [torch.Size([3, 40])]


def _register_backward_hook(module, seen):
    return module.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(m))


def _register_backward_pre_hook(module, seen):
    return module.register_full_backward_pre_hook(lambda m, grad_out: seen.append(m))


def _register_global_forward_hook(module, seen):
    return torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))


def _register_global_forward_pre_hook(module, seen):
    return torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(m))


def _register_global_backward_hook(module, seen):
    return torch.nn.modules.module.register_module_full_backward_hook(lambda m, grad_in, grad_out: seen.append(m))


def _register_global_backward_pre_hook(module, seen):
    return torch.nn.modules.module.register_module_full_backward_pre_hook(lambda m, grad_out: seen.append(m))


@pytest.mark.parametrize(
    "register",
    [
        _register_backward_hook,
        _register_backward_pre_hook,
        _register_global_forward_hook,
        _register_global_forward_pre_hook,
        _register_global_backward_hook,
        _register_global_backward_pre_hook,
    ],
    ids=lambda f: f.__name__.removeprefix("_register_"),
)
def test_backward_and_global_hooks_on_projections_fire_and_gradients_match_eager(register):
    mlp = make_mlp()
    x, grad = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    expected = run_mlp(mlp, x, grad, "eager")
    seen = []
    handle = register(mlp.gate_proj, seen)
    try:
        actual = run_mlp(mlp, x, grad, "triton")
    finally:
        handle.remove()
    assert mlp.gate_proj in seen
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _forward_hook(module, seen):
    return module.register_forward_hook(lambda m, args, out: seen.append(m))


def _pre_hook_doubling_the_input(module, seen):
    return module.register_forward_pre_hook(lambda m, args: seen.append(m) or (2 * args[0],))


@pytest.mark.parametrize(
    "where, register",
    [
        ("mlp", _forward_hook),
        ("mlp", _pre_hook_doubling_the_input),
        ("mlp", _register_backward_hook),
        ("act_fn", _forward_hook),
        ("mlp", _register_global_forward_hook),
    ],
    ids=["forward", "pre-forward-editing-the-input", "backward", "act_fn-forward", "global-forward"],
)
def test_hooks_on_the_mlp_or_its_activation_fire_and_the_result_is_eagers(where, register):
    # The fused path calls neither the MLP module nor act_fn: a hooked one runs its forward instead.
    mlp = make_mlp()
    x, grad = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    target = mlp if where == "mlp" else mlp.act_fn
    seen = []
    handle = register(target, seen)
    try:
        expected = run_mlp(mlp, x, grad, "eager")
        assert target in seen
        seen.clear()
        actual = run_mlp(mlp, x, grad, "triton")
    finally:
        handle.remove()
    assert target in seen
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.fixture(scope="module")
def one_process_mesh(tmp_path_factory):
    """A one-rank gloo process group and CPU device mesh, torn down after this module's tests."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "file"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class DTensorOutputLinear(nn.Linear):
    """A projection sharded by tensor parallelism with ``use_local_output=False``: it returns DTensors."""

    mesh = None

    def forward(self, x):
        from torch.distributed.tensor import DTensor, Replicate

        local = x.to_local() if isinstance(x, DTensor) else x
        return DTensor.from_local(super().forward(local), self.mesh, [Replicate()])


@pytest.mark.skipif(DEVICE == "cuda", reason="the one-rank mesh is a CPU (gloo) one")
def test_dtensor_projection_outputs_never_reach_the_kernels(one_process_mesh, monkeypatch):
    from torch.distributed.tensor import DTensor, Replicate

    mlp = make_mlp("swiglu_oai")
    x = torch.randn(3, 24, device=DEVICE)
    expected = mlp(x)  # "triton" on plain tensors: the kernels run
    launches = []
    for name in ("launch_forward", "launch_backward"):
        real = getattr(gt, name)
        monkeypatch.setattr(gt, name, lambda *a, real=real, **k: launches.append(a) or real(*a, **k))
    DTensorOutputLinear.mesh = one_process_mesh
    for name in ("gate_proj", "up_proj", "down_proj"):
        projection = DTensorOutputLinear(*reversed(getattr(mlp, name).weight.shape)).to(DEVICE)
        projection.load_state_dict(getattr(mlp, name).state_dict())
        setattr(mlp, name, projection)
    out = mlp(x)
    assert isinstance(out, DTensor) and not launches
    torch.testing.assert_close(out.full_tensor(), expected, rtol=1e-5, atol=1e-6)
    # A DTensor input with plain projections is not handed to the one-op path either.
    distributed_x = DTensor.from_local(x, one_process_mesh, [Replicate()])
    assert not gt._is_plain_linear(DTensorOutputLinear(2, 2)) and gt._is_dtensor(distributed_x)
    assert not gt._is_dtensor(x)


def _causal_lm_logits_and_grads(model, input_ids, kernel):
    model.config.glu_kernel = kernel
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_causal_lm_triton_matches_eager(lora):
    model = GluForCausalLM(tiny_config(glu_variant="swiglu_oai", glu_limit=PARAMS.limit)).to(DEVICE)
    if lora:
        from peft import LoraConfig, get_peft_model

        # Default targets come from `import hf_glu`; random B so the adapters change the output.
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, init_lora_weights=False))
        assert "gate_proj" in model.peft_config["default"].target_modules
    input_ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    base = model.get_base_model() if lora else model
    logits, grads = _causal_lm_logits_and_grads(model, input_ids, "eager")
    base.config.glu_kernel = "triton"
    fused_logits, fused_grads = _causal_lm_logits_and_grads(model, input_ids, "triton")
    assert grads.keys() == fused_grads.keys() and (not lora or any("lora_A" in n for n in grads))
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_checkpoint_copy_registers_its_own_ops(tmp_path):
    package = tmp_path / "ckpt_copy"
    package.mkdir()
    for name in ("glu.py", "glu_triton.py"):
        shutil.copy(REPO / "hf_glu" / name, package / name)
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        copy = importlib.import_module("ckpt_copy.glu_triton")
    finally:
        sys.path.remove(str(tmp_path))
    assert copy.NAMESPACE == "hf_glu_ckpt_copy_glu_triton"
    gate = torch.randn(3, 5, device=DEVICE)
    torch.testing.assert_close(copy.glu_activation_fused(gate, gate, "glu"), gt.glu_activation_fused(gate, gate, "glu"))


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the benchmark runs in full from benchmarks/gpu_check.sh")
def test_benchmark_smoke_mode_runs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_mlp.py"), "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert {"eager", "torch.compile", "liger", "fused", "gemms"} <= rows.keys()
    (shape,) = report["shapes"]
    tokens, hidden, inner = shape["tokens"], shape["hidden"], shape["inner"]
    assert rows["fused"]["saved_mib"] * 2**20 == 4 * (tokens * hidden + 2 * tokens * inner)  # fp32
    assert rows["fused"]["max_rel_err"] < 1e-5
    # Every candidate design of the fused op runs beside the default, same maths, same memory kept.
    for design in gt.MLP_DESIGNS.keys() - {gt.DEFAULT_MLP_DESIGN}:
        row = rows[f"fused[{design}]"]
        assert row["max_rel_err"] < 1e-5 and row["saved_mib"] == rows["fused"]["saved_mib"] and row["fwd_bwd_ms"] > 0
    assert report["design_choice"][0]["shape"] == shape["name"] and "Fused designs" in result.stdout
    # Two interleaved timing rounds on CPU: every timed row has a spread, untimed ones (liger) none.
    assert all(rows[impl]["spread"] is not None for impl in ("gemms", "eager", "fused"))
    assert rows["liger"]["spread"] is None and rows["liger"]["fwd_bwd_ms"] is None
    assert "| impl |" in result.stdout
    # The smoke shape has biases: the fused gradients (bias sums from the kernel) ran; the goals are the
    # biased shapes' ones, measured against the fastest peer.
    assert shape["bias"] and rows["fused"]["fwd_bwd_ms"] is not None
    goals = {g["goal"]: g for g in report["goals"][shape["name"]]}
    assert "fwd+bwd >= 1.00x the fastest peer" in goals and goals["saved for backward = x + 2 x [tokens, inner]"]["met"]
    # The inference table: every implementation timed at every size, auto's choice and the crossover reported.
    inference = {(r["tokens"], r["impl"]): r for r in report["inference"]}
    sizes = sorted({tokens for tokens, _ in inference})
    assert len(sizes) >= 2 and all(
        inference[t, impl]["fwd_ms"] > 0 for t in sizes for impl in ("eager", "fused", "auto")
    )
    assert all(inference[t, "auto"]["note"] == "picks eager" for t in sizes)  # CPU tensors: auto is eager
    assert report["inference_eager_below_tokens"] == gt.INFERENCE_EAGER_BELOW_TOKENS
    assert shape["name"] in report["inference_crossover"] and "inference: auto >= 1.00x eager at every size" in goals
    assert "Forward under torch.inference_mode" in result.stdout


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the benchmark runs in full from benchmarks/gpu_check.sh")
def test_training_benchmark_smoke_mode_runs(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--smoke", "--threads", "1", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())  # strict JSON: json.loads would take NaN, the writer refuses it
    train = {(r["model"], r["kernel"]): r for r in report["train"]}
    assert train.keys() == {("glu", "triton"), ("glu", "eager"), ("gpt2 dense", None)}
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in train.values())
    generate = {(r["model"], r["kernel"], r["batch"]) for r in report["generate"]}
    batches = tuple(report["setup"]["gen_batches"])
    assert generate == {(m, k, b) for m, k in train for b in batches} and len(batches) == 2
    assert [g["goal"] for g in report["goals"]][0] == "training step: fused >= 1.15x eager tokens/s"
    assert "| glu_kernel |" in result.stdout
