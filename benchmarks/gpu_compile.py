"""Ahead-of-time compile check of the fused GLU kernels for real GPU targets, on a machine without a GPU.

    python benchmarks/gpu_compile.py [--targets 80,90,100] [--sample | --full | --only-spilling-from R] [--out O]

The interpreter CI runs (``TRITON_INTERPRET=1``) accepts code a real compile refuses, and says nothing
about registers or spills. This check compiles every kernel specialization of ``hf_glu/glu_triton.py``
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` (the triton wheel ships
ptxas), reads ptxas's register / spill / stack report and Triton's shared-memory figure, writes them per
kernel, and exits 1 naming the kernel, specialization and target of any compile failure or spill.

Which specializations: the launchers of ``glu_triton`` are called on meta tensors (no memory, no
device) over a sweep of shapes, dtypes, variants, layouts (separate tensors, halves and interleaved
columns of a packed tensor) and the modes each layout can reach (forward, functional backward, in-place
backward with and without the bias sums; ``LAYOUT_MODES``), with the kernels replaced by recorders.
Each recorded launch is turned into the signature Triton's runtime would specialize it to (an int equal
to 1 becomes a constant, ints and pointers divisible by 16 get the divisibility attribute), and equal
ones are compiled once. So the matrix is what the launchers can pick, not a copy of their rules: change
a launch rule and the matrix follows. Three scopes (see ``scenarios``): ``--sample``, the minute-long
subset CI runs; ``--full`` (``make gpu-compile``), every variant x dtype x layout x mode at a production
shape and every block config and row-tile count per variant; ``--exhaustive``, the whole sweep.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` return interpreter objects, so when it is set the check
re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = (80, 90, 100)
SUMMARY_COLUMNS = ("kernel", "mode", "layout", "sm", "specs", "failed", "max regs", "spilling", "max spill B",
                   "max stack B", "max smem B")  # fmt: skip


@dataclass(frozen=True)
class Specialization:
    """One kernel compile: the JIT function's name, its Triton signature, constants and attributes."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]  # arguments with Triton's divisibility-by-16 attribute
    num_warps: int
    # The recorded launches (variant, dtype, layout, mode, shape) that compile to it; not part of its identity.
    origins: list[dict] = field(default_factory=list, compare=False, hash=False)

    @property
    def origin(self) -> dict:
        """The first launch recorded for it (empty for one built by hand)."""
        return self.origins[0] if self.origins else {}

    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constants)
        ptrs = "/".join(sorted({t for _, t in self.signature if t.startswith("*")}))
        return f"{self.kernel}[{ptrs} {consts} div16={','.join(self.divisible) or '-'} warps={self.num_warps}]"


@dataclass
class Result:
    kernel: str
    specialization: str
    target: int
    ok: bool
    seconds: float
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None
    origins: list[dict] = field(default_factory=list)

    def problem(self) -> str | None:
        """Why this result fails the check, naming kernel, specialization and target; None if it passes."""
        where = f"{self.specialization} for sm_{self.target}"
        if not self.ok:
            return f"compile failed: {where}: {self.error}"
        if self.spill_stores is None:
            return f"no ptxas report for {where}: registers and spills unknown"
        if self.spill_stores or self.spill_loads:
            return (
                f"spills: {where}: {self.spill_stores} bytes spill stores, {self.spill_loads} bytes spill loads "
                f"({self.registers} registers)"
            )
        return None


# ----------------------------------------------------------------------------------------------------
# Enumeration: what the launchers pick.

# A production shape: 8192 tokens of a 4096-wide intermediate (every intermediate >= 1024 gets the same
# block config). The block-config sweep: every power of two below the largest column block (each is a
# config of its own), one width not divisible by 16, and few rows (the bias-sum grid's smaller row-tile counts).
_PRODUCTION = (8192, 4096)
_BLOCK_SWEEP = (*((8192, 2**k) for k in range(11)), (8192, 1000), *((r, 4096) for r in (1, 16, 1000, 2048, 4096)))
# The exhaustive sweep: every combination of these rows and columns (thousands of compiles; hours).
_EXHAUSTIVE_COLS = (*(2**k for k in range(13)), 3072, 11008, 1000)
_EXHAUSTIVE_ROWS = (1, 3, 16, 64, 256, 1000, 1024, 4096, 8192, 65536)
_LAYOUTS = ("contiguous", "halves", "interleaved")
# Where the launch rules spilled before (results/gpu_compile.md): the worst interleaved forward (geglu fp16,
# 12 B on sm_90 at 4 warps) and the worst narrow bias-summing backward (geglu bf16 at 4 columns, 1.5 KB on
# sm_90 at 4 warps). In the sample so that CI sees those rules regress.
# And the packed designs' bias-summing backward over halves and interleaved views at GPT-2 widths (gpt2-small's
# 3072 and gpt2-xl's 6400), the kernels a GPU run of those candidates launches first.
_SAMPLE_EDGES = [("geglu", "fp16", "interleaved", *_PRODUCTION, ("forward",)),
                 ("geglu", "bf16", "contiguous", 8192, 4, ("backward_inplace_bias",)),
                 ("swiglu", "bf16", "halves", 8192, 3072, ("backward_inplace_bias",)),
                 ("geglu_tanh", "bf16", "interleaved", 8192, 6400, ("backward_inplace_bias",))]  # fmt: skip
SCOPES = ("sample", "full", "exhaustive")


def scenarios(scope: str) -> list[tuple[str, Any, str, int, int, tuple[str, ...]]]:
    """(variant, dtype, layout, rows, columns, modes) to launch for ``scope``.

    Each layout gets the modes of ``LAYOUT_MODES`` (what the ops can launch). ``sample`` (CI, under a
    minute): per variant one dtype and one of the training path's two kernels (the forward, the in-place
    backward with bias sums), rotating so every dtype meets both kernels; contiguous tensors, the
    production shape; and the two launches that spilled worst before (``_SAMPLE_EDGES``). ``full``: every
    variant x dtype x layout x mode at the production shape, plus every block config and row-tile count of
    the sweep for each variant in bf16 with contiguous tensors.
    ``exhaustive``: every combination of the exhaustive rows, columns, variants, dtypes, layouts and modes.
    """
    import torch

    from hf_glu import glu_triton
    from hf_glu.glu import VARIANTS

    variants, dtypes, modes = list(VARIANTS), glu_triton.SUPPORTED_DTYPES, MODES
    if scope == "sample":
        kernels = ("forward", "backward_inplace_bias")
        rotation = [(v, dtypes[i % len(dtypes)], "contiguous", *_PRODUCTION, (kernels[i % 2],))
                    for i, v in enumerate(variants)]  # fmt: skip
        return rotation + [(v, _dtype_from_name(d), *rest) for v, d, *rest in _SAMPLE_EDGES]
    if scope == "full":
        # bf16 (the training dtype) first, then layout by layout: a run cut short has the cases that matter most.
        ordered = sorted(dtypes, key=lambda d: d != torch.bfloat16)
        cross = [(v, d, lay, *_PRODUCTION, LAYOUT_MODES[lay]) for d in ordered for lay in _LAYOUTS for v in variants]
        blocks = [(v, torch.bfloat16, "contiguous", r, c, modes) for v in variants for r, c in _BLOCK_SWEEP]
        return cross + blocks
    if scope == "exhaustive":
        return [(v, d, lay, r, c, LAYOUT_MODES[lay]) for v in variants for d in dtypes for lay in _LAYOUTS
                for c in _EXHAUSTIVE_COLS for r in _EXHAUSTIVE_ROWS]  # fmt: skip
    raise ValueError(f"scope={scope!r} is invalid; expected one of {SCOPES}")


def scenarios_with_problems(path: Path) -> list[tuple[str, Any, str, int, int, tuple[str, ...]]]:
    """The scenarios (one mode each) of every launch that spilled or failed to compile in the results file
    ``path``: a re-check after a launch-rule change, which gives those launches new specializations."""
    report = json.loads(path.read_text())
    found = {}
    for r in report["results"]:
        if r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0:  # it passed
            continue
        for o in r["origins"]:
            scenario = (o["variant"], _dtype_from_name(o["dtype"]), o["layout"], o["rows"], o["cols"], (o["mode"],))
            found.setdefault((o["variant"], o["dtype"], o["layout"], o["rows"], o["cols"], o["mode"]), scenario)
    return list(found.values())


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **constexprs)`` records the call, launches nothing."""

    def __init__(self, fn: Any, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.fn, args, kwargs))

        return launch


def _dtype_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _dtype_from_name(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def specialize_launch(fn: Any, args: Sequence[Any], kwargs: dict, origin: dict) -> Specialization:
    """The specialization Triton's runtime compiles for ``fn[grid](*args, **kwargs)``.

    Mirrors the runtime's rule (checked on triton 3.6 and 3.9): a tensor is a pointer to its dtype,
    divisible by 16 when its byte offset is (CUDA allocations are 256-byte aligned); an int equal to 1 is
    a constant, one divisible by 16 gets the divisibility attribute; floats are fp32.
    """
    import torch

    names = list(fn.arg_names)
    bound = dict(zip(names, args, strict=False))
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, divisible = [], [], []
    for name in names:
        value = bound[name]
        if name in constexpr_names:
            signature.append((name, "constexpr"))
            constants.append((name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((name, "*" + _dtype_name(value.dtype)))
            if value.storage_offset() * value.element_size() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature.append((name, "i1"))
        elif isinstance(value, int):
            if value == 1:
                signature.append((name, "constexpr"))
                constants.append((name, 1))
            else:
                signature.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
                if value % 16 == 0:
                    divisible.append(name)
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        else:
            raise TypeError(f"{fn.__name__} argument {name} is {type(value).__name__}; no Triton type known for it")
    return Specialization(
        fn.__name__, tuple(signature), tuple(constants), tuple(divisible), int(options.get("num_warps", 4)), [origin]
    )


def _views(layout: str, rows: int, cols: int, dtype: Any) -> tuple[Any, Any]:
    import torch

    from hf_glu import glu_triton

    if layout == "contiguous":
        return (torch.empty(rows, cols, dtype=dtype, device="meta") for _ in range(2))
    return glu_triton.split_gate_up(torch.empty(rows, 2 * cols, dtype=dtype, device="meta"), layout)


def launched_kernels() -> list[str]:
    """Names of the JIT kernels in ``glu_triton`` that launchers start (``*_kernel``; the rest are helpers)."""
    from hf_glu import glu_triton

    return sorted(n for n, v in vars(glu_triton).items() if n.endswith("_kernel") and hasattr(v, "arg_names"))


MODES = ("forward", "backward", "backward_inplace", "backward_inplace_bias")
# What a layout can reach: every mode. Views of a packed tensor enter through glu_act (forward, functional
# backward) and through glu_mlp's packed designs (glu_triton.MLP_DESIGNS: one GEMM for gate|up in halves or
# interleaved columns), whose backward writes over the packed views, with or without the bias sums; their
# functional (traced) backward writes views of a new packed tensor laid out alike, the same specialization.
LAYOUT_MODES = {"contiguous": MODES, "halves": MODES, "interleaved": MODES}


def _launch_modes(gate: Any, up: Any, out: Any, variant: str, p: Any) -> list[tuple[str, Callable[[], Any]]]:
    """The launches of each op's kernel: forward, functional backward, in-place backward without and with
    the bias sums (the arguments the ops in glu_triton pass)."""
    import torch

    from hf_glu import glu_triton

    def backward() -> None:
        glu_triton.launch_backward(out, gate, up, torch.empty_like(out), torch.empty_like(out), None, variant, p)

    return [
        ("forward", lambda: glu_triton.launch_forward(gate, up, out, variant, p)),
        ("backward", backward),
        ("backward_inplace", lambda: glu_triton.launch_backward(out, gate, up, gate, up, out, variant, p)),
        ("backward_inplace_bias", lambda: glu_triton.launch_backward(out, gate, up, gate, up, out, variant, p, True)),
    ]


def enumerate_specializations(scope: str | Sequence[tuple] = "sample") -> list[Specialization]:
    """Every distinct specialization the launchers produce for ``scope``'s scenarios (or for the scenarios
    given, as ``scenarios`` returns them), in first-seen order."""
    import torch

    from hf_glu import glu_triton
    from hf_glu.glu import GluParams

    calls: list = []
    kernels = launched_kernels()
    saved = {name: getattr(glu_triton, name) for name in kernels}
    p = GluParams()
    try:
        for name, fn in saved.items():
            setattr(glu_triton, name, _Recorder(fn, calls))
        for variant, dtype, layout, rows, cols, modes in scenarios(scope) if isinstance(scope, str) else scope:
            origin = dict(variant=variant, dtype=_dtype_name(dtype), layout=layout, rows=rows, cols=cols)
            gate, up = _views(layout, rows, cols, dtype)
            out = torch.empty(rows, cols, dtype=dtype, device="meta")
            for mode, launch in _launch_modes(gate, up, out, variant, p):
                if mode in modes:
                    start = len(calls)
                    launch()
                    calls[start:] = [(*call, dict(origin, mode=mode)) for call in calls[start:]]
    finally:
        for name, fn in saved.items():
            setattr(glu_triton, name, fn)
    unique: dict[Specialization, Specialization] = {}
    for fn, args, kwargs, origin in calls:
        spec = specialize_launch(fn, args, kwargs, origin)
        first = unique.setdefault(spec, spec)
        if first is not spec:
            first.origins.extend(spec.origins)
    never = set(kernels) - {s.kernel for s in unique}
    if never and isinstance(scope, str):  # a kernel the sweep never reaches would silently escape the check
        raise RuntimeError(f"kernels {sorted(never)} were never launched by the sweep; extend gpu_compile's modes")
    return list(unique)


# ----------------------------------------------------------------------------------------------------
# Compiling.

_PTXAS_NUMBERS = {
    "stack_bytes": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "registers": r"Used (\d+) registers",
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill stores/loads and stack frame from ``ptxas -v`` output (the last function reported)."""
    found = {}
    for key, pattern in _PTXAS_NUMBERS.items():
        values = re.findall(pattern, log)
        if values:
            found[key] = int(values[-1])
    return found


def _ptxas_report(ptx: str, target: int) -> str:
    # Fallback when the triton in use cannot print its own ptxas log: run the same ptxas on the PTX with -v.
    from triton.backends.nvidia import compiler as nv

    arch = nv.sm_arch_from_capability(target)
    tool = nv.get_ptxas(target) if "arch" in nv.get_ptxas.__code__.co_varnames else nv.get_ptxas()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_compile_{os.getpid()}.ptx"
    path.write_text(ptx)
    try:
        run = subprocess.run(
            [tool.path, "-v", f"--gpu-name={arch}", str(path), "-o", str(path) + ".o"],
            capture_output=True,
            text=True,
        )
        return run.stderr + run.stdout
    finally:
        for p in (path, Path(str(path) + ".o")):
            p.unlink(missing_ok=True)


def compile_specialization(fn: Any, spec: Specialization, target: int) -> Result:
    """Compiles ``fn`` as ``spec`` for ``sm_<target>``; any exception becomes a failed Result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in spec.divisible}
    source = ASTSource(fn, dict(spec.signature), dict(spec.constants), attrs)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=GPUTarget("cuda", target, 32), options={"num_warps": spec.num_warps})
    except Exception as e:  # the check reports every failure, whatever triton raises
        message = f"{type(e).__name__}: {e}".strip().splitlines()
        return Result(spec.kernel, spec.label(), target, False, time.perf_counter() - start,
                      error=" | ".join(message[-6:]), origins=spec.origins)  # fmt: skip
    report = parse_ptxas_log(log.getvalue())
    if "spill_stores" not in report:
        report = parse_ptxas_log(_ptxas_report(kernel.asm["ptx"], target))
    return Result(spec.kernel, spec.label(), target, True, time.perf_counter() - start,
                  shared_bytes=int(kernel.metadata.shared), origins=spec.origins, **report)  # fmt: skip


def _configure_triton() -> None:
    from triton import knobs

    # Compile every time (a cache hit runs no ptxas, so no report) and print ptxas's -v log, which
    # compile_specialization captures. Older knobs lack these: the ptxas fallback then serves.
    with contextlib.suppress(AttributeError):
        knobs.compilation.always_compile = True
    with contextlib.suppress(AttributeError):
        knobs.nvidia.dump_ptxas_log = True
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def run_check(
    specs: Sequence[Specialization],
    targets: Sequence[int],
    functions: dict[str, Any],
    progress: Callable[[str, list[Result]], None] = lambda line, results: None,
) -> list[Result]:
    """Compiles each specialization for each target; ``functions`` maps kernel names to JIT functions.

    Specialization by specialization (all targets of one before the next), calling ``progress`` with a line
    and the results so far after each: a run cut short has every target for what it reached.
    """
    _configure_triton()
    results: list[Result] = []
    for spec in specs:
        for target in targets:
            result = compile_specialization(functions[spec.kernel], spec, target)
            results.append(result)
            progress(result.problem() or f"ok sm_{target} {spec.label()} regs={result.registers}", results)
    return results


def summary(results: Sequence[Result]) -> list[dict]:
    """Per kernel, mode and target: specialization count, worst registers, spills, stack and shared memory."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        first = r.origins[0] if r.origins else {}
        groups.setdefault((r.kernel, first.get("mode", "-"), first.get("layout", "-"), r.target), []).append(r)
    rows = []
    for (kernel, mode, layout, target), rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok]
        rows.append(dict(
            kernel=kernel, mode=mode, layout=layout, target=target, specializations=len(rs), failed=len(rs) - len(ok),
            max_registers=max((r.registers or 0 for r in ok), default=None),
            spilling=sum(1 for r in ok if r.spill_stores or r.spill_loads),
            max_spill_stores=max((r.spill_stores or 0 for r in ok), default=None),
            max_stack_bytes=max((r.stack_bytes or 0 for r in ok), default=None),
            max_shared_bytes=max((r.shared_bytes or 0 for r in ok), default=None),
        ))  # fmt: skip
    return rows


def _environment() -> dict:
    import triton

    return dict(triton=triton.__version__, python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip


def _parse_targets(text: str) -> list[int]:
    try:
        targets = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--targets {text!r} is invalid; expected compute capabilities like 80,90,100") from None
    if not targets or any(t < 70 for t in targets):
        raise ValueError(f"--targets {text!r} is invalid; expected compute capabilities >= 70 like 80,90,100")
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from hf_glu.bad_input import OneLineParser  # hf_glu is imported only once the path holds it

    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)), help="e.g. 80,90,100")
    scope = parser.add_mutually_exclusive_group()
    for name in SCOPES:
        scope.add_argument(f"--{name}", dest="scope", action="store_const", const=name, help=f"scope {name}")
    parser.set_defaults(scope="sample")
    scope.add_argument("--only-spilling-from", type=Path, metavar="RESULTS_JSON",
                        help="instead of a scope: only the launches that spilled or failed in this results file, "
                        "under today's launch rules, for every target given")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON results file (per kernel and target, and a summary)")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    args = parser.parse_args(argv)
    try:
        targets = _parse_targets(args.targets)
    except ValueError as e:
        parser.error(str(e))

    if os.environ.get("TRITON_INTERPRET") == "1":  # @triton.jit would give interpreter objects: re-run without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env=env).returncode

    from hf_glu import glu_triton
    from hf_glu.jsonio import write_json

    if not glu_triton.TRITON_AVAILABLE:
        print("triton is not importable; install it with `pip install 'hf-glu[gpu]'`", file=sys.stderr)
        return 1
    start = time.perf_counter()
    if args.only_spilling_from:
        args.scope = f"only-spilling-from {args.only_spilling_from}"
        specs = enumerate_specializations(scenarios_with_problems(args.only_spilling_from))
    else:
        specs = enumerate_specializations(args.scope)
    print(f"{len(specs)} specializations x {len(targets)} targets ({args.scope})", flush=True)
    functions = {name: getattr(glu_triton, name) for name in launched_kernels()}

    def write(results: list[Result], complete: bool) -> None:
        if args.out:
            report = dict(environment=_environment(), scope=args.scope, targets=targets, complete=complete,
                          planned=len(specs) * len(targets), seconds=round(time.perf_counter() - start, 1),
                          problems=[p for r in results if (p := r.problem())], summary=summary(results),
                          results=[asdict(r) for r in results])  # fmt: skip
            write_json(args.out, report, indent=1)  # indent 1: thousands of results, a smaller file

    def progress(line: str, results: list[Result]) -> None:
        if not args.quiet:
            print(line, flush=True)
        if len(results) % len(targets) == 0:  # the file follows the run: a run cut short keeps what it measured
            write(results, complete=False)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    results = run_check(specs, targets, functions, progress)
    write(results, complete=True)
    problems = [p for r in results if (p := r.problem())]
    print("\n| " + " | ".join(SUMMARY_COLUMNS) + " |\n|" + "---|" * len(SUMMARY_COLUMNS))
    for row in summary(results):
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s; {len(problems)} problems")
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
