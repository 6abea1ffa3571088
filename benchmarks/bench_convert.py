"""Conversion cost of a GPT-2-small-shaped (124M) or Pythia-160m-shaped (162M) checkpoint (random init, no
download).

Saves the checkpoint (+ a byte-level BPE tokenizer trained on the built-in corpus), then runs
`hf-glu convert` in a fresh process, as a user would, and measures its wall time and peak RSS
(`wait4`'s rusage of that process), the latter against the checkpoint's size on disk.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_convert.py [--variant geglu_tanh] [--runs 3] [--out FILE]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_convert.py --shape pythia-160m --variant geglu --runs 3

With several runs (each in its own process, so each peak is its own) the JSON gives every run, the
minimum and the median, and the 1-minute load average before each run: other jobs on the machine slow
the conversion down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from hf_glu.bad_input import OneLineParser
from hf_glu.data import builtin_corpus, train_bpe_tokenizer
from hf_glu.jsonio import strict_json, write_json

# name -> (model class, config, default results file)
SHAPES = {
    "gpt2-small": (GPT2LMHeadModel, GPT2Config, "bench_convert.json"),
    # EleutherAI/pythia-160m's config: the GPT-NeoX family (rotary on a quarter of each head, parallel residual)
    "pythia-160m": (
        GPTNeoXForCausalLM,
        lambda: GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25),
        "bench_convert_pythia160m.json",
    ),
}  # fmt: skip


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="geglu_tanh")
    parser.add_argument("--runs", type=int, default=1, help="conversions to time (default: 1)")
    parser.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/bench_convert*.json)")
    args = parser.parse_args()
    model_class, config_class, results_name = SHAPES[args.shape]
    out = Path(args.out) if args.out else Path(__file__).with_name(results_name)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, args.shape), Path(tmp, "glu")
        torch.manual_seed(0)
        model_class(config_class()).save_pretrained(src)
        train_bpe_tokenizer(builtin_corpus(200_000), vocab_size=4096).save_pretrained(src)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        command = [sys.executable, "-m", "hf_glu.cli", "convert", str(src), str(dst), "--variant", args.variant]
        command += ["--force"]
        runs = []
        for _ in range(args.runs):
            runs.append(_timed(command, size))
            report = json.loads((dst / "conversion_report.json").read_text())
    seconds = [r["convert_seconds"] for r in runs]
    peaks = [r["peak_rss_bytes"] for r in runs]
    result = {
        "shape": args.shape,
        "variant": args.variant,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "checkpoint_bytes": size,
        "convert_seconds": min(seconds),
        "convert_seconds_median": statistics.median(seconds),
        "peak_rss_bytes": min(peaks),
        "peak_rss_bytes_median": statistics.median(peaks),
        "peak_rss_over_checkpoint": round(min(peaks) / size, 2),
        "peak_rss_over_checkpoint_median": round(statistics.median(peaks) / size, 2),
        "runs": runs,
        "eval_tokens": report["eval_tokens"],
        "max_abs_logit_diff": report["max_abs_logit_diff"],
    }
    print(strict_json(result))
    write_json(out, result)


def _timed(command: list[str], size: int) -> dict:
    """One conversion in a fresh process: wall time and that process's own peak RSS (wait4's rusage;
    RUSAGE_CHILDREN would give the largest of all runs so far)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    peak = usage.ru_maxrss * 1024  # kB on Linux
    return {
        "convert_seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / size, 2),
        "load_average_1m_before": round(load, 2),
    }


if __name__ == "__main__":
    main()
