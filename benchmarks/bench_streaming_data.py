"""Peak memory of a streaming fine-tune as the corpus grows: the same steps on generated text files of
increasing size should need the same memory, because ``--streaming`` reads only what it trains on.

    python benchmarks/bench_streaming_data.py [--sizes-mb 50 500] [--steps 30] [--json out.json]

Builds a tiny GLU model and tokenizer offline, writes text files of the given sizes (the built-in corpus
repeated, each copy numbered), runs ``recipes/finetune_trainer.py --streaming`` on each in a fresh process
and reports that process's peak RSS (``wait4``'s ``ru_maxrss``, the recipe alone). ``--map-style`` also runs
the cached, non-streaming path on the smallest file, for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hf_glu import GluConfig, GluForCausalLM  # noqa: E402
from hf_glu.convert.report import without_non_finite  # noqa: E402
from hf_glu.data import builtin_corpus, train_bpe_tokenizer  # noqa: E402


def write_corpus(path: Path, megabytes: int) -> None:
    """The built-in corpus repeated until the file holds ``megabytes`` MiB, every paragraph numbered."""
    paragraphs = [p for p in builtin_corpus().split("\n\n") if p.strip()]
    target = megabytes << 20
    written = 0
    with path.open("w", encoding="utf-8") as out:
        copy = 0
        while written < target:
            for paragraph in paragraphs:
                written += out.write(f"[{copy}] {paragraph}\n\n")
                if written >= target:
                    break
            copy += 1


def tiny_model(folder: Path) -> None:
    tokenizer = train_bpe_tokenizer(builtin_corpus(max_chars=200_000), vocab_size=1024)
    config = GluConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GluForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_recipe(model: Path, text: Path, output: Path, steps: int, streaming: bool) -> dict:
    command = [
        sys.executable, str(ROOT / "recipes" / "finetune_trainer.py"), "--model", str(model),
        "--train-file", str(text), "--output-dir", str(output), "--max-steps", str(steps),
        "--block-size", "128", "--batch-size", "8", "--save-steps", str(steps + 1), "--logging-steps", str(steps),
        "--data-cache-dir", str(output / "cache"),
    ]  # fmt: skip
    if streaming:
        command += ["--streaming", "--eval-documents", "50"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the recipe failed on {text.name}:\n{stderr[-2000:]}")
    results = json.loads((output / "results.json").read_text())
    return {
        "corpus_mb": round(text.stat().st_size / 2**20, 1),
        "mode": "streaming" if streaming else "map-style",
        "steps": results["global_step"],
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "seconds": round(time.perf_counter() - start, 1),
        "eval_loss": results["eval_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--map-style", action="store_true", help="also run the non-streaming path on the smallest")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_glu-bench-stream-") as tmp:
        tmp = Path(tmp)
        tiny_model(tmp / "model")
        for megabytes in sorted(args.sizes_mb):
            text = tmp / f"corpus-{megabytes}mb.txt"
            write_corpus(text, megabytes)
            rows.append(run_recipe(tmp / "model", text, tmp / f"run-{megabytes}", args.steps, streaming=True))
            if args.map_style and megabytes == min(args.sizes_mb):
                rows.append(run_recipe(tmp / "model", text, tmp / f"map-{megabytes}", args.steps, streaming=False))
            text.unlink()

    print("| corpus (MiB) | mode | steps | peak RSS (MiB) | wall (s) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['corpus_mb']} | {row['mode']} | {row['steps']} | {row['peak_rss_mb']} | {row['seconds']} |")
    streamed = [row for row in rows if row["mode"] == "streaming"]
    growth = streamed[-1]["peak_rss_mb"] - streamed[0]["peak_rss_mb"]
    print(f"\npeak RSS from {streamed[0]['corpus_mb']} to {streamed[-1]['corpus_mb']} MiB of text: {growth:+.1f} MiB")
    if args.json:
        summary = {"rows": rows, "streaming_rss_growth_mb": growth, "python": sys.version.split()[0]}
        args.json.write_text(json.dumps(without_non_finite(summary), indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
