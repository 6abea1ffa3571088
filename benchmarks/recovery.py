"""Recovery study: a GPT-2 converted to GLU at its own parameter count, then distilled from its source.

1. A small GPT-2 (gelu_new MLP) is pretrained on the built-in corpus: the fixture (quality.py's recipe).
2. Every GLU variant is converted from it with ``match_params=True``: each layer keeps the GLU width at
   which its MLP has the source MLP's parameter count, its units chosen on calibration text (the
   training part of the corpus) and ``down_proj`` re-fitted (``hf_glu.convert.width``). Step-0 held-out
   perplexity comes from the conversion report and is re-measured here.
3. Each converted model is distilled from the source (α, T as quality.py) for a fixed budget, beside
   (a) the source trained on for the same budget (plain cross-entropy; and, as the distilled arms'
   control, distilled from its own frozen copy) and (b) a GLU of the same width with fresh MLP weights
   (``init="random"``, attention and embeddings kept), distilled the same way.
   Every arm sees the same batches; held-out perplexity is measured at fixed points of the budget.

Writes ``recovery.json`` (every number), ``recovery.md`` (the table) and ``recovery.png`` into ``--out``
(default ``benchmarks/results`` for a full run; ``--quick`` goes to the git-ignored
``bench_results/recovery-quick``):

    HF_HUB_OFFLINE=1 nice .venv/bin/python benchmarks/recovery.py            # full, ~15 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recovery.py --quick         # CI smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py, the fixture's recipe
import quality  # noqa: E402

from hf_glu import VARIANTS, convert_checkpoint  # noqa: E402
from hf_glu.bad_input import OneLineParser, PositiveInt  # noqa: E402
from hf_glu.data import builtin_corpus, read_text, split_train_eval  # noqa: E402
from hf_glu.jsonio import write_json  # noqa: E402

# The MLP is 4·n_embd = 512 units; match_params keeps 344 (3·128·344 + biases ≈ 2·128·512 + biases).
FULL = quality.Settings(
    corpus_chars=None, vocab_size=2048, block_size=128, n_embd=128, n_layer=4, n_head=4, batch_size=16,
    seeds=(0,), pretrain_steps=300, pretrain_lr=3e-3, finetune_steps=24, finetune_lr=1e-3,
    scratch_steps=0, scratch_lr=0.0, eval_tokens=4096,
)  # fmt: skip
QUICK = quality.Settings(
    corpus_chars=60_000, vocab_size=384, block_size=32, n_embd=32, n_layer=2, n_head=2, batch_size=8,
    seeds=(0,), pretrain_steps=30, pretrain_lr=3e-3, finetune_steps=4, finetune_lr=1e-3,
    scratch_steps=0, scratch_lr=0.0, eval_tokens=512,
)  # fmt: skip
CALIBRATION_TOKENS = 8192
EVAL_POINTS = 4  # held-out evaluations per distillation run, besides step 0
RANDOM_VARIANTS = ("geglu_tanh", "swiglu")  # the random-init comparison arms (each costs a full run)
GOALS = {"geglu_tanh": 1.02, "swiglu": 1.03}  # step-0 held-out perplexity ÷ the source's, at most


def count_mlp(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)


def curve_run(
    model: torch.nn.Module,
    data: quality.Data,
    settings: quality.Settings,
    schedule: torch.Tensor,
    teacher: torch.nn.Module | None,
    label: str,
) -> dict:
    """Train ``model`` on ``schedule`` (distilled from ``teacher`` when given); held-out perplexity at
    step 0 and at ``EVAL_POINTS`` evenly spaced steps, against tokens seen."""
    started = time.perf_counter()
    every = max(1, len(schedule) // EVAL_POINTS)
    points = [(0, math.exp(quality.heldout_nll(model, data, settings)))]

    def evaluate(step: int) -> None:
        if step % every == 0 or step == len(schedule):
            points.append((step, math.exp(quality.heldout_nll(model, data, settings))))
            model.train()

    losses = quality.train(model, data.train_blocks, schedule, settings.finetune_lr, teacher=teacher,
                           settings=settings, after_step=evaluate)  # fmt: skip
    tokens = settings.tokens_per_step
    result = {
        "tokens": [step * tokens for step, _ in points],
        "perplexity": [ppl for _, ppl in points],
        "final_perplexity": points[-1][1],
        "train_loss": quality.downsample(losses),
        "seconds": time.perf_counter() - started,
    }
    print(f"[{label}] held-out ppl {points[0][1]:.3f} → {points[-1][1]:.3f} ({result['seconds']:.0f}s)", flush=True)
    return result


def run(settings: quality.Settings, args: argparse.Namespace, command: str) -> dict:
    started = time.perf_counter()
    data = quality.prepare_data(settings, args.text_file)
    text = read_text(args.text_file) if args.text_file is not None else builtin_corpus(settings.corpus_chars)
    train_text, _ = split_train_eval(text, 0.1)  # prepare_data's split: calibration never sees held-out text
    base, pretrain = quality.pretrain_base(settings, data, torch.device("cpu"))
    source_ppl = math.exp(quality.heldout_nll(base, data, settings))
    schedule = quality.batch_schedule(len(data.train_blocks), settings.finetune_steps, settings.batch_size, 0)
    teacher = copy.deepcopy(base).requires_grad_(False)
    convert_args = dict(tokenizer=data.tokenizer, eval_text=data.eval_text, eval_tokens=settings.eval_tokens)

    arms: dict[str, dict] = {}
    arms["source (trained on)"] = {
        "variant": None, "init": None, "intermediate_size": 4 * settings.n_embd,
        "mlp_parameters": count_mlp(base), "parameters": quality.count_parameters(base),
        **curve_run(copy.deepcopy(base), data, settings, schedule, None, "source trained on"),
    }  # fmt: skip
    # The distilled arms' control: how much of their gain is the distillation itself, not the GLU.
    arms["source (distilled from itself)"] = {
        "variant": None, "init": None, "intermediate_size": 4 * settings.n_embd,
        "mlp_parameters": count_mlp(base), "parameters": quality.count_parameters(base),
        **curve_run(copy.deepcopy(base), data, settings, schedule, teacher, "source self-distilled"),
    }  # fmt: skip
    step0: dict[str, dict] = {}
    for variant in args.variants:
        converted = convert_checkpoint(base, variant, match_params=True, calibration_text=train_text,
                                       calibration_tokens=args.calibration_tokens, **convert_args)  # fmt: skip
        report = converted.conversion_report
        remeasured = math.exp(quality.heldout_nll(converted, data, settings))
        step0[variant] = {
            "intermediate_size": report["intermediate_size"],
            "report_perplexity": report["perplexity"]["converted"],
            "remeasured_perplexity": remeasured,
            "ratio": remeasured / source_ppl,
            "parameters": report["parameters"],
            "layers": [
                {k: layer[k] for k in ("layer", "mlp_relative_error", "calibration_mlp_relative_error")}
                for layer in report["layers"]
            ],
        }
        print(f"[{variant}] width {report['intermediate_size']}, step-0 ppl {remeasured:.3f} "
              f"(÷ source {remeasured / source_ppl:.4f})", flush=True)  # fmt: skip
        arms[f"{variant} equal-param, distilled"] = {
            "variant": variant, "init": "preserve", "intermediate_size": report["intermediate_size"],
            "mlp_parameters": count_mlp(converted), "parameters": quality.count_parameters(converted),
            **curve_run(converted, data, settings, schedule, teacher, f"{variant} equal-param"),
        }  # fmt: skip
    for variant in [v for v in RANDOM_VARIANTS if v in args.variants]:
        width = step0[variant]["intermediate_size"]
        fresh = convert_checkpoint(base, variant, init="random", intermediate_size=width, **convert_args)
        arms[f"{variant} random-init, distilled"] = {
            "variant": variant, "init": "random", "intermediate_size": width,
            "mlp_parameters": count_mlp(fresh), "parameters": quality.count_parameters(fresh),
            **curve_run(fresh, data, settings, schedule, teacher, f"{variant} random-init"),
        }  # fmt: skip

    goals = {
        v: {"ratio": step0[v]["ratio"], "at_most": limit, "met": step0[v]["ratio"] <= limit}
        for v, limit in GOALS.items()
        if v in step0
    }
    results = {
        "mode": "quick" if args.quick else "full",
        "command": command,
        "machine": quality.describe_machine(torch.device("cpu")),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "threads": args.threads,
        "settings": asdict(settings),
        "calibration_tokens": args.calibration_tokens,
        "data": {
            "text": args.text_file or "built-in corpus (hf_glu.data.builtin_corpus)",
            "vocab_size": len(data.tokenizer),
            "train_tokens": data.train_blocks.numel(),
            "eval_tokens": int(data.eval_ids.shape[-1]),
        },
        "source": {"perplexity": source_ppl, "parameters": quality.count_parameters(base), "pretrain": pretrain},
        "step0": step0,
        "arms": arms,
        "distillation": {"kd_alpha": settings.kd_alpha, "kd_temperature": settings.kd_temperature,
                         "teacher": "the pretrained source"},  # fmt: skip
        "goals": goals,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recovery.json", results)
    (out / "recovery.md").write_text(markdown(results), encoding="utf-8")
    plot(results, out / "recovery.png")
    return results


def markdown(results: dict) -> str:
    settings, source = results["settings"], results["source"]
    budget = settings["finetune_steps"] * settings["batch_size"] * settings["block_size"]
    trained_on = results["arms"]["source (trained on)"]["final_perplexity"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min.  ",
        f"Source: GPT-2 (gelu_new), {settings['n_layer']} layers, n_embd {settings['n_embd']}, MLP width "
        f"{4 * settings['n_embd']}, {source['parameters']:,} parameters, pretrained for "
        f"{settings['pretrain_steps'] * settings['batch_size'] * settings['block_size']:,} tokens; held-out "
        f"perplexity {source['perplexity']:.3f} on {results['data']['eval_tokens']:,} tokens. Calibration: "
        f"{results['calibration_tokens']:,} tokens of the training text. Recovery budget: {budget:,} tokens, "
        f"distilled from the source (α = {results['distillation']['kd_alpha']}).",
        "",
        "| model | GLU width | MLP params | total params | step 0 ppl | ÷ source | after budget "
        "| ÷ source trained on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in results["arms"].items():
        start, end = arm["perplexity"][0], arm["final_perplexity"]
        width = "—" if arm["variant"] is None else arm["intermediate_size"]
        lines.append(
            f"| {name} | {width} | {arm['mlp_parameters']:,} | {arm['parameters']:,} | {start:.3f} "
            f"| {start / source['perplexity']:.4f} | {end:.3f} | {end / trained_on:.4f} |"
        )
    lines += ["", "Step-0 goals (held-out perplexity ÷ the source's): " + ", ".join(
        f"{v} {g['ratio']:.4f} ≤ {g['at_most']} {'met' if g['met'] else 'NOT met'}" for v, g in results["goals"].items()
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, (all_ax, zoom_ax) = plt.subplots(1, 2, figsize=(15, 5.5))
    colors = dict(zip(VARIANTS, plt.cm.tab10.colors, strict=False))
    # Left: every arm (log scale, random init included); right: the source and the equal-param conversions.
    for ax, keep in ((all_ax, lambda arm: True), (zoom_ax, lambda arm: arm["init"] != "random")):
        for name, arm in results["arms"].items():
            if not keep(arm):
                continue
            if arm["variant"] is None:
                style = {"linewidth": 2.5, "linestyle": "-" if "trained" in name else "--"}
                color = "black"
            else:
                style, color = {"linestyle": "-" if arm["init"] == "preserve" else ":"}, colors[arm["variant"]]
            ax.plot(arm["tokens"], arm["perplexity"], marker="o", markersize=3, color=color, label=name, **style)
        ax.axhline(results["source"]["perplexity"], color="grey", linestyle=":", linewidth=1, label="source before")
        ax.set_xlabel("recovery tokens (distilled from the source; 'trained on': plain training)")
        ax.legend(fontsize=7, ncol=2)
    all_ax.set_yscale("log")
    all_ax.set_ylabel("held-out perplexity (log scale)")
    all_ax.set_title("every arm")
    zoom_ax.set_ylabel("held-out perplexity")
    zoom_ax.set_title("the source and the equal-parameter conversions")
    figure.suptitle("GPT-2 → GLU at equal parameters: held-out perplexity vs recovery tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


default_out = partial(quality.default_out, benchmark="recovery")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (CI smoke run)")
    parser.add_argument("--text-file", default=None, help="UTF-8 text to use instead of the built-in corpus")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results, or "
                        "bench_results/recovery-quick for --quick)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--calibration-tokens", type=int, default=None,
                        help=f"calibration tokens (default: {CALIBRATION_TOKENS}; --quick: 1024)")  # fmt: skip
    parser.add_argument("--threads", action=PositiveInt, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out = args.out or str(default_out(args.quick))
    args.calibration_tokens = args.calibration_tokens or (1024 if args.quick else CALIBRATION_TOKENS)
    settings = QUICK if args.quick else FULL
    command = shlex.join(["python", "benchmarks/recovery.py", *(argv if argv is not None else sys.argv[1:])])
    results = run(settings, args, command)
    print("\n" + markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
