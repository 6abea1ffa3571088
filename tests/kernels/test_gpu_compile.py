"""The ahead-of-time compile check (benchmarks/gpu_compile.py): glu_triton's kernels compile for sm_80, sm_90
and sm_100 on this CPU-only machine, and a kernel the interpreter runs but a real compile refuses fails it.

The check needs ``@triton.jit`` to return real JIT functions, so everything that compiles runs in a child
process without ``TRITON_INTERPRET`` (the suite sets it for the interpreter tests).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_glu import glu_triton as gt
from hf_glu.glu import VARIANTS

from helpers import REPO

if not gt.TRITON_AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = REPO / "benchmarks" / "gpu_compile.py"
TARGETS = (80, 90, 100)

# A kernel whose loop-carried accumulator starts as a scalar and becomes a block: the compiler refuses a
# loop variable that changes type, the interpreter (plain Python) does not. (A runtime tl.arange bound, the
# other classic, the triton 3.9 interpreter refuses too.) Written to a file: the child process imports it
# as a real JIT function.
BROKEN_KERNEL = textwrap.dedent(
    """
    import triton
    import triton.language as tl

    @triton.jit
    def scalar_accumulator_kernel(X, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        acc = 0.0
        for i in range(n):
            acc += tl.load(X + i * BLOCK + offsets)
        tl.store(X + offsets, acc)
    """
)


def _child(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs python ``script`` (a path or ``-c`` code) with the worktree importable and no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_sample_compiles_for_every_target_without_spills(tmp_path: Path) -> None:
    # Run as `make test` runs it, with TRITON_INTERPRET=1 inherited: the script must re-run itself without it.
    out = tmp_path / "sample.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sample", "--quiet", "--targets", ",".join(map(str, TARGETS)), "--out", out],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == []
    results = report["results"]
    # Every variant, both kernels, every target, each with a ptxas report and no spill.
    assert {o["variant"] for r in results for o in r["origins"]} == set(VARIANTS)
    assert {(r["kernel"], r["target"]) for r in results} == {
        (k, t) for k in ("_glu_fwd_kernel", "_glu_bwd_kernel") for t in TARGETS
    }
    assert all(r["ok"] and r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in results)
    assert {(r["kernel"], o["dtype"]) for r in results for o in r["origins"]} == {
        (k, d) for k in ("_glu_fwd_kernel", "_glu_bwd_kernel") for d in ("fp32", "bf16", "fp16")
    }
    # The packed MLP designs' backward (with bias sums) on halves and interleaved views of gate|up, at GPT-2 widths.
    packed = {(o["layout"], o["cols"], o["mode"]) for r in results for o in r["origins"] if r["target"] == 90}
    assert {("halves", 3072, "backward_inplace_bias"), ("interleaved", 6400, "backward_inplace_bias")} <= packed


def test_full_scope_covers_every_launch_config() -> None:
    # The full matrix holds every variant x dtype x layout x mode, every block config the launcher picks for
    # any column count, and every row-tile count the bias-sum grid can choose.
    code = textwrap.dedent(
        """
        import json
        import gpu_compile
        from hf_glu import glu_triton as gt
        specs = gpu_compile.enumerate_specializations("full")
        print(json.dumps(dict(
            cross=sorted({(o["variant"], o["dtype"], o["layout"], o["mode"]) for s in specs for o in s.origins}),
            blocks=sorted({(c["BLOCK_M"], c["BLOCK_N"]) for c in (dict(s.constants) for s in specs)}),
            launcher=sorted({gt._launch_config(4096, 2**k)[1:] for k in range(16)}),
            row_tiles=sorted({dict(s.constants)["ROW_TILES"] for s in specs if dict(s.constants).get("BIAS_GRADS")}),
            choices=sorted(getattr(gt, "BIAS_ROW_TILE_CHOICES", {1, gt._BIAS_ROW_TILES})),
        )))
        """
    )
    run = _child("-c", code, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    dtypes = ("fp32", "bf16", "fp16")
    # Packed views reach every mode: the forward and the functional backward (glu_act), the in-place backward
    # with and without bias sums (glu_mlp's packed designs).
    modes = ("forward", "backward", "backward_inplace", "backward_inplace_bias")
    layouts = {layout: modes for layout in ("contiguous", "halves", "interleaved")}
    expected = {(v, d, lay, m) for v in VARIANTS for d in dtypes for lay, modes in layouts.items() for m in modes}
    assert {tuple(c) for c in found["cross"]} == expected
    assert found["blocks"] == found["launcher"]
    assert set(found["choices"]) <= set(found["row_tiles"])  # one row tile up to the cap, and every choice between


def test_specialization_follows_tritons_runtime_rule(tmp_path: Path) -> None:
    # gpu_compile turns a recorded launch into the signature Triton's runtime would compile; compare its
    # rule for ints with the runtime's own (triton 3.9's native specializer) on values around the edges.
    (tmp_path / "two_args.py").write_text("import triton\n\n@triton.jit\ndef k(X, a):\n    pass\n")
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import gpu_compile, torch, two_args
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        ours, theirs = [], []
        for a in (1, 2, 16, 17, 32, 2**31 - 16, 2**31, 2**33 + 1):
            spec = gpu_compile.specialize_launch(two_args.k, (torch.empty(4, device="meta"), a), {{}}, {{}})
            ours.append([dict(spec.signature)["a"], "D" if "a" in spec.divisible else ""])
            kind, attr = native_specialize_impl(BaseBackend, a, False, True, True)
            theirs.append([kind, "" if kind == "constexpr" else attr])
        print(json.dumps([ours, theirs]))
        """
    )
    run = _child("-c", code, timeout=120)
    if "cannot import name 'native_specialize_impl'" in run.stderr:
        pytest.skip("this triton has no native specializer to compare with")
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = json.loads(run.stdout.splitlines()[-1])
    assert ours == theirs


def test_broken_kernel_fails_the_check_though_the_interpreter_runs_it(tmp_path: Path) -> None:
    (tmp_path / "broken_kernels.py").write_text(BROKEN_KERNEL)
    # The interpreter (this process) accepts the runtime bound.
    sys.path.insert(0, str(tmp_path))
    try:
        import broken_kernels

        x = torch.ones(3, 8)
        broken_kernels.scalar_accumulator_kernel[(1,)](x, 3, BLOCK=8)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_kernels", None)
    assert torch.equal(x[0], torch.full((8,), 3.0))
    # The compile check does not.
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import gpu_compile, broken_kernels
        name = "scalar_accumulator_kernel"
        signature = (("X", "*fp32"), ("n", "i32"), ("BLOCK", "constexpr"))
        spec = gpu_compile.Specialization(name, signature, (("BLOCK", 8),), ("X",), 4)
        results = gpu_compile.run_check([spec], [90], {{name: getattr(broken_kernels, name)}})
        print(json.dumps([r.problem() for r in results]))
        """
    )
    run = _child("-c", code, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    (problem,) = json.loads(run.stdout.splitlines()[-1])
    assert problem.startswith("compile failed: scalar_accumulator_kernel[*fp32 BLOCK=8")
    assert "for sm_90" in problem and "acc" in problem


def test_a_spill_or_a_missing_report_fails() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_compile
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # A ptxas -v report as ptxas prints it (the format compile_specialization parses).
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    2464 bytes stack frame, 2572 bytes spill stores, 3212 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 0 barriers, 2464 bytes cumulative stack size, 496 bytes cmem[0]\n"
    )
    report = gpu_compile.parse_ptxas_log(log)
    assert report == dict(stack_bytes=2464, spill_stores=2572, spill_loads=3212, registers=168)
    spilled = gpu_compile.Result("k", "k[*fp32]", 80, True, 0.1, shared_bytes=0, **report)
    assert spilled.problem() == (
        "spills: k[*fp32] for sm_80: 2572 bytes spill stores, 3212 bytes spill loads (168 registers)"
    )
    clean = gpu_compile.Result("k", "k[*fp32]", 80, True, 0.1, registers=40, spill_stores=0, spill_loads=0)
    assert clean.problem() is None
    assert "no ptxas report" in gpu_compile.Result("k", "k[*fp32]", 80, True, 0.1).problem()


def test_recheck_compiles_only_what_spilled_or_failed_under_todays_rules(tmp_path: Path) -> None:
    # A results file as gpu_compile writes it: one launch passed, one spilled (the interleaved fp16 forward
    # did at 4 warps), one has no ptxas report. Only the last two are compiled again, under today's rules.
    def result(ok: bool, spills: int | None, **origin) -> dict:
        base = dict(variant="geglu", dtype="fp16", layout="interleaved", rows=8192, cols=4096, mode="forward")
        return dict(ok=ok, spill_stores=spills, spill_loads=spills, origins=[base | origin])

    before = tmp_path / "before.json"
    results = [result(True, 0, variant="swiglu"), result(True, 12), result(True, None, dtype="bf16")]
    before.write_text(json.dumps(dict(results=results)))
    out = tmp_path / "after.json"
    run = _child(str(SCRIPT), "--only-spilling-from", str(before), "--targets", "90", "--quiet", "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    origins = sorted((o["variant"], o["dtype"]) for r in report["results"] for o in r["origins"])
    assert origins == [("geglu", "bf16"), ("geglu", "fp16")]
    assert all(r["ok"] and r["spill_stores"] == 0 and r["target"] == 90 for r in report["results"])
