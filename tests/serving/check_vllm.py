"""Serve converted checkpoints with vLLM and check them against Transformers: `make test-vllm`.

For each family and GLU variant, a tiny source model is converted with hf_glu (``init="preserve"``), its
per-token log-probabilities are computed with Transformers (fp32), then the same folder is served by vLLM's
Transformers backend (``model_impl="transformers"``, CPU build) and its prompt log-probabilities must agree within
``--tolerance``. The engine's model is inspected too: vLLM's GLU fuser must have merged gate/up into one
``MergedColumnParallelLinear`` with an ``…AndMul`` activation exactly where vLLM has a kernel for the variant
(swiglu with β = 1, geglu, geglu_tanh); the other variants are served unfused. GPT-2, GPT-NeoX and OPT are
served with every variant, GPT-BigCode, Phi and StarCoder2 with swiglu. A family whose attention vLLM cannot
drive (GPT-Neo, GPT-J, Falcon) must be refused, converted, with vLLM's own "not compatible" message, as the stock
checkpoint is (not a KeyError from inside the model's code).

Runs in the venv `make test-vllm` builds (vLLM pins its own Transformers range), with HF_HUB_OFFLINE=1 and
VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process: the engine's model can be inspected, engines are built one after
another and freed). Not a pytest module (vLLM is not in the test venv); tests/serving/test_vllm_check.py tests its
pure-python parts. Prints one line per (family, variant) and ends with "N passed, M failed"; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The variants vLLM has an `…AndMul` kernel for (its GLU fuser maps the activation's exact class): SiLU (β = 1),
# GELU (erf) and GELU (tanh). glu, bilinear, reglu and gpt-oss's clamped form have no kernel there.
FUSED_VARIANTS = frozenset({"swiglu", "geglu", "geglu_tanh"})

VOCAB = 101
HIDDEN = 64
HEADS = 2  # head_dim 32: vLLM's CPU attention refuses 16
LAYERS = 2
MAX_POSITIONS = 64
KV_CACHE_BYTES = 64 * 2**20  # a few thousand tokens of these tiny models


def expect_fused(variant: str, beta: float = 1.0) -> bool:
    """Whether vLLM should fuse a ``variant`` MLP: a kernel exists for it, and for swiglu only with β = 1
    (``nn.SiLU``); any other β needs an activation class of its own, which vLLM does not map."""
    return variant in FUSED_VARIANTS and (variant != "swiglu" or beta == 1.0)


def token_logprobs_from_logits(logits, ids: Sequence[int]) -> list[float]:
    """Log-probability of each prompt token after the first, given the logits at every position (seq, vocab)."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return logp[:-1].gather(-1, target[:, None])[:, 0].tolist()


def token_logprobs_from_vllm(prompt_logprobs: Sequence[dict | None], ids: Sequence[int]) -> list[float]:
    """The prompt token's log-probability at each position after the first from vLLM's ``prompt_logprobs``
    (one ``{token_id: Logprob}`` per position, ``None`` for the first)."""
    out = []
    for position, token in enumerate(ids[1:], start=1):
        entry = prompt_logprobs[position]
        if entry is None or token not in entry:
            raise ValueError(f"vLLM returned no log-probability for prompt token {token} at position {position}")
        out.append(float(entry[token].logprob))
    return out


def max_abs_diff(reference: Iterable[Sequence[float]], served: Iterable[Sequence[float]]) -> float:
    """Largest |a - b| over every prompt and position; inf when the lengths differ or a value is not finite."""
    worst = 0.0
    for ref, got in zip(reference, served, strict=True):
        if len(ref) != len(got):
            return math.inf
        for a, b in zip(ref, got, strict=True):
            diff = abs(a - b)
            if not math.isfinite(diff):
                return math.inf
            worst = max(worst, diff)
    return worst


@dataclass
class MlpSummary:
    """What vLLM made of the model's MLPs: merged gate/up projections and the fused activations."""

    merged: int  # number of MergedColumnParallelLinear modules
    and_mul: tuple[str, ...]  # class names of the `…AndMul` activations, sorted, each once

    def fused(self, layers: int) -> bool:
        return self.merged == layers and bool(self.and_mul)


def summarize_mlps(model) -> MlpSummary:
    """Walk an ``nn.Module`` and count what vLLM's GLU fuser leaves behind (by class name, so this needs no vLLM)."""
    merged = 0
    and_mul = set()
    for module in model.modules():
        name = type(module).__name__
        if name == "MergedColumnParallelLinear":
            merged += 1
        elif name.endswith("AndMul"):
            and_mul.add(name)
    return MlpSummary(merged, tuple(sorted(and_mul)))


@dataclass
class Row:
    family: str
    variant: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return f"{verdict}  {self.family:<11} {self.variant:<16} {self.detail}  {self.seconds:.1f}s"


def summary_line(rows: Sequence[Row]) -> str:
    passed = sum(row.ok for row in rows)
    return f"{passed} passed, {len(rows) - passed} failed"


# -- tiny sources ------------------------------------------------------------------------------------------------


def _source_configs() -> dict[str, Callable]:
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "gpt2": lambda: tf.GPT2Config(
            **common, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=96,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=96,
            max_position_embeddings=MAX_POSITIONS, rotary_pct=0.5, use_parallel_residual=False,
        ),
        "opt": lambda: tf.OPTConfig(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=96, num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS, do_layer_norm_before=True, dropout=0.0,
        ),
        "gptj": lambda: tf.GPTJConfig(
            **common, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8,
            n_inner=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
            **common, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=96,
            multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        "phi": lambda: tf.PhiConfig(
            **common, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
        ),
        "falcon": lambda: tf.FalconConfig(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            new_decoder_architecture=True, num_kv_heads=1, ffn_hidden_size=96, bias=False,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "starcoder2": lambda: tf.Starcoder2Config(
            **common, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, use_bias=True, residual_dropout=0.0,
        ),
        "gpt_neo": lambda: tf.GPTNeoConfig(
            **common, max_position_embeddings=MAX_POSITIONS, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
            intermediate_size=96, attention_types=[[["global", "local"], 1]], window_size=8, resid_dropout=0.0,
            embed_dropout=0.0, attention_dropout=0.0,
        ),
    }  # fmt: skip


def tiny_source(family: str):
    """A tiny causal LM of ``family`` with weights spread wider than init, so log-probs are far from uniform."""
    import torch
    import transformers as tf

    config = _source_configs()[family]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=generator)
            elif "norm" not in name and "ln" not in name:
                param.normal_(0.0, 0.05, generator=generator)
    return model


# -- the check ---------------------------------------------------------------------------------------------------


def prompts(n: int = 2) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (length,), generator=generator).tolist() for length in (12, 23)[:n]]


def reference_logprobs(folder: Path, prompt_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token log-probs from Transformers, loaded as a user would (remote code, fp32)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out = [token_logprobs_from_logits(model(torch.tensor([ids])).logits[0], ids) for ids in prompt_ids]
    del model
    return out


def engine(folder: Path, memory_fraction: float):
    from vllm import LLM

    return LLM(
        model=str(folder),
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=memory_fraction,
        # An explicit KV cache size: by default vLLM's CPU worker sizes it as the reserved fraction of RAM minus
        # this process's RSS, which the earlier engines and references have grown, and refuses the next engine.
        # (It also skips a warm-up pass that only feeds that estimate.)
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_model_len=MAX_POSITIONS,
        max_num_seqs=4,
        seed=0,
    )


def served_logprobs(llm, prompt_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params, use_tqdm=False)
    return [token_logprobs_from_vllm(out.prompt_logprobs, ids) for out, ids in zip(outputs, prompt_ids, strict=True)]


class FuserLog(logging.Handler):
    """Collects the DEBUG lines of vLLM's Transformers-backend fusers, which say why an MLP was left unfused
    (vLLM logs nothing above DEBUG when it serves a GLU MLP unfused)."""

    LOGGER = "vllm.model_executor.models.transformers"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> FuserLog:
        # vLLM's first engine applies its logging config (dictConfig), which resets the level and handlers of every
        # logger below "vllm": apply the same (default) config first, so the engine finds it active and keeps ours.
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging_if_needed

        configure_logging_if_needed(LoggingConfig())

        logger = logging.getLogger(self.LOGGER)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def about_mlp(self) -> list[str]:
        """Why the GLU MLP was not fused: its failed trace or forward rewrite, or a missing kernel."""
        keys = ("Could not fully trace", "Attempted to fuse", "AndMul", "differ in size")
        return [line for line in self.lines if any(key in line for key in keys)]


def free(llm) -> None:
    """Stop the engine core now (not at some later collection) so the next engine starts from a clean slate."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def check_served(job: dict, folder: Path, prompt_ids, tolerance: float, memory_fraction: float) -> Row:
    family, variant, beta = job["family"], job["variant"], job["beta"]
    label = variant if beta == 1.0 else f"{variant}(β={beta:g})"
    start = time.perf_counter()
    try:
        with FuserLog() as log:
            llm = engine(folder, memory_fraction)
        try:
            # vLLM's public hook into the engine's nn.Module (in this process: multiprocessing is off).
            (summary,) = llm.apply_model(summarize_mlps)
            diff = max_abs_diff(job["reference"], served_logprobs(llm, prompt_ids))
        finally:
            free(llm)
    except Exception as error:  # one row per failure, the run goes on
        return Row(family, label, False, one_line(error), time.perf_counter() - start)
    fused = summary.fused(LAYERS)
    wanted = expect_fused(variant, beta)
    detail = (
        f"max|Δlogprob|={diff:.1e}  fused={'yes' if fused else 'no'} (expected {'yes' if wanted else 'no'};"
        f" merged={summary.merged}, act={','.join(summary.and_mul) or '-'})"
    )
    if fused != wanted and log.about_mlp():
        # Class paths shortened to module.Class: remote-code modules carry the folder's name and a hash.
        reasons = [re.sub(r"<class '[\w.]*?(\w+\.\w+)'>", r"\1", line)[:200] for line in log.about_mlp()[:3]]
        detail += "  vLLM: " + " | ".join(reasons)
    return Row(family, label, diff <= tolerance and fused == wanted, detail, time.perf_counter() - start)


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def refusal_message(error: BaseException) -> str | None:
    """vLLM's own refusal of a model class it cannot drive (wrapped by pydantic in a ValueError), else None."""
    if not isinstance(error, ValueError):
        return None
    lines = (line.strip().split(" [type=")[0] for line in str(error).splitlines())
    return next((line for line in lines if "is not compatible with vLLM" in line), None)


def check_refused(job: dict, folder: Path, memory_fraction: float) -> Row:
    """vLLM must refuse the checkpoint with its own clean message, not crash inside the model's code."""
    label = f"{job['variant']} (refused)"
    start = time.perf_counter()
    try:
        llm = engine(folder, memory_fraction)
    except Exception as error:
        message = refusal_message(error)
        detail = message or one_line(error)
        return Row(job["family"], label, message is not None, detail, time.perf_counter() - start)
    free(llm)
    return Row(job["family"], label, False, "served: vLLM was expected to refuse it", time.perf_counter() - start)


def prepare(
    folder: Path, families: Sequence[str], also: Sequence[str], refuse: Sequence[str], variants: Sequence[str]
) -> None:
    """Convert every checkpoint into ``folder`` and list them in ``folder/manifest.json`` (run in a child process:
    the serving process must not import hf_glu, see :func:`main`)."""
    import hf_glu
    from hf_glu.convert import convert_to_folder

    variants = list(variants or hf_glu.VARIANTS)
    jobs = []

    def convert(source, family: str, variant: str, served: bool) -> Path:
        name = f"{family}-{variant}"
        convert_to_folder(source, folder / name, variant)
        jobs.append(dict(family=family, variant=variant, beta=1.0, name=name, served=served))
        return folder / name

    for family in families:
        source = tiny_source(family)
        for variant in variants:
            convert(source, family, variant, served=True)
        if family == families[0] and "swiglu" in variants:
            # swiglu with β ≠ 1 is not nn.SiLU: vLLM has no kernel for it and must serve it unfused, correctly.
            name = f"{family}-swiglu-beta2"
            convert_to_folder(source, folder / name, "swiglu")
            config = json.loads((folder / name / "config.json").read_text())
            config["glu_beta"] = 2.0
            (folder / name / "config.json").write_text(json.dumps(config, indent=2))
            jobs.append(dict(family=family, variant="swiglu", beta=2.0, name=name, served=True))
    for family in also:
        convert(tiny_source(family), family, "swiglu", served=True)
    for family in refuse:
        source = tiny_source(family)
        # The stock checkpoint beside the converted one: vLLM must refuse both the same way.
        source.save_pretrained(folder / f"{family}-stock")
        jobs.append(dict(family=family, variant="stock", beta=1.0, name=f"{family}-stock", served=False))
        convert(source, family, "swiglu", served=False)
    manifest = dict(hf_glu=str(Path(hf_glu.__file__).parent), jobs=jobs)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="gpt2,gpt_neox,opt", help="comma-separated families to serve")
    parser.add_argument("--variants", default="", help="comma-separated GLU variants (default: every one)")
    parser.add_argument(
        "--also", default="gpt_bigcode,phi,starcoder2", help="more families to serve, with swiglu only (the fused path)"
    )
    # Their attention is not on Transformers' attention interface: vLLM's Transformers backend cannot drive them.
    parser.add_argument("--refuse", default="gpt_neo,gptj,falcon", help="families vLLM must refuse ('' for none)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |Δlogprob| allowed (fp32)")
    parser.add_argument("--memory-fraction", type=float, default=0.08, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the child's job: convert into this folder
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare, _names(args.families), _names(args.also), _names(args.refuse), _names(args.variants))
        return 0
    started = time.perf_counter()
    # Before vLLM is imported; the make target sets them too, this keeps a direct run right.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompt_ids = prompts()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hf-glu-vllm-") as tmp:
        # Converted in a child process: once hf_glu is imported its Auto registration hands vLLM the installed
        # package's classes; a user serving a checkpoint gets the modeling files copied into it (remote code).
        child = [sys.executable, __file__, "--prepare", tmp, "--families", args.families, "--also", args.also]
        subprocess.run([*child, "--refuse", args.refuse, "--variants", args.variants], check=True)
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
        import torch
        import transformers
        import vllm

        print(
            f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__},"
            f" checkpoints converted by {manifest['hf_glu']}",
            flush=True,
        )
        # Every Transformers reference before any engine: vLLM patches the remote-code classes it loads.
        jobs = manifest["jobs"]
        for job in jobs:
            job["reference"] = reference_logprobs(Path(tmp) / job["name"], prompt_ids) if job["served"] else None
        print(f"{len(jobs)} checkpoints converted, references computed in {time.perf_counter() - started:.0f}s")
        for job in jobs:
            folder = Path(tmp) / job["name"]
            if job["served"]:
                row = check_served(job, folder, prompt_ids, args.tolerance, args.memory_fraction)
            else:
                row = check_refused(job, folder, args.memory_fraction)
            rows.append(row)
            print(row.line(), flush=True)
        if "hf_glu" in sys.modules:  # the route users take was not the one checked
            rows.append(Row("-", "-", False, "hf_glu was imported: vLLM served its classes, not remote code", 0.0))
            print(rows[-1].line())
    print(f"total {time.perf_counter() - started:.0f}s")
    print(summary_line(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
