"""``hf-glu demo``: the whole story on a laptop CPU, offline, in about five minutes (``--quick``: one).

1. Text: the built-in corpus (or ``--text-file``), split into training and held-out parts.
2. A byte-level BPE tokenizer trained on the training part.
3. "The existing checkpoint": a small GPT-2 pretrained with Trainer for a fixed token budget.
4. Conversion to GLU (``geglu_tanh``, exact for GPT-2's ``gelu_new``; ``swiglu``, a calibrated
   approximation) with the fidelity report.
5. Fine-tuning of each converted model for a fixed token budget, beside the source GPT-2 trained on
   for the same budget, so the comparison is like for like.
6. A fresh Python process reloads the fine-tuned checkpoints through ``AutoModelForCausalLM`` with
   ``trust_remote_code=True`` and no hf_glu import, as a Hub user would, and samples text.
7. A held-out perplexity table, ``results.json`` and a loss-curve PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback

from .convert import convert_to_folder
from .convert.perplexity import perplexity
from .data import builtin_corpus, pack_token_blocks, read_text, split_train_eval, train_bpe_tokenizer
from .glu import VARIANTS
from .jsonio import write_json

DEMO_VARIANTS = ("geglu_tanh", "swiglu")
RESULTS_FILE = "results.json"
PLOT_FILE = "loss_curves.png"
SOURCE_NAME = "source GPT-2 (gelu_new)"


@dataclass(frozen=True)
class RunSettings:
    """What the demo and the quality benchmark (``benchmarks/quality.py``) both size: the corpus, the small GPT-2
    pretrained on it, the pretraining and fine-tuning budgets and the held-out tokens scored. A step is
    ``batch_size`` blocks of ``block_size`` tokens."""

    corpus_chars: int | None  # the built-in corpus is cut to this many characters (None: all of it)
    vocab_size: int
    block_size: int
    n_embd: int
    n_layer: int
    n_head: int
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    eval_tokens: int  # held-out tokens scored for every perplexity

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


@dataclass(frozen=True)
class DemoSettings(RunSettings):
    """Sizes and budgets of one demo run; the token budgets are ``steps · batch_size · block_size``."""

    dropout: float
    eval_points: int  # held-out loss evaluations per training run, for the plot
    sample_tokens: int


FULL = DemoSettings(
    corpus_chars=None, vocab_size=2048, block_size=128, n_embd=128, n_layer=4, n_head=4, dropout=0.1,
    batch_size=8, pretrain_steps=400, pretrain_lr=2e-3, finetune_steps=200, finetune_lr=1e-3,
    eval_tokens=8192, eval_points=4, sample_tokens=40,
)  # fmt: skip
QUICK = DemoSettings(
    corpus_chars=120_000, vocab_size=512, block_size=64, n_embd=64, n_layer=2, n_head=2, dropout=0.0,
    batch_size=16, pretrain_steps=90, pretrain_lr=3e-3, finetune_steps=30, finetune_lr=1e-3,
    eval_tokens=2048, eval_points=2, sample_tokens=20,
)  # fmt: skip


@dataclass
class Corpus:
    tokenizer: PreTrainedTokenizerBase
    train_blocks: list[list[int]]
    eval_blocks: list[list[int]]
    eval_ids: torch.Tensor  # [1, eval_tokens], the held-out text scored by the table
    eval_text: str
    prompt: str


# --- data -------------------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def prepare_corpus(settings: DemoSettings, text_file: str | Path | None, folder: Path) -> Corpus:
    """Split the text, train the tokenizer on the training part only, and pack both parts into blocks."""
    text = read_text(text_file) if text_file is not None else builtin_corpus(settings.corpus_chars)
    train_text, eval_text = split_train_eval(text, 0.1)
    tokenizer = train_bpe_tokenizer(train_text, settings.vocab_size)
    tokenizer.save_pretrained(folder)
    eval_ids = tokenizer(eval_text, return_tensors="pt", add_special_tokens=False).input_ids[:, : settings.eval_tokens]
    if eval_ids.shape[-1] < settings.block_size:
        raise ValueError(
            f"the held-out tenth of the text makes {eval_ids.shape[-1]} tokens; "
            f"expected at least {settings.block_size}: pass a longer text file"
        )
    eval_blocks = pack_token_blocks(_paragraphs(eval_text), tokenizer, settings.block_size)
    return Corpus(
        tokenizer=tokenizer,
        train_blocks=pack_token_blocks(_paragraphs(train_text), tokenizer, settings.block_size),
        eval_blocks=eval_blocks[: max(1, settings.eval_tokens // settings.block_size)],
        eval_ids=eval_ids,
        eval_text=eval_text,
        prompt=" ".join(eval_text.split()[:6]),
    )


def _examples(blocks: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": block, "labels": block} for block in blocks]


# --- training ---------------------------------------------------------------------------------------


class _BarProgress(ProgressCallback):
    """Trainer's tqdm bar, named after the run, with the loss on the bar rather than a printed line per log."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.description)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


class _CurveRecorder(TrainerCallback):
    """Collects (step, training loss) and (step, held-out loss) pairs for the plot."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if logs and "eval_loss" in logs:
            self.eval.append((state.global_step, float(logs["eval_loss"])))


def train(
    model: PreTrainedModel,
    corpus: Corpus,
    settings: DemoSettings,
    steps: int,
    learning_rate: float,
    description: str,
    seed: int,
) -> dict:
    """Train ``model`` in place for ``steps`` optimizer steps; returns its loss curves (steps → tokens)."""
    recorder = _CurveRecorder()
    if model.loss_type is None:
        # GPT2LMHeadModel's class name maps to no loss type, so Trainer counts unshifted labels for
        # `num_items_in_batch` and under-reports its loss by (block-1)/block next to the GLU models.
        # Naming the loss it already falls back to (ForCausalLM) makes the curves comparable.
        model.loss_type = "ForCausalLM"
    eval_every = max(1, steps // settings.eval_points)
    with tempfile.TemporaryDirectory(prefix="hf-glu-demo-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10),
            weight_decay=0.1,
            logging_steps=max(1, steps // 30),
            eval_strategy="steps",
            eval_steps=eval_every,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_examples(corpus.train_blocks),
            eval_dataset=_examples(corpus.eval_blocks),
            data_collator=default_data_collator,
            callbacks=[recorder],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarProgress(description))
        trainer.evaluate()  # the held-out loss at step 0, where each curve starts
        trainer.train()
    return {
        "train": [(step * settings.tokens_per_step, loss) for step, loss in recorder.train],
        "eval": [(step * settings.tokens_per_step, loss) for step, loss in recorder.eval],
    }


def pretrain_source(corpus: Corpus, settings: DemoSettings, folder: Path, seed: int) -> dict:
    """Build and pretrain the small GPT-2 that plays the existing checkpoint; save it with its tokenizer."""
    set_seed(seed)
    eot = corpus.tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(corpus.tokenizer),
        n_positions=settings.block_size,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=settings.dropout,
        embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    curves = train(model, corpus, settings, settings.pretrain_steps, settings.pretrain_lr, "pretrain GPT-2", seed)
    model.save_pretrained(folder)
    corpus.tokenizer.save_pretrained(folder)
    return curves


def finetune(src: Path, dst: Path, corpus: Corpus, settings: DemoSettings, description: str, seed: int) -> dict:
    """Load the checkpoint in ``src``, train it for the fine-tuning budget, save it with the tokenizer in ``dst``."""
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src)
    curves = train(model, corpus, settings, settings.finetune_steps, settings.finetune_lr, description, seed)
    model.save_pretrained(dst)
    corpus.tokenizer.save_pretrained(dst)
    return curves


def heldout_perplexity(folder: Path, corpus: Corpus, settings: DemoSettings) -> float:
    """Sliding-window perplexity of the saved checkpoint in ``folder`` on the held-out tokens."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    window = settings.block_size
    return perplexity(model, corpus.eval_ids, max_length=window, stride=window // 2)["perplexity"]


def all_perplexities(out: Path, corpus: Corpus, settings: DemoSettings, variants: Sequence[str]) -> dict:
    """Every saved model's held-out perplexity, read back from its folder so the table scores what was saved."""
    return {
        "source": heldout_perplexity(out / "source", corpus, settings),
        "source_finetuned": heldout_perplexity(out / "source-finetuned", corpus, settings),
        "converted": {
            v: {
                "step_0": heldout_perplexity(out / f"converted-{v}", corpus, settings),
                "finetuned": heldout_perplexity(out / f"finetuned-{v}", corpus, settings),
            }
            for v in variants
        },
    }


# --- the fresh-process reload -----------------------------------------------------------------------

# Run in a child interpreter that never imports hf_glu: the checkpoints must load from their own code.
_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result_path, prompt, max_new_tokens, folders = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    samples = {}
    for folder in folders:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        torch.manual_seed(0)
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=True, top_k=40,
            temperature=0.8, pad_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)
        samples[folder] = {"class": type(model).__name__, "sample": text}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"hf_glu_imported": "hf_glu" in sys.modules, "samples": samples}, f)
    """
)


def reload_in_fresh_process(
    folders: Sequence[Path], prompt: str, max_new_tokens: int, threads: int | None = None
) -> dict:
    """Load each checkpoint with ``AutoModelForCausalLM`` in a new interpreter and sample a continuation."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="hf-glu-demo-reload-") as scratch:
        result_path = Path(scratch) / "samples.json"
        command = [sys.executable, "-c", _RELOAD_SCRIPT, str(result_path), prompt, str(max_new_tokens)]
        done = subprocess.run(
            [*command, *map(str, folders)], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env
        )
        if done.returncode != 0 or not result_path.is_file():
            names = ", ".join(map(str, folders))
            raise RuntimeError(f"reloading {names} in a fresh process failed:\n{done.stderr}")
        return json.loads(result_path.read_text(encoding="utf-8"))


# --- reporting --------------------------------------------------------------------------------------


def table_rows(ppl: dict, variants: Sequence[str]) -> list[dict]:
    """The results table: every held-out perplexity next to its ratio to the source's."""
    source = ppl["source"]
    rows = [{"model": SOURCE_NAME, "stage": "pretrained", "perplexity": source}]
    for variant in variants:
        rows.append(
            {"model": f"converted {variant}", "stage": "step 0", "perplexity": ppl["converted"][variant]["step_0"]}
        )
    for variant in variants:
        fine_tuned = ppl["converted"][variant]["finetuned"]
        rows.append({"model": f"converted {variant}", "stage": "fine-tuned", "perplexity": fine_tuned})
    rows.append({"model": SOURCE_NAME, "stage": "same extra budget", "perplexity": ppl["source_finetuned"]})
    return [{**row, "ratio_to_source": row["perplexity"] / source} for row in rows]


def format_table(rows: list[dict], finetune_tokens: int) -> str:
    lines = [
        f"Held-out perplexity (fine-tuning budget: {finetune_tokens:,} tokens per model)",
        f"{'model':<28} {'stage':<18} {'perplexity':>11} {'÷ source':>9}",
    ]
    lines.append("-" * len(lines[1]))
    for row in rows:
        lines.append(f"{row['model']:<28} {row['stage']:<18} {row['perplexity']:>11.4f} {row['ratio_to_source']:>9.5f}")
    return "\n".join(lines)


def plot_curves(curves: dict, pretrain_tokens: int, path: Path) -> None:
    """Training and held-out loss against tokens seen; fine-tuning runs start where pretraining ended."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    # The fine-tuning runs nearly coincide (that is the point): distinct dashes keep each one visible.
    styles = ("-", "--", ":", "-.")
    for number, (name, curve) in enumerate(curves.items()):
        offset = 0 if name == "pretrain" else pretrain_tokens
        for ax, key in ((train_ax, "train"), (eval_ax, "eval")):
            if curve[key]:
                x, y = zip(*curve[key], strict=True)
                marker = "o" if key == "eval" else None
                style = styles[number % len(styles)]
                ax.plot([offset + t for t in x], y, style, marker=marker, markersize=3, linewidth=1.5, label=name)
    for ax, title in ((train_ax, "training loss"), (eval_ax, "held-out loss")):
        ax.axvline(pretrain_tokens, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.legend()
    figure.suptitle("hf-glu demo: GPT-2 pretrained, converted to GLU at the dotted line, then fine-tuned")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the demo ---------------------------------------------------------------------------------------


def _prepare_output(output_dir: str | Path) -> Path:
    """Create ``output_dir``; a non-empty folder is reused only when an earlier demo made it (its results.json)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file; expected a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULTS_FILE).is_file():
        raise ValueError(
            f"output folder {str(out)!r} is not empty and holds no {RESULTS_FILE} from an earlier demo; "
            "expected an empty or new folder, or an earlier demo's output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_FILE, {"status": "running"})  # marks it as ours
    return out


class _Stages:
    """Numbered stage headers and per-stage wall times."""

    def __init__(self, total: int) -> None:
        self.total, self.number, self.seconds = total, 0, {}
        self._name, self._start = None, 0.0

    def next(self, name: str) -> None:
        self.close()
        self.number += 1
        self._name, self._start = name, time.perf_counter()
        print(f"\n==> [{self.number}/{self.total}] {name}", flush=True)

    def close(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._start, 1)
            self._name = None


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block, restoring torch's setting after it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(
    output_dir: str | Path = "hf-glu-demo",
    quick: bool = False,
    text_file: str | Path | None = None,
    variants: Sequence[str] = DEMO_VARIANTS,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Run the demo into ``output_dir``; returns the results (also written to ``output_dir/results.json``).

    ``quick`` shrinks the model, the text and the budgets to about a minute on two CPU cores: the same
    steps, a weaker story. ``text_file`` replaces the built-in corpus with a UTF-8 text file.
    ``threads`` sets torch's CPU threads for the run (default: torch's choice); on a machine shared with
    other busy processes, 1 thread can be many times faster than contended ones.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is invalid; expected a positive integer or None")
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        raise ValueError(f"variants={list(variants)!r} is invalid; expected one or more of {sorted(VARIANTS)}")
    out = _prepare_output(output_dir)
    with _torch_threads(threads):
        return _run_stages(out, QUICK if quick else FULL, text_file, variants, seed, threads)


def _run_stages(
    out: Path,
    settings: DemoSettings,
    text_file: str | Path | None,
    variants: Sequence[str],
    seed: int,
    threads: int | None,
) -> dict:
    started = time.perf_counter()
    stages = _Stages(total=7)

    stages.next("text and tokenizer")
    corpus = prepare_corpus(settings, text_file, out / "tokenizer")
    blocks, vocabulary = len(corpus.train_blocks), len(corpus.tokenizer)
    print(f"{blocks} training blocks of {settings.block_size} tokens, vocabulary {vocabulary}")

    stages.next("pretraining the source GPT-2 (the existing checkpoint)")
    curves = {"pretrain": pretrain_source(corpus, settings, out / "source", seed)}

    stages.next(f"converting to GLU: {', '.join(variants)}")
    fidelity = {}
    for variant in variants:
        conversion = convert_to_folder(
            out / "source", out / f"converted-{variant}", variant=variant, force=True, eval_text=corpus.eval_text
        )
        fidelity[variant] = _fidelity_summary(conversion.report)
        print(f"{variant}: max |Δlogit| {fidelity[variant]['max_abs_logit_diff']:.3g}")

    stages.next("fine-tuning the converted models and the source for the same budget")
    for variant in variants:
        src, dst = out / f"converted-{variant}", out / f"finetuned-{variant}"
        curves[f"{variant} (converted)"] = finetune(src, dst, corpus, settings, f"fine-tune {variant}", seed)
    curves["GPT-2 (source)"] = finetune(
        out / "source", out / "source-finetuned", corpus, settings, "train on GPT-2", seed
    )

    stages.next("held-out perplexity")
    ppl = all_perplexities(out, corpus, settings, variants)

    stages.next("reloading the fine-tuned checkpoints in a fresh process (trust_remote_code, no hf_glu import)")
    finetuned = [out / f"finetuned-{v}" for v in variants]
    reload = reload_in_fresh_process(finetuned, corpus.prompt, settings.sample_tokens, threads)
    for folder, sample in reload["samples"].items():
        print(f"{Path(folder).name} ({sample['class']}): {corpus.prompt!r} → {sample['sample']!r}")

    stages.next("results")
    plot_curves(curves, settings.pretrain_steps * settings.tokens_per_step, out / PLOT_FILE)
    stages.close()
    finetune_tokens = settings.finetune_steps * settings.tokens_per_step
    rows = table_rows(ppl, variants)
    results = {
        "status": "done",
        "mode": "quick" if settings is QUICK else "full",
        "settings": asdict(settings),
        "seed": seed,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "text": str(text_file) if text_file is not None else "built-in corpus (hf_glu.data.builtin_corpus)",
        "pretrain_tokens": settings.pretrain_steps * settings.tokens_per_step,
        "finetune_tokens": finetune_tokens,
        "eval_tokens": int(corpus.eval_ids.shape[-1]),
        "perplexity": ppl,
        "table": rows,
        "fidelity": fidelity,
        "fresh_process": {"prompt": corpus.prompt, **reload},
        "curves": curves,
        "plot": str(out / PLOT_FILE),
        "stage_seconds": stages.seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / RESULTS_FILE, results)  # a diverged run: null, not NaN
    print("\n" + format_table(rows, finetune_tokens))
    print(f"\nwrote {out}/ (models, {RESULTS_FILE}, {PLOT_FILE}) in {results['wall_seconds']:.0f} s")
    return results


def _fidelity_summary(report: dict) -> dict:
    return {
        "max_abs_logit_diff": report["max_abs_logit_diff"],
        "max_mlp_relative_error": report["max_mlp_relative_error"],
        "perplexity": report.get("perplexity"),
    }
