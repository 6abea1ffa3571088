"""Conversion cost of a GPT-2-small-shaped checkpoint (124M parameters, random init, no download).

Saves the checkpoint (+ a byte-level BPE tokenizer trained on the built-in corpus), then runs
`hf-glu convert` in a fresh process, as a user would, and measures its wall time and peak RSS
(`getrusage(RUSAGE_CHILDREN)`), the latter against the checkpoint's size on disk.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_convert.py [--variant geglu_tanh] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_glu.data import builtin_corpus, train_bpe_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="geglu_tanh")
    parser.add_argument("--out", default=str(Path(__file__).with_name("bench_convert.json")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "gpt2-small"), Path(tmp, "glu")
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(src)  # 124M parameters, GPT-2 small's shape
        train_bpe_tokenizer(builtin_corpus(200_000), vocab_size=4096).save_pretrained(src)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        command = [sys.executable, "-m", "hf_glu.cli", "convert", str(src), str(dst), "--variant", args.variant]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        report = json.loads((dst / "conversion_report.json").read_text())
    result = {
        "variant": args.variant,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "checkpoint_bytes": size,
        "convert_seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / size, 2),
        "eval_tokens": report["eval_tokens"],
        "max_abs_logit_diff": report["max_abs_logit_diff"],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
