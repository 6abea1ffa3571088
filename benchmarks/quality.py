"""Quality benchmark: what converting a GPT-2 MLP to GLU costs and buys, and how the MLPs compare from scratch.

1. Conversion study. A GPT-2 (gelu_new MLP) is pretrained on the built-in corpus (or ``--text-file``).
   Every GLU variant is converted from it with every init scheme (``preserve``, ``random``); at step 0
   we record max |Δlogit| and held-out perplexity against the base. Each converted model is then
   fine-tuned for the same token budget as the base trained on (same batches, per seed), with and
   without distillation from the base (distillation on the ``preserve`` init only, to fit the budget).
   The base distilled from its own pretrained copy is the control for the distilled arms: it shows
   how much of their gain is distillation rather than the GLU.
2. From-scratch ablation. The same small decoder with a dense MLP (ReLU, GELU, Swish: transformers'
   GPT2LMHeadModel) or a GLU MLP (GLU, Bilinear, ReGLU, GEGLU, SwiGLU: GluForCausalLM with 2/3 of the
   dense width, so the parameter counts match), same batches, held-out log-perplexity beside
   Shazeer (2020), Table 1.

Every arm of one seed sees the same batches in the same order; seeds change the order (and random
inits). Writes ``quality.json`` (every number), ``quality.md`` (the tables) and ``quality.png`` into
``--out`` (default ``benchmarks/results`` for a full run; a ``--quick`` smoke run goes to the git-ignored
``bench_results/quality-quick`` so it never overwrites the recorded results):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py            # full, ~20 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --quick    # CI: tiny model, 1 seed
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --device cuda        # a larger model on a GPU
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from hf_glu import VARIANTS, GluConfig, GluForCausalLM, convert_checkpoint
from hf_glu.bad_input import OneLineParser, PositiveInt
from hf_glu.convert.perplexity import perplexity
from hf_glu.data import builtin_corpus, pack_token_blocks, read_text, split_train_eval, train_bpe_tokenizer
from hf_glu.demo import RunSettings
from hf_glu.finetune import distillation_loss
from hf_glu.jsonio import write_json

INIT_SCHEMES = ("preserve", "random")
DISTILLED_INITS = ("preserve",)  # distillation arms; the random init's would add 7 runs per seed
BASE_ACTIVATION = "gelu_new"  # GPT-2's: geglu_tanh's preserve scheme is then exact
EXACT_LOGIT_GOAL = 1e-4
APPROX_PPL_GOAL = 1.01

# (name, dense activation or GLU variant, is GLU): Shazeer 2020's Table 1 rows, in its order.
ABLATION_ARMS = (
    ("ReLU", "relu", False),
    ("GELU", "gelu", False),
    ("Swish", "silu", False),
    ("GLU", "glu", True),
    ("Bilinear", "bilinear", True),
    ("ReGLU", "reglu", True),
    ("GEGLU", "geglu", True),
    ("SwiGLU", "swiglu", True),
)
# Shazeer 2020, Table 1: T5-base on C4, held-out log-perplexity after 65,536 steps.
SHAZEER_65K = {
    "ReLU": 1.997, "GELU": 1.983, "Swish": 1.994, "GLU": 1.982,
    "Bilinear": 1.960, "ReGLU": 1.953, "GEGLU": 1.942, "SwiGLU": 1.944,
}  # fmt: skip


@dataclass(frozen=True)
class Settings(RunSettings):
    """The demo's sizes and budgets (:class:`hf_glu.demo.RunSettings`), with the seeds, the from-scratch arm's
    budget and the distillation loss's weights this benchmark adds."""

    seeds: tuple[int, ...]
    scratch_steps: int
    scratch_lr: float
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0

    @property
    def glu_inner(self) -> int:
        """2/3 of the dense 4·n_embd: a GLU MLP has three matrices to the dense MLP's two."""
        return round(8 * self.n_embd / 3)


# n_embd 96 makes the GLU width exactly 2/3 of the dense one (384 → 256).
FULL = Settings(
    corpus_chars=None, vocab_size=2048, block_size=64, n_embd=96, n_layer=2, n_head=3, batch_size=16,
    seeds=(0, 1, 2), pretrain_steps=500, pretrain_lr=3e-3, finetune_steps=80, finetune_lr=1e-3,
    scratch_steps=320, scratch_lr=3e-3, eval_tokens=8192,
)  # fmt: skip
QUICK = Settings(
    corpus_chars=60_000, vocab_size=384, block_size=32, n_embd=24, n_layer=1, n_head=2, batch_size=8,
    seeds=(0,), pretrain_steps=30, pretrain_lr=3e-3, finetune_steps=4, finetune_lr=1e-3,
    scratch_steps=6, scratch_lr=3e-3, eval_tokens=512,
)  # fmt: skip
GPU_FULL = Settings(
    corpus_chars=None, vocab_size=4096, block_size=128, n_embd=384, n_layer=6, n_head=6, batch_size=32,
    seeds=(0, 1, 2), pretrain_steps=3000, pretrain_lr=1e-3, finetune_steps=600, finetune_lr=5e-4,
    scratch_steps=3000, scratch_lr=1e-3, eval_tokens=16384,
)  # fmt: skip


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # [n_blocks, block_size]
    eval_ids: torch.Tensor  # [1, eval_tokens]: the held-out text every perplexity scores
    eval_text: str


# --- data -------------------------------------------------------------------------------------------


def prepare_data(settings: Settings, text_file: str | None) -> Data:
    """Split the text, train the tokenizer on the training part only, pack training blocks."""
    text = read_text(text_file) if text_file is not None else builtin_corpus(settings.corpus_chars)
    train_text, eval_text = split_train_eval(text, 0.1)
    tokenizer = train_bpe_tokenizer(train_text, settings.vocab_size)
    eval_ids = tokenizer(eval_text, return_tensors="pt", add_special_tokens=False).input_ids[:, : settings.eval_tokens]
    if eval_ids.shape[-1] < 2 * settings.block_size:
        raise ValueError(
            f"the held-out tenth of the text makes {eval_ids.shape[-1]} tokens; expected at least "
            f"{2 * settings.block_size}: pass a longer --text-file"
        )
    paragraphs = [p for p in train_text.split("\n\n") if p.strip()]
    blocks = torch.tensor(pack_token_blocks(paragraphs, tokenizer, settings.block_size), dtype=torch.long)
    return Data(tokenizer=tokenizer, train_blocks=blocks, eval_ids=eval_ids, eval_text=eval_text)


def batch_schedule(n_blocks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``[steps, batch_size]`` block indices: shuffled epochs, so every block is seen once per epoch."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = [torch.randperm(n_blocks, generator=generator) for _ in range(math.ceil(needed / n_blocks))]
    return torch.cat(epochs)[:needed].view(steps, batch_size)


# --- models -----------------------------------------------------------------------------------------


def _architecture(settings: Settings, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The fields the dense and GLU decoders share; dropout off so runs differ only by the MLP and seed."""
    eot = tokenizer.eos_token_id
    return {
        "vocab_size": len(tokenizer),
        "n_positions": settings.block_size,
        "n_embd": settings.n_embd,
        "n_layer": settings.n_layer,
        "n_head": settings.n_head,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }


def dense_model(settings: Settings, tokenizer: PreTrainedTokenizerBase, activation: str, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = GPT2Config(**_architecture(settings, tokenizer), activation_function=activation)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT-2 names no loss type; this is the one it falls back to, unwarned
    return model


def glu_model(settings: Settings, tokenizer: PreTrainedTokenizerBase, variant: str, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = GluConfig(**_architecture(settings, tokenizer), n_inner=settings.glu_inner, glu_variant=variant)
    return GluForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- training and evaluation ------------------------------------------------------------------------


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup over the first 10% of steps, then cosine down to 10% of the peak."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def train(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    schedule: torch.Tensor,
    lr: float,
    teacher: PreTrainedModel | None = None,
    settings: Settings | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train in place on ``blocks[schedule[step]]``; returns the cross-entropy of every step.

    With a ``teacher`` the loss is the library's distillation loss, but the returned curve stays the
    plain cross-entropy, so distilled and undistilled runs plot on one scale. ``after_step(n)`` runs after
    the n-th optimizer step (1-based), e.g. to evaluate mid-run (it must leave the model in train mode).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(schedule)))
    device = next(model.parameters()).device
    model.train()
    losses = []
    for indices in schedule:
        batch = blocks[indices].to(device)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            loss = distillation_loss(
                out.logits,
                teacher_logits,
                batch,
                out.loss,
                alpha=settings.kd_alpha,
                temperature=settings.kd_temperature,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if after_step is not None:
            after_step(len(losses))
    model.eval()
    return losses


def heldout_nll(model: PreTrainedModel, data: Data, settings: Settings) -> float:
    """Mean held-out NLL (nats/token) with the windows the conversion's fidelity report uses."""
    window = settings.block_size
    return perplexity(model, data.eval_ids, max_length=window, stride=window // 2)["nll"]


def downsample(losses: list[float], points: int = 40) -> dict:
    """The curve averaged over consecutive chunks, indexed by each chunk's last step (1-based)."""
    chunk = max(1, len(losses) // points)
    steps, means = [], []
    for start in range(0, len(losses), chunk):
        part = losses[start : start + chunk]
        steps.append(start + len(part))
        means.append(sum(part) / len(part))
    return {"step": steps, "loss": means}


def run_arm(
    model: PreTrainedModel, data: Data, settings: Settings, schedule: torch.Tensor, lr: float, **kwargs
) -> dict:
    started = time.perf_counter()
    losses = train(model, data.train_blocks, schedule, lr, settings=settings, **kwargs)
    nll = heldout_nll(model, data, settings)
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "curve": downsample(losses),
        "seconds": time.perf_counter() - started,
    }


def summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for a single seed), with the per-seed values."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


class Progress:
    """One line per finished run with the job's elapsed time, so a background run can be followed."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.started = label, total, 0, time.perf_counter()

    def report(self, name: str, result: dict) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        print(
            f"[{self.label} {self.done}/{self.total} {elapsed:5.0f}s] {name}: held-out ppl {result['perplexity']:.3f}"
            f" ({result['seconds']:.1f}s)",
            flush=True,
        )


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[tuple[Callable, tuple]], workers: int, threads: int) -> list:
    """``fn(*args)`` for every job, in order; with ``workers`` > 1 in that many processes at once.

    Jobs are independent and seed everything they use, so the results do not depend on ``workers``.
    """
    if workers == 1:
        return [fn(*args) for fn, args in jobs]
    context = multiprocessing.get_context("spawn")  # forking a process whose torch has started threads can hang
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [future.result() for future in futures]


# --- 1. conversion study ----------------------------------------------------------------------------


def step0_summary(report: dict) -> dict:
    """The fidelity report's figures that the study tables use."""
    exact = all(layer.get("unit_map", {}).get("exact", False) for layer in report["layers"])
    return {
        "max_abs_logit_diff": report["max_abs_logit_diff"],
        "perplexity": report["perplexity"]["converted"],
        "perplexity_ratio": report["perplexity"]["ratio"],
        "max_mlp_relative_error": report["max_mlp_relative_error"],
        "exact_scheme": report["init"] == "preserve" and exact,
    }


def convert(base: PreTrainedModel, variant: str, init: str, data: Data, settings: Settings, seed: int):
    """The converted model (on the CPU, where the fidelity report runs) and its step-0 summary."""
    model = convert_checkpoint(
        base, variant, init, tokenizer=data.tokenizer, eval_text=data.eval_text, eval_tokens=settings.eval_tokens,
        seed=seed,
    )  # fmt: skip
    return model, step0_summary(model.conversion_report)


def pretrain_base(settings: Settings, data: Data, device: torch.device) -> tuple[PreTrainedModel, dict]:
    """The GPT-2 that plays the existing checkpoint, back on the CPU (where conversion runs), and its run."""
    base = dense_model(settings, data.tokenizer, BASE_ACTIVATION, seed=1234)
    schedule = batch_schedule(len(data.train_blocks), settings.pretrain_steps, settings.batch_size, 1234)
    result = run_arm(base.to(device), data, settings, schedule, settings.pretrain_lr)
    Progress("pretrain", 1).report("base GPT-2", result)
    return base.cpu(), result


def preserve_conversions(base: PreTrainedModel, data: Data, settings: Settings) -> tuple[dict, dict]:
    """Every variant's ``preserve`` conversion and step-0 summary: deterministic, so one serves every seed."""
    models, step0 = {}, {}
    for variant in VARIANTS:
        models[variant], step0[variant] = convert(base, variant, "preserve", data, settings, seed=0)
    return models, step0


def conversion_seed(
    seed: int,
    base: PreTrainedModel,
    preserved: dict[str, PreTrainedModel],
    data: Data,
    settings: Settings,
    device: torch.device,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every fine-tuning arm of one seed on the same batches; returns the runs and the random inits' step 0."""
    schedule = batch_schedule(len(data.train_blocks), settings.finetune_steps, settings.batch_size, seed)
    teacher = copy.deepcopy(base).requires_grad_(False).to(device)
    progress = Progress(f"conversion seed {seed}", 2 + len(VARIANTS) * (len(INIT_SCHEMES) + len(DISTILLED_INITS)))
    runs: dict[str, dict] = {}
    random_step0: dict[str, dict] = {}

    def fine_tune(name: str, model: PreTrainedModel, **kwargs) -> None:
        runs[name] = run_arm(model.to(device), data, settings, schedule, settings.finetune_lr, **kwargs)
        progress.report(name, runs[name])

    fine_tune("base", copy.deepcopy(base))
    fine_tune("base+kd", copy.deepcopy(base), teacher=teacher)  # self-distillation: the distilled arms' control
    for variant in VARIANTS:
        fine_tune(f"{variant}/preserve", copy.deepcopy(preserved[variant]))
        fine_tune(f"{variant}/preserve+kd", copy.deepcopy(preserved[variant]), teacher=teacher)
        model, random_step0[variant] = convert(base, variant, "random", data, settings, seed=seed)
        fine_tune(f"{variant}/random", model)
    return runs, random_step0


def conversion_summary(
    base: PreTrainedModel,
    pretrain: dict,
    preserved: dict[str, PreTrainedModel],
    preserve_step0: dict[str, dict],
    per_seed: list[tuple[dict, dict]],
    data: Data,
    settings: Settings,
) -> dict:
    """The study's results: step 0 per variant and init, and every fine-tuning arm across seeds."""
    arms: dict[str, list[dict]] = {}
    for runs, _ in per_seed:
        for name, result in runs.items():
            arms.setdefault(name, []).append(result)
    step0 = {v: {"preserve": preserve_step0[v], "random": [random[v] for _, random in per_seed]} for v in VARIANTS}
    return {
        "base": {
            "activation": BASE_ACTIVATION,
            "parameters": count_parameters(base),
            "pretrain": pretrain,
            "step0_perplexity": math.exp(heldout_nll(base, data, settings)),
        },
        "parameters": {v: count_parameters(preserved[v]) for v in VARIANTS},
        "step0": step0,
        "finetune": {name: _arm_summary(runs, arms["base"], arms["base+kd"]) for name, runs in arms.items()},
        "distilled_inits": list(DISTILLED_INITS),
    }


def _arm_summary(runs: list[dict], base_runs: list[dict], base_kd_runs: list[dict]) -> dict:
    """Per-seed runs with the mean ± std perplexity and the paired gaps (same batches) to the base trained
    on without and with self-distillation."""
    return {
        "perplexity": summary(r["perplexity"] for r in runs),
        "nll": summary(r["nll"] for r in runs),
        "gap_to_base": _paired_gap(runs, base_runs),
        "gap_to_base_kd": _paired_gap(runs, base_kd_runs),
        "runs": runs,
    }


def _paired_gap(runs: list[dict], reference: list[dict]) -> dict:
    return summary(r["perplexity"] - b["perplexity"] for r, b in zip(runs, reference, strict=True))


# --- 2. from-scratch ablation -----------------------------------------------------------------------


def ablation_seed(seed: int, data: Data, settings: Settings, device: torch.device) -> dict[str, dict]:
    """Every MLP trained from scratch on one seed's batches (the same for all of them)."""
    schedule = batch_schedule(len(data.train_blocks), settings.scratch_steps, settings.batch_size, 1000 + seed)
    progress = Progress(f"from scratch seed {seed}", len(ABLATION_ARMS))
    runs = {}
    for name, mlp, is_glu in ABLATION_ARMS:
        model = (glu_model if is_glu else dense_model)(settings, data.tokenizer, mlp, seed)
        parameters = count_parameters(model)
        runs[name] = {
            "parameters": parameters,
            **run_arm(model.to(device), data, settings, schedule, settings.scratch_lr),
        }
        progress.report(name, runs[name])
    return runs


def ablation_summary(per_seed: list[dict[str, dict]], settings: Settings) -> dict:
    """Per MLP: log-perplexity across seeds, its paired difference to GELU, and Shazeer's figure."""
    results = {name: [runs[name] for runs in per_seed] for name, _, _ in ABLATION_ARMS}
    gelu = results["GELU"]
    return {
        name: {
            "mlp": mlp,
            "glu": is_glu,
            "intermediate_size": settings.glu_inner if is_glu else 4 * settings.n_embd,
            "parameters": results[name][0]["parameters"],
            "log_perplexity": summary(r["nll"] for r in results[name]),
            "diff_to_gelu": summary(r["nll"] - g["nll"] for r, g in zip(results[name], gelu, strict=True)),
            "shazeer_65k": SHAZEER_65K[name],
            "runs": results[name],
        }
        for name, mlp, is_glu in ABLATION_ARMS
    }


def paired_verdict(ours: list[float], theirs: list[float]) -> str:
    """'lower'/'higher' only when every seed agrees (same batches per seed); otherwise within the spread."""
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    if all(d < 0 for d in diffs):
        return "lower on every seed"
    if all(d > 0 for d in diffs):
        return "higher on every seed"
    return "within the seed spread"


# --- goals and tables -------------------------------------------------------------------------------


def goals(study: dict, scratch: dict) -> dict:
    step0 = study["step0"]
    exact = {v: s["preserve"]["max_abs_logit_diff"] <= EXACT_LOGIT_GOAL for v, s in step0.items() if _exact(s)}
    approx = {v: s["preserve"]["perplexity_ratio"] <= APPROX_PPL_GOAL for v, s in step0.items() if not _exact(s)}
    finetune = study["finetune"]
    after = {
        name: {"mean_gap": arm["gap_to_base"]["mean"], "met": arm["gap_to_base"]["mean"] <= 0}
        for name, arm in finetune.items()
        if not name.startswith("base")
    }
    ablation_verdicts = {
        f"{glu} vs {dense}": paired_verdict(
            scratch[glu]["log_perplexity"]["values"], scratch[dense]["log_perplexity"]["values"]
        )
        for glu in ("GEGLU", "SwiGLU")
        for dense in ("GELU", "ReLU")
    }
    return {
        "step0_exact_max_abs_logit_diff_le_1e-4": exact,
        "step0_approximate_perplexity_loss_le_1pct": approx,
        "finetuned_perplexity_le_base": after,
        "distilled_perplexity_le_self_distilled_base": {
            name: arm["gap_to_base_kd"]["mean"] <= 0
            for name, arm in finetune.items()
            if name.endswith("+kd") and not name.startswith("base")
        },
        "ablation_log_perplexity": ablation_verdicts,
    }


def _exact(step0_variant: dict) -> bool:
    return step0_variant["preserve"]["exact_scheme"]


def _pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _pm_signed(s: dict) -> str:
    return f"{s['mean']:+.3f} ± {s['std']:.3f}"


def step0_table(study: dict) -> list[str]:
    base_ppl = study["base"]["step0_perplexity"]
    lines = [
        f"Step 0 (before any training; base GPT-2 held-out perplexity {base_ppl:.3f}):",
        "",
        "| variant | init | max \\|Δlogit\\| | perplexity | ÷ base | goal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for variant, inits in study["step0"].items():
        p = inits["preserve"]
        if p["exact_scheme"]:
            goal = f"exact: ≤ 1e-4 {'✓' if p['max_abs_logit_diff'] <= EXACT_LOGIT_GOAL else '✗'}"
        else:
            goal = f"approx.: ≤ 1% loss {'✓' if p['perplexity_ratio'] <= APPROX_PPL_GOAL else '✗'}"
        lines.append(
            f"| {variant} | preserve | {p['max_abs_logit_diff']:.2e} | {p['perplexity']:.3f} "
            f"| {p['perplexity_ratio']:.4f} | {goal} |"
        )
        r = inits["random"]
        diff = summary(x["max_abs_logit_diff"] for x in r)
        ppl = summary(x["perplexity"] for x in r)
        ratio = summary(x["perplexity_ratio"] for x in r)
        lines.append(f"| {variant} | random | {diff['mean']:.2f} | {ppl['mean']:.1f} | {ratio['mean']:.2f} | — |")
    return lines


def finetune_table(study: dict, settings: Settings) -> list[str]:
    ft = study["finetune"]
    budget = settings.finetune_steps * settings.tokens_per_step
    seeds = len(settings.seeds)
    lines = [
        f"After fine-tuning for {budget:,} tokens (held-out perplexity, mean ± std over {seeds} seed(s); "
        "gap = converted − base on the same batches, paired per seed; negative = the GLU model is better):",
        "",
        f"Base GPT-2 trained on for the same budget: **{_pm(ft['base']['perplexity'])}**",
        "",
        f"Base GPT-2 distilled from its pretrained copy for the same budget (control for the KD arms): "
        f"**{_pm(ft['base+kd']['perplexity'])}**",
        "",
        "| variant | preserve | gap | preserve + KD | gap | gap to base + KD | random init | gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        cells = []
        for arm in ("preserve", "preserve+kd", "random"):
            result = ft[f"{variant}/{arm}"]
            cells += [_pm(result["perplexity"]), _pm_signed(result["gap_to_base"])]
            if arm == "preserve+kd":
                cells.append(_pm_signed(result["gap_to_base_kd"]))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(scratch: dict, settings: Settings) -> list[str]:
    budget = settings.scratch_steps * settings.tokens_per_step
    lines = [
        f"From scratch, {budget:,} tokens, {len(settings.seeds)} seed(s) (held-out log-perplexity, nats/token; "
        "Δ = arm − GELU on the same batches, paired per seed):",
        "",
        "| MLP | d_ff | parameters | log-ppl | perplexity | Δ vs GELU "
        "| Shazeer 2020 (65,536 steps) | Δ vs GELU there |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in scratch.items():
        log_ppl = arm["log_perplexity"]
        lines.append(
            f"| {name} | {arm['intermediate_size']} | {arm['parameters']:,} | {_pm(log_ppl)} "
            f"| {math.exp(log_ppl['mean']):.2f} | {_pm_signed(arm['diff_to_gelu'])} "
            f"| {arm['shazeer_65k']:.3f} | {arm['shazeer_65k'] - SHAZEER_65K['GELU']:+.3f} |"
        )
    return lines


def markdown(results: dict, settings: Settings) -> str:
    g = results["goals"]
    after = g["finetuned_perplexity_le_base"]
    met = [name for name, v in after.items() if v["met"]]
    kd = g["distilled_perplexity_le_self_distilled_base"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min.  ",
        f"Model: {settings.n_layer}-layer decoder, n_embd {settings.n_embd}, {settings.n_head} heads, block "
        f"{settings.block_size}, BPE vocab {results['data']['vocab_size']}; {results['data']['train_tokens']:,} "
        f"training tokens, {results['data']['eval_tokens']:,} held-out tokens. Base pretrained for "
        f"{settings.pretrain_steps * settings.tokens_per_step:,} tokens.",
        "",
        "### 1. Conversion study",
        "",
        *step0_table(results["conversion"]),
        "",
        *finetune_table(results["conversion"], settings),
        "",
        f"Distillation (α = {settings.kd_alpha}, T = {settings.kd_temperature}, teacher = the pretrained base) "
        f"runs on the {', '.join(results['conversion']['distilled_inits'])} init only. Random init keeps the "
        "source's intermediate size (4·n_embd), so it differs from preserve only in the MLP's starting weights.",
        "",
        f'Goal "fine-tuned GLU ≤ base" met (mean paired gap ≤ 0) by {len(met)} of {len(after)} arms'
        + (f": {', '.join(met)}." if met else ".")
        + f" Distilled arms ≤ the self-distilled base: {sum(kd.values())} of {len(kd)}.",
        "",
        "### 2. From-scratch ablation",
        "",
        *ablation_table(results["ablation"], settings),
        "",
        *[f"- {pair}: {verdict}" for pair, verdict in g["ablation_log_perplexity"].items()],
        "",
        "Shazeer's numbers are T5-base on C4 after 65,536 steps; ours are a tiny decoder after a few hundred "
        "steps: compare the ordering and the gaps, not the values.",
        "",
    ]
    return "\n".join(lines)


# --- plot -------------------------------------------------------------------------------------------


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    steps = runs[0]["curve"]["step"]
    return steps, [statistics.fmean(r["curve"]["loss"][i] for r in runs) for i in range(len(steps))]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    study, scratch = results["conversion"], results["ablation"]
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    colors = dict(zip(VARIANTS, plt.cm.tab10.colors, strict=False))

    ax = axes[0, 0]
    base_curve = _mean_curve(study["finetune"]["base"]["runs"])
    ax.plot(*base_curve, color="black", linewidth=2, zorder=5, label="base GPT-2 trained on")
    for variant in VARIANTS:
        for arm, style in (("preserve", "-"), ("random", ":")):
            runs = study["finetune"][f"{variant}/{arm}"]["runs"]
            ax.plot(*_mean_curve(runs), style, color=colors[variant], label=f"{variant} {arm}")
    ax.set_title("fine-tuning after conversion: training loss (mean over seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    width = 0.27
    base = study["finetune"]["base"]["perplexity"]
    lowest = min(base["mean"], study["finetune"]["base+kd"]["perplexity"]["mean"])
    for i, arm in enumerate(("preserve", "preserve+kd", "random")):
        stats = [study["finetune"][f"{v}/{arm}"]["perplexity"] for v in VARIANTS]
        xs = [j + (i - 1) * width for j in range(len(VARIANTS))]
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], label=arm, capsize=2)
        lowest = min([lowest, *(s["mean"] for s in stats)])
    ax.axhline(base["mean"], color="black", linestyle="--", label=f"base trained on ({base['mean']:.2f})")
    base_kd = study["finetune"]["base+kd"]["perplexity"]["mean"]
    ax.axhline(base_kd, color="tab:orange", linestyle="--", label=f"base self-distilled ({base_kd:.2f})")
    ax.axhline(study["base"]["step0_perplexity"], color="grey", linestyle=":", label="base before fine-tuning")
    ax.set_xticks(range(len(VARIANTS)), list(VARIANTS), rotation=20)
    ax.set_ylim(bottom=lowest * 0.97)  # the differences are a few percent: start the axis near them
    ax.set_title("held-out perplexity after the same fine-tuning budget")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for i, (name, arm) in enumerate(scratch.items()):
        ax.plot(*_mean_curve(arm["runs"]), "-" if arm["glu"] else "--", color=plt.cm.tab10.colors[i], label=name)
    ax.set_title("from scratch: training loss (mean over seeds; dashed = dense)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    names = list(scratch)
    ours = [scratch[n]["diff_to_gelu"] for n in names]
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs], [s["mean"] for s in ours], 0.4, yerr=[s["std"] for s in ours], capsize=2, label="ours"
    )
    theirs = [SHAZEER_65K[n] - SHAZEER_65K["GELU"] for n in names]
    ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="Shazeer 2020 (65,536 steps)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("held-out log-ppl − GELU's (nats/token)")
    ax.set_title("from scratch: log-perplexity relative to GELU (lower is better)")
    ax.legend(fontsize=8)

    figure.suptitle(f"hf-glu quality benchmark ({results['mode']} mode, {results['machine']}, {results['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- main -------------------------------------------------------------------------------------------


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    arch = platform.machine().replace("_", "-")
    return f"{os.cpu_count()}-core {arch} CPU (no GPU), torch {torch.__version__}"


def run(settings: Settings, args: argparse.Namespace, device: torch.device, command: str) -> dict:
    started = time.perf_counter()
    data = prepare_data(settings, args.text_file)
    base, pretrain = pretrain_base(settings, data, device)
    preserved, preserve_step0 = preserve_conversions(base, data, settings)
    # The longest jobs first, so the last one to start is short.
    jobs = [(conversion_seed, (seed, base, preserved, data, settings, device)) for seed in settings.seeds]
    jobs += [(ablation_seed, (seed, data, settings, device)) for seed in settings.seeds]
    outputs = run_jobs(jobs, args.workers, args.threads)
    n = len(settings.seeds)
    study = conversion_summary(base, pretrain, preserved, preserve_step0, outputs[:n], data, settings)
    scratch = ablation_summary(outputs[n:], settings)
    results = {
        "mode": "quick" if args.quick else "full",
        "command": command,
        "machine": describe_machine(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "threads": args.threads,
        "workers": args.workers,
        "settings": asdict(settings),
        "data": {
            "text": args.text_file or "built-in corpus (hf_glu.data.builtin_corpus)",
            "vocab_size": len(data.tokenizer),
            "train_tokens": data.train_blocks.numel(),
            "eval_tokens": int(data.eval_ids.shape[-1]),
        },
        "conversion": study,
        "ablation": scratch,
        "goals": goals(study, scratch),
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", results)  # a diverged arm: null, not NaN
    (out / "quality.md").write_text(markdown(results, settings), encoding="utf-8")
    plot(results, out / "quality.png")
    return results


def default_out(quick: bool, benchmark: str = "quality") -> Path:
    """Where ``benchmark``'s results go without ``--out``: the committed results folder only for a full run, the
    git-ignored bench_results/ for a smoke run (recovery.py's too)."""
    if quick:
        return Path(__file__).resolve().parents[1] / "bench_results" / f"{benchmark}-quick"
    return Path(__file__).resolve().parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 seed, a few steps (CI)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda, which also scales the model up")
    parser.add_argument("--text-file", default=None, help="UTF-8 text to use instead of the built-in corpus")
    parser.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results for a full run; "
        "bench_results/quality-quick, git-ignored, for --quick: a smoke run never overwrites recorded results)"
    )
    # One thread by default: on two cores shared with other processes, two contended threads measured
    # 5-8x slower per step than one.
    parser.add_argument("--threads", action=PositiveInt, default=1, help="torch CPU threads per process (default: 1)")
    parser.add_argument(
        "--workers",
        action=PositiveInt,
        default=None,
        help="processes running jobs at once (default: 2 on CPU, 1 for --quick/CUDA)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch sees no CUDA device")
    if args.workers is None:
        args.workers = 1 if device.type == "cuda" or args.quick else 2  # quick: starting workers costs more
    torch.set_num_threads(args.threads)
    args.out = args.out or str(default_out(args.quick))
    settings = QUICK if args.quick else GPU_FULL if device.type == "cuda" else FULL
    command = shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    results = run(settings, args, device, command)
    print("\n" + markdown(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
