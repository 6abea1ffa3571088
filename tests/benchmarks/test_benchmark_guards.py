"""benchmarks/bench_mlp.py and bench_train.py survive their own failures: a failing implementation or kernel
costs its row only, a failing shape leaves an error row and the run goes on, and every row reaches the rows
file as soon as it is measured (a GPU step cut short by its time limit keeps them). CPU, stand-ins, tiny
shapes: seconds."""

import json
import re
import sys

import pytest
import torch

from helpers import REPO, load_benchmark


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("bench_mlp")
    yield module
    sys.modules.pop(module.__name__, None)


class FailsAfter(torch.nn.Module):
    """An MLP stand-in that works for ``calls`` calls, then raises: a launch failing mid-run."""

    def __init__(self, inner: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("stand-in launch failure")
        return self.inner(x)


TINY = dict(name="tiny", hidden=8, inner=16, tokens=4, bias=True, variant="swiglu", dtype=torch.float32)


def test_a_failing_implementation_costs_its_row_only(bench, monkeypatch) -> None:
    shape = bench.Shape(**TINY)
    eager = bench.build_mlp(shape, "eager", "cpu")
    # With one warm-up step profile_impl calls an implementation 4 times (forward, forward+backward, the
    # saved-tensor count, the output): "late" gets through it and fails in the timing rounds.
    impls = {
        "eager": (eager, ""),
        "at once": (FailsAfter(bench.build_mlp(shape, "eager", "cpu"), 0), ""),
        "late": (FailsAfter(bench.build_mlp(shape, "eager", "cpu"), 4), ""),
        "unbuilt": (None, "not installed"),
    }
    monkeypatch.setattr(bench, "implementations", lambda shape, device, designs=(): impls)
    rows = {r.impl: r for r in bench.measure(shape, "cpu", iters=1, warmup=1, repeat=2)}
    assert rows.keys() == {"gemms", "eager", "at once", "late", "unbuilt"}
    assert rows["eager"].fwd_bwd_ms > 0 and rows["gemms"].fwd_bwd_ms > 0 and rows["eager"].speedup == 1.0
    assert rows["at once"].note == "failed: RuntimeError: stand-in launch failure"
    assert rows["at once"].fwd_bwd_ms is None and rows["at once"].saved_mib is None
    # Failed while timed: its memory figures stay, its timings do not, the error is its note.
    assert rows["late"].note == "failed: RuntimeError: stand-in launch failure"
    assert rows["late"].saved_mib is not None and rows["late"].fwd_bwd_ms is None
    assert rows["unbuilt"].note == "not installed"


def test_a_failing_builder_is_recorded(bench, monkeypatch) -> None:
    def broken(shape, eager):
        raise ValueError("no such activation")

    monkeypatch.setattr(bench, "transformers_mlp", broken)
    impls = bench.implementations(bench.Shape(**TINY), "cpu")
    assert impls["transformers LlamaMLP"] == (None, "failed: ValueError: no such activation")
    assert impls["eager"][0] is not None and impls["torch.compile"][0] is not None  # built from eager instead


def test_rows_reach_the_file_as_measured_and_a_failing_shape_does_not_stop_the_run(bench, monkeypatch, tmp_path):
    shapes_seen, rows_file = [], tmp_path / "bench.rows.jsonl"

    def measure(shape, device, iters, warmup, repeat, designs=()):
        # The rows file already holds the earlier shapes' rows while the next one is measured.
        shapes_seen.append((shape.name, [json.loads(line)["shape"] for line in rows_file.read_text().splitlines()]))
        if shape.name == "second":
            raise torch.OutOfMemoryError("stand-in out of memory")
        return [bench.Row(shape.name, "eager", fwd_ms=1.0, fwd_bwd_ms=2.0)]

    shapes = [bench.Shape(**dict(TINY, name=n)) for n in ("first", "second", "third")]
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "SMOKE_SHAPES", shapes)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # the CPU run's shape list, on any box
    out = tmp_path / "bench.json"
    bench.main(["--json", str(out), "--inference-tokens"])
    assert shapes_seen == [("first", []), ("second", ["first"]), ("third", ["first", "second"])]
    logged = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["shape"], r["impl"]) for r in logged] == [("first", "eager"), ("second", "all"), ("third", "eager")]
    assert logged[1]["note"] == "failed: OutOfMemoryError: stand-in out of memory"
    assert [r["impl"] for r in json.loads(out.read_text())["results"]] == ["eager", "all", "eager"]


def test_a_failing_kernel_costs_its_training_row_only(bench, monkeypatch) -> None:
    train = load_benchmark("bench_train")  # it imports bench_mlp from its own folder
    real_step_fn = train.train_step_fn

    def step_fn(model, setup, device):
        step = real_step_fn(model, setup, device)

        def guarded_step():
            if model.config.glu_kernel == "triton":
                raise RuntimeError("stand-in compile failure")
            return step()

        return guarded_step

    monkeypatch.setattr(train, "train_step_fn", step_fn)
    setup = train.replace(train.SMOKE, steps=1, warmup=1)
    model = train.build(setup, "cpu", glu=True).train()
    try:
        rows = {r.kernel: r for r in train.measure_training(model, "glu", ["triton", "eager"], setup, "cpu", 2)}
    finally:
        sys.modules.pop(train.__name__, None)
    assert rows["triton"].note == "failed: RuntimeError: stand-in compile failure"
    assert rows["triton"].tokens_per_s is None
    assert rows["eager"].tokens_per_s > 0 and rows["eager"].note == ""


def test_the_profile_lists_each_implementations_kernels_and_times_nothing(bench, monkeypatch, tmp_path) -> None:
    # The GPU check's profile step: per implementation (each fused design, the peers, the GEMMs) its total per
    # step and its largest kernels (on CPU, aten ops' self times); no timing table runs.
    monkeypatch.setattr(bench, "SMOKE_SHAPES", [bench.Shape(**TINY)])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "profile.json"
    bench.main(["--profile", "--designs", "packed", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["results"] == [] and report["inference"] == []
    totals = {r["impl"]: r for r in report["profile"] if r["kernel"] == "(all)"}
    assert totals.keys() == {"gemms", "transformers LlamaMLP", "torch.compile", "liger", "liger LigerMLP",
                             "fused", "fused[packed]"}  # fmt: skip
    for impl in ("gemms", "transformers LlamaMLP", "torch.compile", "fused", "fused[packed]"):
        kernels = [r for r in report["profile"] if r["impl"] == impl and r["kernel"] != "(all)"]
        assert totals[impl]["us"] > 0 and totals[impl]["calls"] >= 1
        assert 1 <= len(kernels) <= bench.PROFILE_TOP and sum(r["us"] for r in kernels) <= totals[impl]["us"] * 1.001
    assert totals["liger"]["note"] == "needs CUDA" and totals["liger"]["us"] is None
    # The packed design's one gate|up GEMM: fewer GEMM calls a step than the default design's.
    gemms = ("aten::mm", "aten::addmm")
    gemm_calls = {
        impl: sum(r["calls"] for r in report["profile"] if r["impl"] == impl and r["kernel"] in gemms)
        for impl in ("fused", "fused[packed]")
    }
    assert gemm_calls["fused[packed]"] < gemm_calls["fused"]


def test_the_design_choice_needs_a_margin_beyond_the_spread(bench) -> None:
    shape = bench.Shape(**TINY)

    def rows(packed_ms: float) -> list:
        return [bench.Row("tiny", "fused", fwd_bwd_ms=1.0, spread=0.02, x_gemms=1.5),
                bench.Row("tiny", "fused[packed]", fwd_bwd_ms=packed_ms, spread=0.03),
                bench.Row("tiny", "fused[packed_interleaved]", note="failed: stand-in"),
                bench.Row("tiny", "transformers LlamaMLP", fwd_bwd_ms=0.5)]  # fmt: skip

    won = bench.design_choice(shape, rows(0.9))
    assert won["fastest"] == "fused[packed]" and won["choose"] == "fused[packed]" and won["beyond_noise"]
    assert abs(won["margin"] - 1 / 0.9 + 1) < 1e-12 and won["noise"] == 0.03
    within = bench.design_choice(shape, rows(0.99))  # 1% faster, 3% spread: not a decision
    assert within["fastest"] == "fused[packed]" and within["choose"] == "fused" and not within["beyond_noise"]
    assert bench.design_choice(shape, rows(1.2))["choose"] == "fused"
    assert bench.design_choice(shape, rows(0.9)[:1]) is None  # one design timed: nothing to choose
    # A fused candidate is never counted as the peer to beat.
    goal = {g: m for g, m, _ in bench.goals(shape, rows(0.2))}["fwd+bwd >= 1.00x the fastest peer"]
    assert goal.endswith("transformers LlamaMLP")


def test_gpu_check_budget_fits_one_device_call() -> None:
    # The step limits gpu_check.sh enforces: under 8 minutes in all (one 10-minute device call, with time to
    # start and to bring results back), and the test step above the last measured run (93 s on an H100).
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    (line,) = [line for line in script.splitlines() if line.startswith("declare -A STEP_SECONDS=")]
    steps = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", line)}
    assert steps.keys() == {"setup", "llama", "geglu", "swiglu", "profile", "train", "tests"}
    assert sum(steps.values()) < 8 * 60 and steps["tests"] > 93
    # Every step the script runs takes its limit from that table.
    assert set(re.findall(r"^bench (\w+) ", script, re.MULTILINE)) | {"setup", "tests"} == steps.keys()
    assert "time budget $total s" in script and str(sum(steps.values())) in script.splitlines()[3]
    # What a GPU run of benchmarks/gpu_check.sh decides from: every fused design at every GPT-2 shape, and the
    # profile at gpt2-small and gpt2-medium for both variants.
    commands = {m[0]: m[1] for m in re.findall(r"^bench (\w+) ((?:.*\\\n)*.*)$", script, re.MULTILINE)}
    assert "--designs" not in commands["geglu"] + commands["swiglu"]
    profiled = [f"gpt2-{size}-{variant}" for size in ("small", "medium") for variant in ("geglu_tanh", "swiglu")]
    assert "--profile" in commands["profile"] and all(shape in commands["profile"] for shape in profiled)


@pytest.mark.parametrize("script", ["bench_eval_memory", "bench_streaming_data"])
def test_the_data_benchmarks_refuse_a_thread_count_below_one_in_one_line(script, monkeypatch, capsys) -> None:
    module = load_benchmark(script)  # bench_eval_memory imports bench_streaming_data
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--threads", "0"])
    with pytest.raises(SystemExit) as exited:  # by the parser, before any work
        module.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.strip().endswith("--threads=0 is invalid; expected an integer >= 1"), err
