"""Whole training steps and generation: GluForCausalLM with the fused MLP vs eager, beside a dense GPT-2.

    python benchmarks/bench_train.py [--json results.json] [--steps 10] [--batch 8] [--repeat 3]
    python benchmarks/bench_train.py --smoke        # tiny model on CPU, a few seconds (what CI runs)

On CUDA: a GPT-2-medium-shaped ``GluForCausalLM`` (24 layers, 1024 wide, 16 heads, 4096-wide geglu_tanh
MLP with biases, vocabulary 50257; random weights), sequences of 1024 tokens, bf16 autocast over fp32
weights, sdpa attention, AdamW, as a Trainer run with ``bf16=True`` would train it. Training steps with
``glu_kernel="auto"`` (the fused MLP) and ``"eager"`` alternate on the same model and optimiser in
``--repeat`` interleaved rounds; ``GPT2LMHeadModel`` of the same shape (its dense 4096-wide MLP) runs after.
Per model: tokens/s of a training step (median over rounds) and peak memory allocated (weights, gradients
and optimiser states included). Then greedy ``generate`` in bf16 at batch 1 and 16: new tokens/s (the
prompt's prefill included). Prints markdown tables and the issue's goals as met / missed; ``--json``
writes strict JSON.

``--smoke`` (the default without CUDA) runs a 2-layer, 64-wide model in fp32 for a couple of steps; there
``auto`` would pick eager (CPU tensors), so the fused row forces ``glu_kernel="triton"`` through Triton's
interpreter. Its timings mean nothing: it checks that every path still runs.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the smoke run on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_mlp import RowLog, attempt, environment  # noqa: E402  (benchmarks/ is on sys.path: the script's own folder)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from hf_glu import GluConfig, GluForCausalLM, glu_triton  # noqa: E402
from hf_glu.bad_input import OneLineParser  # noqa: E402
from hf_glu.jsonio import write_json  # noqa: E402


@dataclass(frozen=True)
class Setup:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq: int
    batch: int
    dtype: torch.dtype  # autocast dtype of training, weight dtype of generation
    steps: int  # timed steps per round and kernel
    warmup: int
    prompt: int  # generation: prompt tokens and new tokens
    new_tokens: int
    gen_batches: tuple[int, ...]
    variant: str = "geglu_tanh"  # what a converted GPT-2 runs (exact from gelu_new)


GPT2_MEDIUM = Setup("gpt2-medium", 24, 1024, 16, 50257, 1024, 8, torch.bfloat16, 10, 3, 128, 128, (1, 16))
SMOKE = Setup("smoke-cpu", 2, 64, 2, 256, 32, 2, torch.float32, 2, 1, 4, 4, (1, 2))


@dataclass
class TrainRow:
    model: str
    kernel: str | None  # None: a model without the GLU switch
    params_m: float
    tokens_per_s: float | None = None
    step_ms: float | None = None
    spread: float | None = None  # range of step times over rounds / median
    peak_mib: float | None = None
    loss: float | None = None  # the last timed step's: finite, and alike across rows
    note: str = ""


@dataclass
class GenerateRow:
    model: str
    kernel: str | None
    batch: int
    new_tokens_per_s: float | None = None
    note: str = ""


def gpt2_fields(setup: Setup) -> dict:
    """The config fields GPT-2's and our config share: the same shape for the GLU and the dense model."""
    return dict(
        vocab_size=setup.vocab_size,
        n_positions=setup.seq,
        n_embd=setup.n_embd,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        attn_implementation="sdpa",
        bos_token_id=setup.vocab_size - 1,  # GPT-2's end-of-text is its last token
        eos_token_id=setup.vocab_size - 1,
    )


def build(setup: Setup, device: str, glu: bool) -> torch.nn.Module:
    """The GLU model (``glu_variant=setup.variant``, 4 x n_embd wide) or the dense ``GPT2LMHeadModel``."""
    # Initialised where it runs: 0.45B parameters are slow to fill on a CPU.
    with torch.device(device):
        if glu:
            return GluForCausalLM(GluConfig(glu_variant=setup.variant, **gpt2_fields(setup)))
        model = GPT2LMHeadModel(GPT2Config(**gpt2_fields(setup)))
    model.loss_type = "ForCausalLM"  # Transformers derives none from GPT-2's class name, and warns
    return model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model: torch.nn.Module, setup: Setup, device: str) -> Callable[[], float]:
    """One AdamW step on a fixed random batch; returns the loss (read after the step, outside the timing's
    critical path only at the end of a round)."""
    ids = torch.randint(0, setup.vocab_size, (setup.batch, setup.seq), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    autocast = setup.dtype != torch.float32

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=setup.dtype, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], torch.Tensor], steps: int, device: str) -> tuple[float, float, float | None]:
    """(ms per step, last loss, peak MiB allocated during the steps) over ``steps`` timed steps."""
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    ms = (time.perf_counter() - begin) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return ms, float(loss), peak


def measure_training(
    model: torch.nn.Module, name: str, kernels: list[str | None], setup: Setup, device: str, repeat: int
) -> list[TrainRow]:
    """Rows for ``model`` under each kernel in ``kernels`` (``[None]`` for a model without one), timed in
    ``repeat`` interleaved rounds on the same weights and optimiser."""
    step = train_step_fn(model, setup, device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    times: dict[str | None, list[float]] = {k: [] for k in kernels}
    peaks: dict[str | None, list[float]] = {k: [] for k in kernels}
    losses: dict[str | None, float] = {}
    errors: dict[str | None, str] = {}  # a kernel that fails is out of the later rounds; its row keeps the error

    def run(what: str, kernel: str | None, fn: Callable[[], object]) -> object:
        if kernel in errors:
            return None
        set_kernel(model, kernel)
        result, error = attempt(f"{what} of {name} with glu_kernel={kernel}", fn)
        if error:
            errors[kernel] = error
        return result

    for kernel in kernels:  # warm-up: autotuning and allocator growth stay out of the timed rounds
        run("warm-up", kernel, lambda: [step() for _ in range(setup.warmup)])
    for _ in range(repeat):
        for kernel in kernels:
            timed = run("timed steps", kernel, lambda: time_steps(step, setup.steps, device))
            if timed is not None:
                ms, losses[kernel], peak = timed
                times[kernel].append(ms)
                if peak is not None:
                    peaks[kernel].append(peak)
    rows = []
    tokens = setup.batch * setup.seq
    for kernel in kernels:
        if kernel in errors:
            rows.append(TrainRow(name, kernel, params_m, note=errors[kernel]))
            continue
        ms = statistics.median(times[kernel])
        spread = (max(times[kernel]) - min(times[kernel])) / ms if repeat > 1 else None
        peak = max(peaks[kernel]) if peaks[kernel] else None
        rows.append(TrainRow(name, kernel, params_m, tokens / ms * 1e3, ms, spread, peak, losses[kernel]))
    return rows


def set_kernel(model: torch.nn.Module, kernel: str | None) -> None:
    if kernel is not None:
        model.config.glu_kernel = kernel


def generate_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
    # min_new_tokens: a random model's end-of-text must not stop one kernel's run early.
    model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def measure_generation(
    model: torch.nn.Module, name: str, kernels: list[str | None], setup: Setup, device: str
) -> list[GenerateRow]:
    """New tokens/s of greedy generation (prefill included) at each batch size, in the setup's dtype."""
    model.to(setup.dtype).eval()
    rows = []
    for batch in setup.gen_batches:
        prompt = torch.randint(0, setup.vocab_size, (batch, setup.prompt), device=device)
        for kernel in kernels:
            set_kernel(model, kernel)

            def timed(prompt: torch.Tensor = prompt) -> float:
                generate_greedy(model, prompt, 2)  # warm-up
                synchronize(device)
                begin = time.perf_counter()
                generate_greedy(model, prompt, setup.new_tokens)
                synchronize(device)
                return time.perf_counter() - begin

            seconds, error = attempt(f"generation of {name} with glu_kernel={kernel} at batch {batch}", timed)
            speed = None if seconds is None else batch * setup.new_tokens / seconds
            rows.append(GenerateRow(name, kernel, batch, speed, error))
    return rows


def goals(train: list[TrainRow]) -> list[tuple[str, str, bool | None]]:
    """The issue's training-step goals: the fused GLU model >= 1.15x eager tokens/s, with less peak memory."""
    by_kernel = {r.kernel: r for r in train if r.model == "glu"}
    fused = by_kernel.get("auto") or by_kernel.get("triton")
    eager = by_kernel.get("eager")
    if fused is None or eager is None or fused.tokens_per_s is None or eager.tokens_per_s is None:
        return [("training step: fused >= 1.15x eager tokens/s", "not measured", None)]
    ratio = fused.tokens_per_s / eager.tokens_per_s
    checks = [("training step: fused >= 1.15x eager tokens/s", f"{ratio:.3f}x", ratio >= 1.15)]
    if fused.peak_mib is None or eager.peak_mib is None:
        checks.append(("training step: fused peak memory < eager's", "not measured", None))
    else:
        peak = f"{fused.peak_mib:.0f} vs {eager.peak_mib:.0f} MiB"
        checks.append(("training step: fused peak memory < eager's", peak, fused.peak_mib < eager.peak_mib))
    return checks


def table(rows: list, columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        values = [getattr(r, key) for key, _, _ in columns]
        cells = ["n/a" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(values, columns, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRAIN_COLUMNS = [
    ("model", "model", "{}"),
    ("kernel", "glu_kernel", "{}"),
    ("params_m", "params (M)", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("step_ms", "step ms", "{:.1f}"),
    ("spread", "spread", "{:.1%}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("loss", "loss", "{:.3f}"),
    ("note", "note", "{}"),
]
GENERATE_COLUMNS = [
    ("model", "model", "{}"),
    ("kernel", "glu_kernel", "{}"),
    ("batch", "batch", "{}"),
    ("new_tokens_per_s", "new tokens/s", "{:,.1f}"),
    ("note", "note", "{}"),
]


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--rows", type=Path, help="JSON lines, one per row as measured (default: next to --json, .rows.jsonl)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, a couple of steps (the default on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per round and kernel")
    parser.add_argument("--batch", type=int, help="sequences per training step")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of auto and eager steps")
    parser.add_argument("--threads", type=int, help="torch threads (on a busy CPU, 1 is fastest)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = SMOKE if args.smoke or device == "cpu" else GPT2_MEDIUM
    setup = replace(setup, steps=args.steps or setup.steps, batch=args.batch or setup.batch)
    # On CPU auto is eager by design: the smoke run forces the fused path through the interpreter instead.
    fused_kernel = "auto" if device == "cuda" else "triton"
    kernels: list[str | None] = [fused_kernel, "eager"] if glu_triton.TRITON_AVAILABLE else ["eager"]
    repeat = args.repeat if device == "cuda" else 1

    log = RowLog(args.rows or (args.json.with_suffix(".rows.jsonl") if args.json else None))
    train: list[TrainRow] = []
    generate: list[GenerateRow] = []
    # Model by model; rows logged as soon as measured. A model that fails to build (out of memory, say)
    # leaves an error row, and the other model still runs.
    for name, glu, model_kernels in (("glu", True, kernels), ("gpt2 dense", False, [None])):
        torch.manual_seed(0)
        model, error = attempt(f"building {name}", lambda glu=glu: build(setup, device, glu=glu).train())
        if model is None:
            rows = [TrainRow(name, k, 0.0, note=error) for k in model_kernels]
            train += rows
            for row in rows:
                log.write("train", row)
            continue
        rows = measure_training(model, name, model_kernels, setup, device, repeat)
        for row in rows:
            log.write("train", row)
        train += rows
        rows = measure_generation(model, name, model_kernels, setup, device)
        for row in rows:
            log.write("generate", row)
        generate += rows
        del model
    threshold = glu_triton.INFERENCE_EAGER_BELOW_TOKENS
    for row in generate:
        if row.kernel == "auto" and not row.note:
            row.note = f"decode eager (below {threshold} tokens a call), prefill of {row.batch * setup.prompt} tokens"
    if device == "cpu":
        for row in train + generate:
            row.note = row.note or ("Triton interpreter (CPU smoke)" if row.kernel == "triton" else "CPU smoke")

    env = environment(device) | {"threads": torch.get_num_threads()}
    shape = f"{setup.n_layer} layers, {setup.n_embd} wide, {setup.variant}, seq {setup.seq}, batch {setup.batch}"
    print(f"Training step and generation on {env['device']} (torch {env['torch']}): {setup.name}, {shape}\n")
    print(table(train, TRAIN_COLUMNS), end="\n\n")
    print(table(generate, GENERATE_COLUMNS), end="\n\n")
    checks = goals(train)
    lines = ["| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'n/a' if ok is None else ('yes' if ok else '**no**')} |" for g, m, ok in checks]
    print("\n".join(lines))
    if not all(math.isfinite(r.loss) for r in train if r.loss is not None):
        raise SystemExit("a training step gave a non-finite loss")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "setup": asdict(setup) | {"dtype": str(setup.dtype)}}
        payload["train"] = [asdict(r) for r in train]
        payload["generate"] = [asdict(r) for r in generate]
        payload["goals"] = [dict(zip(("goal", "measured", "met"), g, strict=True)) for g in checks]
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
