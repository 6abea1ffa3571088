"""GLU MLP benchmark: eager vs torch.compile vs Liger-Kernel vs the fused Triton path, against the GEMMs alone.

    python benchmarks/bench_mlp.py [--json results.json] [--shapes llama2-7b gpt2] [--iters 30] [--sweep]
                                   [--repeat 5] [--inference-tokens 1 16 256 2048] [--designs packed ...]
                                   [--profile [STEPS]]

On CUDA it runs the real shapes (bf16, 8192 tokens); on CPU a tiny smoke configuration (fp32, Triton's
interpreter) so CI can check the script still runs — its timings mean nothing. Per implementation and
shape it reports forward and forward+backward time, peak memory of forward+backward, the bytes kept for
backward (measured with saved-tensor hooks), TFLOP/s of the GEMMs, the speed-up over our eager MLP and
the ratio to the GEMMs alone timed in the same run, then the issue's goals as met / missed. A second
table times the forward alone under ``torch.inference_mode`` at decode and prefill sizes (fused, eager,
Transformers' LlamaMLP and what ``glu_kernel="auto"`` picks) and reports where fused overtakes eager: the
measurement that sets ``glu_triton.INFERENCE_EAGER_BELOW_TOKENS``. On CUDA it also times the elementwise
kernels alone against the card's copy bandwidth (``--sweep``: for each launch configuration). Every
candidate design of the fused op (``glu_triton.MLP_DESIGNS``, ``--designs``; all by default) gets a row
``fused[<design>]`` beside the default ``fused``, and a table names the fastest design per shape and whether
its margin is beyond the rounds' spread. ``--profile`` replaces the timing tables by ``torch.profiler``
per-kernel times of one forward+backward step per implementation. Prints markdown tables; ``--json`` also
writes the rows.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the smoke run on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_glu import GluConfig, GluMLP, glu_triton  # noqa: E402
from hf_glu.bad_input import OneLineParser  # noqa: E402
from hf_glu.jsonio import strict_json, write_json  # noqa: E402

T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inner: int
    tokens: int
    bias: bool
    variant: str
    dtype: torch.dtype = torch.bfloat16


# GPT-2's MLP widths (hidden, 4 x hidden), with biases as every converted GPT-2 has them.
GPT2_SIZES = {
    "gpt2-small": (768, 3072),
    "gpt2-medium": (1024, 4096),
    "gpt2-large": (1280, 5120),
    "gpt2-xl": (1600, 6400),
}
GPT2_VARIANTS = ("geglu_tanh", "swiglu")
SHAPES = {
    s.name: s
    for s in (
        Shape("llama2-7b", 4096, 11008, 8192, bias=False, variant="swiglu"),
        *(
            Shape(f"{size}-{variant}", hidden, inner, 8192, bias=True, variant=variant)
            for variant in GPT2_VARIANTS
            for size, (hidden, inner) in GPT2_SIZES.items()
        ),
    )
}
# `--shapes gpt2` names every GPT-2 shape; `--shapes gpt2-geglu_tanh` one variant's four.
SHAPE_GROUPS = {
    "gpt2": [name for name in SHAPES if name.startswith("gpt2")],
    **{f"gpt2-{v}": [f"{size}-{v}" for size in GPT2_SIZES] for v in GPT2_VARIANTS},
}
SMOKE = Shape("smoke-cpu", 32, 96, 64, bias=True, variant="swiglu", dtype=torch.float32)
SMOKE_SHAPES = [SMOKE]  # what the CPU smoke run measures
INFERENCE_TOKENS = [1, 16, 256, 2048]  # decode (batch 1 and 16) and prefill
SMOKE_INFERENCE_TOKENS = [1, 16, 64]


@dataclass
class Row:
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    saved_mib: float | None = None
    saved_bytes: int | None = None
    tflops: float | None = None
    x_gemms: float | None = None
    speedup: float | None = None
    spread: float | None = None
    max_rel_err: float | None = None
    note: str = ""


class RowLog:
    """Appends each measured row to a JSON-lines file the moment it exists, flushed to disk, so a run cut
    short by a time limit keeps every row it measured (the final ``--json`` file is written only at the end)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, table: str, row: object) -> None:
        record = {"table": table, **(asdict(row) if hasattr(row, "__dataclass_fields__") else dict(row))}
        line = strict_json(record, indent=None)
        print(f"row {line}", flush=True)  # also in the step's captured log
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())


def attempt(what: str, fn: Callable[[], T]) -> tuple[T | None, str]:
    """``(fn(), "")``, or ``(None, "failed: <error>")`` after printing the traceback: one implementation that
    fails (an import, a compile, a launch, out of memory) costs its own row, not the whole step."""
    try:
        return fn(), ""
    except Exception as error:  # whatever the implementation raises, the benchmark goes on
        print(f"{what} failed:", file=sys.stderr)
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"failed: {type(error).__name__}: {error}"[:200]


# --- Implementations: each maps x to the MLP output (parameters inside) -------------------------------


def build_mlp(shape: Shape, kernel: str, device: str) -> GluMLP:
    config = GluConfig(
        n_embd=shape.hidden,
        n_inner=shape.inner,
        n_head=1,
        glu_variant=shape.variant,
        mlp_bias=shape.bias,
        glu_kernel=kernel,
        resid_pdrop=0.0,
    )
    return GluMLP(config).to(device, shape.dtype).eval()  # eval: no dropout; autograd is unaffected


def liger_mlp(shape: Shape, eager: GluMLP) -> tuple[torch.nn.Module | None, str]:
    """Liger-Kernel's MLP with the same weights, or (None, why not).

    Liger's MLP modules build bias-free projections; for biased shapes they get the eager module's biased
    ``nn.Linear`` layers instead, which is what a user adding Liger to a converted GPT-2 would write: its
    fused activation between plain cuBLAS projections."""
    if shape.variant not in ("swiglu", "geglu_tanh") or eager.params.beta != 1.0:
        return None, f"Liger has no {shape.variant} MLP"
    try:
        from types import SimpleNamespace

        if shape.variant == "swiglu":
            from liger_kernel.transformers.swiglu import LigerSwiGLUMLP as cls

            act = "silu"
        else:
            from liger_kernel.transformers.geglu import LigerGEGLUMLP as cls

            act = "gelu_pytorch_tanh"
    except ImportError:
        return None, "liger-kernel not installed"
    config = SimpleNamespace(
        hidden_size=shape.hidden, intermediate_size=shape.inner, hidden_act=act, hidden_activation=act
    )
    module = cls(config).to(eager.gate_proj.weight.device, shape.dtype)
    if shape.bias:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(module, name, copy.deepcopy(getattr(eager, name)))
        return module, "Liger's activation, biased nn.Linear projections"
    module.load_state_dict(eager.state_dict(), strict=False)
    return module, ""


def liger_gemm_mlp(shape: Shape, eager: GluMLP) -> tuple[torch.nn.Module | None, str]:
    """Liger-Kernel's ``LigerMLP`` (``liger_kernel.transformers.mlp``, 0.8.x) with the same weights, or (None,
    why not): gate and up GEMMs and SiLU-times-up in one Triton kernel, the down GEMM in cuBLAS; SwiGLU
    with beta 1 and no biases only. It needs ``triton.tools.tensor_descriptor`` (TMA): on older GPUs or
    tritons it raises at the first call, which the caller records as its row's error."""
    if shape.variant != "swiglu" or eager.params.beta != 1.0 or shape.bias:
        return None, "LigerMLP is bias-free SwiGLU only"
    try:
        from liger_kernel.transformers.mlp import LigerMLP
    except ImportError:
        return None, "liger-kernel (with LigerMLP) not installed"
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=shape.hidden, intermediate_size=shape.inner, hidden_act="silu")
    module = LigerMLP(config).to(eager.gate_proj.weight.device, shape.dtype)
    module.load_state_dict(eager.state_dict())
    return module, "gate/up GEMM + SiLU fused"


def transformers_mlp(shape: Shape, eager: GluMLP) -> tuple[torch.nn.Module | None, str]:
    """Transformers' own eager GLU MLP (``LlamaMLP``: act(gate) * up in the input dtype), what users run today."""
    activations = {"swiglu": "silu", "geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu", "reglu": "relu"}
    if shape.variant not in activations or eager.params.beta != 1.0:
        return None, f"no Transformers activation for {shape.variant}"
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.inner,
        hidden_act=activations[shape.variant],
        mlp_bias=shape.bias,
        num_attention_heads=1,  # unused by the MLP; newer configs check that it divides hidden_size
        num_key_value_heads=1,
    )
    module = LlamaMLP(config).to(eager.gate_proj.weight.device, shape.dtype)
    module.load_state_dict(eager.state_dict())
    return module, ""


def with_kernel(mlp: GluMLP, kernel: str) -> GluMLP:
    """A copy of ``mlp`` (same weights) with its own config set to ``glu_kernel=kernel``."""
    other = copy.deepcopy(mlp)
    other.config = copy.deepcopy(mlp.config)
    other.config.glu_kernel = kernel
    return other


class DesignMLP(torch.nn.Module):
    """A fused MLP in one of ``glu_triton.MLP_DESIGNS`` (the GEMM arrangements the fused op can take) with
    ``mlp``'s weights: calls ``fused_mlp_from_weights`` with ``design=`` as the model's dispatch calls it with
    ``MODEL_MLP_DESIGN``."""

    def __init__(self, mlp: GluMLP, design: str) -> None:
        super().__init__()
        self.mlp, self.design = mlp, design

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [t for p in (self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj) for t in (p.weight, p.bias)]
        return glu_triton.fused_mlp_from_weights(x, *weights, self.mlp.variant, self.mlp.params, self.design)


def design_impl(design: str) -> str:
    """The row name of a fused design: ``fused`` for the default one (the model's path), ``fused[<design>]``."""
    return "fused" if design == glu_triton.DEFAULT_MLP_DESIGN else f"fused[{design}]"


CANDIDATE_DESIGNS = [d for d in glu_triton.MLP_DESIGNS if d != glu_triton.DEFAULT_MLP_DESIGN]


def implementations(shape: Shape, device: str, designs: Sequence[str] = ()) -> dict[str, tuple[Callable | None, str]]:
    """Each implementation (or None and why not) for ``shape``; one that fails to build gets an error note.
    ``designs``: candidate designs of the fused op timed beside the default one (rows ``fused[<design>]``)."""
    eager = build_mlp(shape, "eager", device)
    on_cpu = device == "cpu"
    impls: dict[str, tuple[Callable | None, str]] = {"eager": (eager, "hf_glu's eager reference (fp32 maths)")}

    def add(impl: str, build: Callable[[], tuple[Callable | None, str]]) -> None:
        built, error = attempt(f"building {impl} for {shape.name}", build)
        impls[impl] = built if built is not None else (None, error)

    add("transformers LlamaMLP", lambda: transformers_mlp(shape, eager))
    llama = impls["transformers LlamaMLP"][0]

    def compiled() -> tuple[Callable, str]:
        # The peer a user gets from one line: torch.compile of Transformers' MLP (of our eager one where
        # Transformers has no such activation). On CPU the smoke run only checks the path works: aot_eager
        # skips Inductor's slow C++ build.
        module = torch.compile(copy.deepcopy(llama or eager), backend="aot_eager" if on_cpu else "inductor")
        what = "of LlamaMLP" if llama is not None else "of hf_glu eager"
        return module, f"{what}, aot_eager backend (CPU smoke)" if on_cpu else what

    add("torch.compile", compiled)
    add("liger", lambda: (None, "needs CUDA") if on_cpu else liger_mlp(shape, eager))
    add("liger LigerMLP", lambda: (None, "needs CUDA") if on_cpu else liger_gemm_mlp(shape, eager))
    if not glu_triton.TRITON_AVAILABLE:
        impls["fused"] = (None, "triton not installed")
    else:
        add("fused", lambda: (with_kernel(eager, "triton"), "Triton interpreter (CPU smoke)" if on_cpu else ""))
        for design in designs:
            what = glu_triton.MLP_DESIGNS[design]
            note = f"{what.packing} gate/up GEMMs, bias sums by {what.bias_sums}"
            add(design_impl(design), lambda design=design, note=note: (DesignMLP(copy.deepcopy(eager), design), note))
    return impls


class Gemms:
    """The MLP's GEMMs alone, on preallocated operands: the floor any implementation can reach.

    With biases, the forward GEMMs add them (``F.linear``: cuBLAS's bias epilogue) and backward also sums
    the down projection's bias gradient over [tokens, hidden], which every implementation pays; the gate
    and up bias gradients are left out, since a fused backward can sum them on the way."""

    def __init__(self, shape: Shape, device: str):
        t, h, i = shape.tokens, shape.hidden, shape.inner

        def rand(*size):
            return torch.randn(*size, device=device, dtype=shape.dtype)

        self.x, self.dy, self.act, self.dg, self.du = rand(t, h), rand(t, h), rand(t, i), rand(t, i), rand(t, i)
        self.wg, self.wu, self.wd = rand(i, h), rand(i, h), rand(h, i)
        self.bg, self.bu, self.bd = (rand(i), rand(i), rand(h)) if shape.bias else (None, None, None)

    def forward(self) -> None:
        F.linear(self.x, self.wg, self.bg), F.linear(self.x, self.wu, self.bu), F.linear(self.act, self.wd, self.bd)

    def forward_backward(self) -> None:
        self.forward()
        self.dy @ self.wd, self.dy.t() @ self.act  # d act, d down
        if self.bd is not None:
            self.dy.sum(0)  # d down bias
        (self.dg @ self.wg).addmm_(self.du, self.wu)  # d x
        self.dg.t() @ self.x, self.du.t() @ self.x  # d gate, d up


# --- Measurements ---------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], None], device: str, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def saved_bytes(mlp: Callable, x: torch.Tensor, params: set[int]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward of one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    del out
    return sum(storages.values())


def peak_mib(step: Callable[[], None], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def steps(mlp: Callable, x: torch.Tensor, dy: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) of one implementation on the shared input, gradients cleared first."""

    def forward() -> None:
        mlp(x)

    def forward_backward() -> None:
        for p in mlp.parameters():
            p.grad = None
        x.grad = None
        mlp(x).backward(dy)

    return forward, forward_backward


def profile_impl(
    mlp: Callable, x: torch.Tensor, dy: torch.Tensor, device: str, warmup: int
) -> tuple[Row, torch.Tensor]:
    """Memory of one implementation (after warm-up: compilation and autotuning stay out) and its output in
    fp32 for the error column."""
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    forward, forward_backward = steps(mlp, x, dy)
    for _ in range(warmup):
        forward()
        forward_backward()
    for p in mlp.parameters():  # the last step's gradients out of the baseline, so the peak counts them
        p.grad = None
    x.grad = None
    row = Row("", "", peak_mib=peak_mib(forward_backward, device))
    row.saved_bytes = saved_bytes(mlp, x, params)
    row.saved_mib = row.saved_bytes / 2**20
    with torch.no_grad():
        out = mlp(x).float()
    return row, out


def measure(
    shape: Shape, device: str, iters: int, warmup: int, repeat: int = 1, designs: Sequence[str] = ()
) -> list[Row]:
    """One row per implementation. Timings are interleaved: ``repeat`` rounds, each timing every
    implementation in turn, so a drift of the card's clock or temperature hits all of them alike; each
    figure is the median over rounds of the per-round medians, and ``spread`` is the fwd+bwd range over
    rounds relative to that median."""
    torch.manual_seed(0)
    x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=shape.dtype, requires_grad=True)
    dy = torch.randn(shape.tokens, shape.hidden, device=device, dtype=shape.dtype)
    flops = 2 * shape.tokens * shape.hidden * shape.inner * 3  # forward GEMMs; backward is twice that
    gemms = Gemms(shape, device)
    rows = [Row(shape.name, "gemms")]
    timed = {"gemms": (gemms.forward, gemms.forward_backward)}
    reference = None
    for impl, (mlp, note) in implementations(shape, device, designs).items():
        if mlp is None:
            rows.append(Row(shape.name, impl, note=note))
            continue
        profiled, error = attempt(f"{impl} on {shape.name}", lambda mlp=mlp: profile_impl(mlp, x, dy, device, warmup))
        if profiled is None:
            rows.append(Row(shape.name, impl, note=error))
            continue
        row, out = profiled
        reference = out if reference is None else reference  # eager comes first
        row.shape, row.impl, row.note = shape.name, impl, note
        row.max_rel_err = ((out - reference).abs().max() / reference.abs().max()).item()
        rows.append(row)
        timed[impl] = steps(mlp, x, dy)
    for _ in range(warmup):
        gemms.forward_backward()
    rounds: dict[str, list[tuple[float, float]]] = {impl: [] for impl in timed}
    by_impl = {r.impl: r for r in rows}
    for _ in range(repeat):
        for impl, (forward, forward_backward) in list(timed.items()):
            times, error = attempt(
                f"timing {impl} on {shape.name}",
                lambda f=forward, fb=forward_backward: (time_ms(f, device, iters, 1), time_ms(fb, device, iters, 1)),
            )
            if times is None:  # out of the remaining rounds; its row keeps the memory figures and the error
                del timed[impl], rounds[impl]
                by_impl[impl].note = error
            else:
                rounds[impl].append(times)
    for impl, times in rounds.items():
        row = by_impl[impl]
        fwd_bwd = [t[1] for t in times]
        row.fwd_ms, row.fwd_bwd_ms = statistics.median(t[0] for t in times), statistics.median(fwd_bwd)
        row.spread = (max(fwd_bwd) - min(fwd_bwd)) / row.fwd_bwd_ms if repeat > 1 else None
        row.tflops = 3 * flops / row.fwd_bwd_ms / 1e9
    gemm_ms, eager_ms = by_impl["gemms"].fwd_bwd_ms, by_impl["eager"].fwd_bwd_ms
    for r in rows:
        if r.fwd_bwd_ms is not None:
            r.x_gemms = r.fwd_bwd_ms / gemm_ms if gemm_ms is not None else None
            r.speedup = eager_ms / r.fwd_bwd_ms if eager_ms is not None else None
    return rows


def is_fused(impl: str) -> bool:
    """Whether a row is hf_glu's fused op (the default design or a candidate), not a peer."""
    return impl == "fused" or impl.startswith("fused[")


def design_choice(shape: Shape, rows: list[Row]) -> dict | None:
    """Which fused design was fastest at ``shape`` (fwd+bwd median) and whether it beat the default by more
    than the run's noise: its margin must exceed the larger fwd+bwd spread (range over the interleaved rounds)
    of the two rows. None when fewer than two designs were timed."""
    timed = [r for r in rows if r.shape == shape.name and is_fused(r.impl) and r.fwd_bwd_ms is not None]
    default = next((r for r in timed if r.impl == "fused"), None)
    if default is None or len(timed) < 2:
        return None
    best = min(timed, key=lambda r: r.fwd_bwd_ms)
    margin = default.fwd_bwd_ms / best.fwd_bwd_ms - 1.0
    noise = max(default.spread or 0.0, best.spread or 0.0)
    return dict(shape=shape.name, fastest=best.impl, fwd_bwd_ms=best.fwd_bwd_ms, default_ms=default.fwd_bwd_ms,
                margin=margin, noise=noise, beyond_noise=best.impl != "fused" and margin > noise,
                choose=best.impl if best.impl != "fused" and margin > noise else "fused")  # fmt: skip


def design_markdown(choices: list[dict]) -> str:
    lines = ["| shape | fastest fused design | fwd+bwd ms | default ms | margin | noise (spread) | choose |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in choices:
        lines.append(
            f"| {c['shape']} | {c['fastest']} | {c['fwd_bwd_ms']:.3f} | {c['default_ms']:.3f} | {c['margin']:+.1%} | "
            f"{c['noise']:.1%} | {c['choose']} |"
        )
    return "\n".join(lines)


def goals(shape: Shape, rows: list[Row]) -> list[tuple[str, str, bool | None]]:
    """The issue's goals for the fused path as (goal, measured, met); met is None when not measurable.

    Bias-free shapes (Llama-2-7B) keep the first goals: >= 1.10x eager, >= Liger and torch.compile, within
    1.15x of the GEMMs. Biased shapes (GPT-2's, the working point of converted checkpoints): >= the fastest
    peer (stretch 1.10x), within 1.3x of the GEMMs-with-bias floor from gpt2-medium's width up, peak memory
    <= every peer's. Both: saved for backward exactly x + 2 x [tokens, inner].
    """
    by_impl = {r.impl: r for r in rows if r.shape == shape.name}
    fused = by_impl.get("fused")
    if fused is None or fused.fwd_bwd_ms is None:
        return [("fused path runs", "no measurement", False)]

    def faster_than(impl: str, factor: float) -> tuple[str, str, bool | None]:
        other = by_impl.get(impl)
        if other is None or other.fwd_bwd_ms is None:
            return f"fwd+bwd >= {factor:.2f}x {impl}", "not measured", None
        ratio = other.fwd_bwd_ms / fused.fwd_bwd_ms
        return f"fwd+bwd >= {factor:.2f}x {impl}", f"{ratio:.3f}x", ratio >= factor

    expected = shape.dtype.itemsize * shape.tokens * (shape.hidden + 2 * shape.inner)
    saved = f"{fused.saved_bytes} vs {expected} bytes"
    saved_check = ("saved for backward = x + 2 x [tokens, inner]", saved, fused.saved_bytes == expected)
    if not shape.bias:
        liger = by_impl.get("liger")
        checks = [faster_than("eager", 1.10), faster_than("liger", 1.0), faster_than("torch.compile", 1.0)]
        checks.append(("fwd+bwd within 1.15x of the GEMMs alone", f"{fused.x_gemms:.3f}x", fused.x_gemms <= 1.15))
        if liger is None or liger.peak_mib is None or fused.peak_mib is None:
            checks.append(("peak memory <= Liger's", "not measured", None))
        else:
            peak = f"{fused.peak_mib:.0f} vs {liger.peak_mib:.0f} MiB"
            checks.append(("peak memory <= Liger's", peak, fused.peak_mib <= liger.peak_mib))
        return [*checks, saved_check]
    peers = [r for r in by_impl.values() if not is_fused(r.impl) and r.impl != "gemms" and r.fwd_bwd_ms is not None]
    checks = []
    if peers:
        fastest = min(peers, key=lambda r: r.fwd_bwd_ms)
        ratio = fastest.fwd_bwd_ms / fused.fwd_bwd_ms
        for factor in (1.0, 1.10):
            checks.append(
                (f"fwd+bwd >= {factor:.2f}x the fastest peer", f"{ratio:.3f}x {fastest.impl}", ratio >= factor)
            )
    else:
        checks.append(("fwd+bwd >= 1.00x the fastest peer", "no peer measured", None))
    floor_applies = shape.hidden >= GPT2_SIZES["gpt2-medium"][0]
    checks.append(
        ("fwd+bwd within 1.3x of the GEMMs with bias (gpt2-medium up)", f"{fused.x_gemms:.3f}x",
         fused.x_gemms <= 1.3 if floor_applies else None)
    )  # fmt: skip
    peaks = [r for r in peers if r.peak_mib is not None]
    if fused.peak_mib is None or not peaks:
        checks.append(("peak memory <= every peer's", "not measured", None))
    else:
        lowest = min(peaks, key=lambda r: r.peak_mib)
        peak = f"{fused.peak_mib:.0f} vs {lowest.peak_mib:.0f} MiB ({lowest.impl})"
        checks.append(("peak memory <= every peer's", peak, fused.peak_mib <= lowest.peak_mib))
    return [*checks, saved_check]


def all_goals(shape: Shape, rows: list[Row], inference: list[InferenceRow]) -> list[tuple[str, str, bool | None]]:
    """The goals of whichever tables ran for ``shape``."""
    checks = goals(shape, rows) if any(r.shape == shape.name for r in rows) else []
    return checks + (inference_goals(shape, inference) if any(r.shape == shape.name for r in inference) else [])


def goals_markdown(shapes: list[Shape], rows: list[Row], inference: list[InferenceRow]) -> str:
    lines = ["| shape | goal | measured | met |", "|---|---|---|---|"]
    for shape in shapes:
        for goal, measured, met in all_goals(shape, rows, inference):
            verdict = "n/a" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {shape.name} | {goal} | {measured} | {verdict} |")
    return "\n".join(lines)


# --- Inference: the forward alone under inference_mode ---------------------------------------------------


@dataclass
class InferenceRow:
    shape: str
    tokens: int
    impl: str
    fwd_ms: float | None = None
    speedup: float | None = None  # eager's time over this one's
    note: str = ""


def measure_inference(shape: Shape, device: str, sizes: list[int], iters: int, repeat: int) -> list[InferenceRow]:
    """Forward time under ``torch.inference_mode`` at each token count: eager, Transformers' LlamaMLP, the
    fused path forced (``triton``) and ``auto`` (which takes eager below ``INFERENCE_EAGER_BELOW_TOKENS``),
    timed in ``repeat`` interleaved rounds, median over rounds."""
    torch.manual_seed(0)
    eager = build_mlp(shape, "eager", device)
    impls: dict[str, Callable] = {"eager": eager}
    llama, _ = transformers_mlp(shape, eager)
    if llama is not None:
        impls["transformers LlamaMLP"] = llama
    if glu_triton.TRITON_AVAILABLE:
        impls["fused"], impls["auto"] = with_kernel(eager, "triton"), with_kernel(eager, "auto")
    rows = []
    with torch.inference_mode():
        for tokens in sizes:
            x = torch.randn(tokens, shape.hidden, device=device, dtype=shape.dtype)
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            errors: dict[str, str] = {}
            for _ in range(repeat):
                for impl, mlp in impls.items():
                    if impl in errors:
                        continue
                    ms, error = attempt(
                        f"{impl} inference on {shape.name} at {tokens} tokens",
                        lambda mlp=mlp, x=x: time_ms(lambda: mlp(x), device, iters, 2),
                    )
                    if ms is None:
                        errors[impl] = error
                    else:
                        times[impl].append(ms)
            auto_path = "fused" if glu_triton.fused_path_wanted("auto", x) else "eager"
            eager_ms = statistics.median(times["eager"]) if "eager" not in errors else None
            for impl, t in times.items():
                if impl in errors:
                    rows.append(InferenceRow(shape.name, tokens, impl, note=errors[impl]))
                    continue
                ms = statistics.median(t)
                note = f"picks {auto_path}" if impl == "auto" else ""
                rows.append(InferenceRow(shape.name, tokens, impl, ms, eager_ms / ms if eager_ms else None, note))
    return rows


def crossover(rows: list[InferenceRow]) -> int | None:
    """The smallest measured token count from which the forced fused path is at least as fast as eager at
    every larger measured size (None if it loses at the largest): the next INFERENCE_EAGER_BELOW_TOKENS."""
    fused = sorted((r.tokens, r.speedup) for r in rows if r.impl == "fused" and r.speedup is not None)
    since = None
    for tokens, speedup in fused:
        if speedup >= 1.0:
            since = tokens if since is None else since
        else:
            since = None
    return since


def inference_goals(shape: Shape, rows: list[InferenceRow]) -> list[tuple[str, str, bool | None]]:
    """Fused >= eager at every inference size, as users get it (``auto``); and the forced path's crossover."""
    mine = [r for r in rows if r.shape == shape.name]
    auto = [r for r in mine if r.impl == "auto"]
    if not auto:
        return [("inference: auto >= 1.00x eager at every size", "not measured", None)]
    # Where auto picks eager it runs the eager code: the timing difference is noise, not a loss.
    fused_sizes = [r for r in auto if r.note == "picks fused" and r.speedup is not None]
    worst = min(fused_sizes, key=lambda r: r.speedup, default=None)
    measured = (
        "eager at every size" if worst is None else f"{worst.speedup:.3f}x at {worst.tokens} tokens (worst fused)"
    )
    checks = [("inference: auto >= 1.00x eager at every size", measured, worst is None or worst.speedup >= 1.0)]
    since = crossover(mine)
    threshold = glu_triton.INFERENCE_EAGER_BELOW_TOKENS
    found = "fused loses at the largest size" if since is None else f"fused >= eager from {since} tokens"
    checks.append((f"crossover (INFERENCE_EAGER_BELOW_TOKENS = {threshold})", found, None))
    return checks


def inference_markdown(rows: list[InferenceRow]) -> str:
    impls = list(dict.fromkeys(r.impl for r in rows))
    lines = [
        "| shape | tokens | " + " | ".join(f"{i} ms (vs eager)" for i in impls) + " |",
        "|---|---|" + "---|" * len(impls),
    ]
    cells: dict[tuple[str, int], dict[str, InferenceRow]] = {}
    for r in rows:
        cells.setdefault((r.shape, r.tokens), {})[r.impl] = r
    for (shape, tokens), by_impl in cells.items():
        values = []
        for impl in impls:
            r = by_impl.get(impl)
            note = f", {r.note}" if r is not None and r.note else ""
            if r is None or r.fwd_ms is None:
                values.append("n/a" if r is None else r.note)
            else:
                speedup = "n/a" if r.speedup is None else f"{r.speedup:.2f}x"
                values.append(f"{r.fwd_ms:.4f} ({speedup}{note})")
        lines.append(f"| {shape} | {tokens} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# --- The elementwise kernels alone ------------------------------------------------------------------------


def copy_gbps(numel: int, dtype: torch.dtype, iters: int) -> float:
    """Device-to-device copy bandwidth, bytes read plus written: the ceiling for the elementwise kernels."""
    src = torch.randn(numel, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), "cuda", iters, 3)
    return 2 * src.nbytes / ms / 1e6


def kernel_rows(shape: Shape, iters: int, sweep: bool) -> list[dict]:
    """GB/s of the forward kernel (reads gate, up; writes act) and the backward kernel (reads grad, gate,
    up; writes d gate, d up, act) on [tokens, inner] inputs, per launch configuration."""
    t, i = shape.tokens, shape.inner
    gate, up, grad = (torch.randn(t, i, device="cuda").to(shape.dtype) for _ in range(3))
    out, dgate, dup = (torch.empty_like(gate) for _ in range(3))
    params = GluConfig(glu_variant=shape.variant).glu_params
    bytes_per_pass = gate.nbytes
    ceiling = copy_gbps(t * i, shape.dtype, iters)
    # Warps: the forward's on contiguous inputs (num_warps) and the backward's (wide_num_warps). The sweep sets both
    # alike, and measures the default beside them, so its rows compare every setting with what the ops launch.
    default = glu_triton.DEFAULT_KERNEL_TUNING
    tunings = [default]
    if sweep:
        grid = [glu_triton.KernelTuning(b, w, w) for b in (1024, 2048, 4096, 8192, 16384) for w in (2, 4, 8)]
        tunings += [tuning for tuning in grid if tuning != default]
    rows = []

    def timed(tuning: glu_triton.KernelTuning) -> tuple[float, float]:
        fwd = time_ms(
            lambda: glu_triton.launch_forward(gate, up, out, shape.variant, params, tuning=tuning), "cuda", iters, 3
        )
        bwd = time_ms(
            lambda: glu_triton.launch_backward(
                grad, gate, up, dgate, dup, out, shape.variant, params, shape.bias, tuning=tuning
            ),
            "cuda",
            iters,
            3,
        )
        return fwd, bwd

    for tuning in tunings:
        block, warps, bwd_warps = tuning.block_elements, tuning.num_warps, tuning.wide_num_warps
        config = dict(block_elements=block, num_warps=warps, bwd_num_warps=bwd_warps, default=tuning == default)
        label = f"kernels of {shape.name} at {block} elements, {warps}/{bwd_warps} warps"
        both, error = attempt(label, functools.partial(timed, tuning))
        if both is None:
            rows.append(dict(shape=shape.name, **config, error=error))
            continue
        fwd, bwd = both
        fwd_gbps, bwd_gbps = 3 * bytes_per_pass / fwd / 1e6, 6 * bytes_per_pass / bwd / 1e6
        rows.append(
            dict(shape=shape.name, **config,
                 fwd_ms=fwd, bwd_ms=bwd, fwd_gbps=fwd_gbps, bwd_gbps=bwd_gbps, copy_gbps=ceiling)
        )  # fmt: skip
    return rows


def kernels_markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | elements/program | warps fwd/bwd | fwd ms | fwd GB/s | bwd ms | bwd GB/s | of copy GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (default)" if r["default"] else ""
        warps = f"{r['num_warps']}/{r.get('bwd_num_warps', r['num_warps'])}"
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['block_elements']}{mark} | {warps} | {r['error']} |")
            continue
        share = f"{r['fwd_gbps'] / r['copy_gbps']:.0%} / {r['bwd_gbps'] / r['copy_gbps']:.0%} of {r['copy_gbps']:.0f}"
        lines.append(
            f"| {r['shape']} | {r['block_elements']}{mark} | {warps} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_gbps']:.0f} | {r['bwd_ms']:.3f} | {r['bwd_gbps']:.0f} | {share} |"
        )
    return "\n".join(lines)


# --- Per-kernel profile ----------------------------------------------------------------------------------


@dataclass
class KernelRow:
    shape: str
    impl: str
    kernel: str  # "(all)" for the implementation's total
    calls: float | None = None  # launches per forward+backward step
    us: float | None = None  # device time per step (CPU: self time of the op), microseconds
    note: str = ""


PROFILE_TOP = 8  # kernels listed per implementation (the rest still count in its "(all)" row)


def _event_us(event: object, device: str) -> float:
    # torch 2.6 names the device time cuda_time_total, later ones device_time_total (the old name deprecated).
    if device != "cuda":
        return event.self_cpu_time_total
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def profile_kernels(
    shape: Shape, device: str, steps_profiled: int, warmup: int, designs: Sequence[str] = ()
) -> list[KernelRow]:
    """Per implementation, what one forward+backward step launches: ``torch.profiler`` over ``steps_profiled``
    steps after ``warmup``, each kernel's device time and launches per step, the largest ``PROFILE_TOP`` and the
    total. Shows where a fused design's time goes (GEMMs, the elementwise kernels, the weight concatenation of
    the packed designs, the bias reductions, launch gaps) beside what Liger, LlamaMLP and torch.compile run.
    On CPU (smoke) the CPU ops' self times stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=shape.dtype, requires_grad=True)
    dy = torch.randn(shape.tokens, shape.hidden, device=device, dtype=shape.dtype)
    gemms = Gemms(shape, device)
    runnable: dict[str, Callable[[], None]] = {"gemms": gemms.forward_backward}
    rows: list[KernelRow] = []
    for impl, (mlp, note) in implementations(shape, device, designs).items():
        if mlp is None or impl == "eager":  # eager (fp32 maths) is nobody's choice at these shapes
            if mlp is None:
                rows.append(KernelRow(shape.name, impl, "(all)", note=note))
            continue
        runnable[impl] = steps(mlp, x, dy)[1]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for impl, step in runnable.items():

        def profiled(step: Callable[[], None] = step) -> list:
            for _ in range(warmup):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(steps_profiled):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
            kernels = [
                e for e in prof.key_averages()
                if (e.device_type == torch.autograd.DeviceType.CUDA if device == "cuda" else e.key.startswith("aten::"))
            ]  # fmt: skip
            return sorted(kernels, key=lambda e: -_event_us(e, device))

        kernels, error = attempt(f"profiling {impl} on {shape.name}", profiled)
        if kernels is None:
            rows.append(KernelRow(shape.name, impl, "(all)", note=error))
            continue
        total_us = sum(_event_us(e, device) for e in kernels) / steps_profiled
        total_calls = sum(e.count for e in kernels) / steps_profiled
        rows.append(KernelRow(shape.name, impl, "(all)", total_calls, total_us))
        for e in kernels[:PROFILE_TOP]:
            per_step = e.count / steps_profiled, _event_us(e, device) / steps_profiled
            rows.append(KernelRow(shape.name, impl, e.key[:90], *per_step))
    return rows


def profile_markdown(rows: list[KernelRow]) -> str:
    lines = ["| shape | impl | kernel | launches/step | µs/step | share |", "|---|---|---|---|---|---|"]
    totals = {(r.shape, r.impl): r.us for r in rows if r.kernel == "(all)"}
    for r in rows:
        if r.us is None:
            lines.append(f"| {r.shape} | {r.impl} | {r.kernel} | n/a | n/a | {r.note} |")
            continue
        total = totals.get((r.shape, r.impl))
        share = f"{r.us / total:.0%}" if total else "n/a"
        name = f"**{r.kernel}**" if r.kernel == "(all)" else r.kernel.replace("|", "/")
        lines.append(f"| {r.shape} | {r.impl} | {name} | {r.calls:g} | {r.us:.1f} | {share} |")
    return "\n".join(lines)


# --- Report -------------------------------------------------------------------------------------------

COLUMNS = [
    ("shape", "shape", "{}"),
    ("impl", "impl", "{}"),
    ("fwd_ms", "fwd ms", "{:.3f}"),
    ("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"),
    ("speedup", "fwd+bwd speed-up vs eager", "{:.3f}x"),
    ("x_gemms", "fwd+bwd / GEMMs", "{:.3f}"),
    ("spread", "fwd+bwd spread", "{:.1%}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("saved_mib", "saved for bwd MiB", "{:.1f}"),
    ("max_rel_err", "max rel err vs eager", "{:.1e}"),
    ("note", "note", "{}"),
]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        values = [getattr(r, key) for key, _, _ in COLUMNS]
        cells = ["n/a" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(values, COLUMNS, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    env.update(torch=torch.__version__, python=platform.python_version())
    if glu_triton.TRITON_AVAILABLE:
        import triton

        env["triton"] = triton.__version__
    return env


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--rows", type=Path, help="JSON lines, one per row as measured (default: next to --json, .rows.jsonl)"
    )
    parser.add_argument(
        "--shapes", nargs="+", choices=[*SHAPES, *SHAPE_GROUPS], default=list(SHAPES), help="shapes or groups"
    )
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration of the kernels")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeat", type=int, default=1, help="interleaved rounds of timing every implementation (spread column)"
    )
    parser.add_argument(
        "--inference-tokens", type=int, nargs="*", default=INFERENCE_TOKENS,
        help="token counts of the inference_mode forward table (none: skip it)",
    )  # fmt: skip
    parser.add_argument("--inference-only", action="store_true", help="skip the forward+backward table")
    parser.add_argument(
        "--designs", nargs="*", choices=CANDIDATE_DESIGNS, default=CANDIDATE_DESIGNS,
        help="candidate designs of the fused op timed beside the default (rows fused[<design>]; none: default only)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=int, nargs="?", const=5, default=0, metavar="STEPS",
        help="instead of the timing tables: torch.profiler per-kernel times over STEPS fwd+bwd steps (default 5)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        shapes, iters, warmup = list(SMOKE_SHAPES), 2, 1
        sizes = SMOKE_INFERENCE_TOKENS if args.inference_tokens else []
    else:
        names = dict.fromkeys(n for name in args.shapes for n in SHAPE_GROUPS.get(name, [name]))
        shapes, iters, warmup, sizes = [SHAPES[n] for n in names], args.iters, args.warmup, args.inference_tokens
    repeat = args.repeat if device == "cuda" else 2  # two rounds on CPU, so the smoke run covers interleaving
    trained = [] if args.inference_only or args.profile else shapes
    sizes = [] if args.profile else sizes
    designs = args.designs
    log = RowLog(args.rows or (args.json.with_suffix(".rows.jsonl") if args.json else None))
    rows: list[Row] = []
    kernels: list[dict] = []
    inference: list[InferenceRow] = []
    # Shape by shape, each row logged as soon as its shape is measured; a shape that fails as a whole (out
    # of memory for the GEMMs alone, say) leaves one error row and the next shape runs.
    for shape in trained:
        measured, error = attempt(
            f"shape {shape.name}", lambda shape=shape: measure(shape, device, iters, warmup, repeat, designs)
        )
        for row in measured or [Row(shape.name, "all", note=error)]:
            rows.append(row)
            log.write("mlp", row)
    for shape in trained if device == "cuda" else []:
        measured, error = attempt(f"kernels of {shape.name}", lambda shape=shape: kernel_rows(shape, iters, args.sweep))
        for row in measured or [dict(shape=shape.name, block_elements=None, num_warps=None, default=True, error=error)]:
            kernels.append(row)
            log.write("kernels", row)
    for shape in shapes if sizes else []:
        measured, error = attempt(
            f"inference on {shape.name}", lambda shape=shape: measure_inference(shape, device, sizes, iters, repeat)
        )
        for row in measured or [InferenceRow(shape.name, 0, "all", note=error)]:
            inference.append(row)
            log.write("inference", row)
    profiled: list[KernelRow] = []
    profile_steps = args.profile if device == "cuda" else 1
    for shape in shapes if args.profile else []:
        measured, error = attempt(
            f"profile of {shape.name}",
            lambda shape=shape: profile_kernels(shape, device, profile_steps, warmup, designs),
        )
        for row in measured or [KernelRow(shape.name, "all", "(all)", note=error)]:
            profiled.append(row)
            log.write("profile", row)
    choices = [c for s in shapes if (c := design_choice(s, rows)) is not None]
    env = environment(device)
    print(f"GLU MLP benchmark on {env['device']} (torch {env['torch']}, triton {env.get('triton')})\n")
    if rows:
        print(markdown(rows), end="\n\n")
    if choices:
        print("Fused designs (glu_triton.MLP_DESIGNS), fastest per shape:\n")
        print(design_markdown(choices), end="\n\n")
    if kernels:
        print(kernels_markdown(kernels), end="\n\n")
    if profiled:
        print("Per-kernel device time of one forward+backward step (torch.profiler):\n")
        print(profile_markdown(profiled), end="\n\n")
    if inference:
        print("Forward under torch.inference_mode:\n")
        print(inference_markdown(inference), end="\n\n")
    print(goals_markdown(shapes, rows, inference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "shapes": [asdict(s) | {"dtype": str(s.dtype)} for s in shapes]}
        payload["results"] = [asdict(r) for r in rows]
        payload["kernels"] = kernels
        payload["design_choice"] = choices
        payload["profile"] = [asdict(r) for r in profiled]
        payload["inference"] = [asdict(r) for r in inference]
        payload["inference_eager_below_tokens"] = glu_triton.INFERENCE_EAGER_BELOW_TOKENS
        payload["inference_crossover"] = {
            s.name: crossover([r for r in inference if r.shape == s.name]) for s in shapes
        }
        payload["goals"] = {
            s.name: [dict(zip(("goal", "measured", "met"), g, strict=True)) for g in all_goals(s, rows, inference)]
            for s in shapes
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
