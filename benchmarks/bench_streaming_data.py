"""Peak memory of a streaming fine-tune as the corpus grows: the same steps on generated text files of
increasing size should need the same memory, because ``--streaming`` reads only what it trains on.

    python benchmarks/bench_streaming_data.py [--sizes-mb 50 500] [--steps 30] [--one-line] [--json out.json]

Builds a tiny GLU model and tokenizer offline, writes text files of the given sizes (the built-in corpus
repeated, each copy numbered), runs ``recipes/finetune_trainer.py --streaming`` on each in a fresh process
and reports that process's peak RSS (``wait4``'s ``ru_maxrss``, the recipe alone). ``--map-style`` also runs
the cached, non-streaming path on the smallest file, for contrast. ``--one-line`` also runs a file of the
smallest size holding the same text as ONE line after the held-out paragraphs (a single document of almost all
the file, no newline): a stream reads and packs a long document in pieces, so its peak should match that of the
short paragraphs. Both hold out the same first paragraphs (a stream holds out whole documents, never pieces).
"""

from __future__ import annotations

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
from hf_glu.bad_input import OneLineParser, PositiveInt  # noqa: E402
from hf_glu.data import builtin_corpus, train_bpe_tokenizer  # noqa: E402
from hf_glu.jsonio import write_json  # noqa: E402

EVAL_DOCUMENTS = 50  # paragraphs held out of the stream


def write_corpus(path: Path, n_chars: int) -> None:
    """The built-in corpus repeated until the file holds ``n_chars`` characters (the last paragraph cut there),
    every paragraph numbered by its copy. The corpus is ASCII but for a few dozen characters in 690,000, so the
    file's size in bytes is ``n_chars`` to a fraction of a percent."""
    paragraphs = [p for p in builtin_corpus().split("\n\n") if p.strip()]
    written = copy = 0
    with path.open("w", encoding="utf-8") as out:
        while written < n_chars:
            for paragraph in paragraphs:
                written += out.write(f"[{copy}] {paragraph}\n\n"[: n_chars - written])
                if written >= n_chars:
                    break
            copy += 1


def write_one_line(path: Path, megabytes: int) -> None:
    """The first EVAL_DOCUMENTS paragraphs of ``write_corpus``'s file (held out), then the built-in corpus
    repeated as one line up to ``megabytes`` MiB: every newline turned into a space."""
    paragraphs = [p for p in builtin_corpus().split("\n\n") if p.strip()]
    text = " ".join(p.replace("\n", " ") for p in paragraphs)
    target = megabytes << 20
    with path.open("w", encoding="utf-8") as out:
        written = sum(out.write(f"[0] {paragraph}\n\n") for paragraph in paragraphs[:EVAL_DOCUMENTS])
        copy = 0
        while written < target:
            piece = f"[{copy}] {text} "[: target - written]
            written += out.write(piece)
            copy += 1


def tiny_model(folder: Path) -> None:
    tokenizer = train_bpe_tokenizer(builtin_corpus(max_chars=200_000), vocab_size=1024)
    config = GluConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GluForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_recipe(
    model: Path, text: Path, output: Path, steps: int, streaming: bool, threads: int, eval_documents: int
) -> dict:
    command = [
        sys.executable, str(ROOT / "recipes" / "finetune_trainer.py"), "--model", str(model),
        "--train-file", str(text), "--output-dir", str(output), "--max-steps", str(steps),
        "--block-size", "128", "--batch-size", "8", "--save-steps", str(steps + 1), "--logging-steps", str(steps),
        "--data-cache-dir", str(output / "cache"),
    ]  # fmt: skip
    if streaming:
        command += ["--streaming", "--eval-documents", str(eval_documents)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the recipe failed on {text.name}:\n{stderr[-2000:]}")
    results = json.loads((output / "results.json").read_text())
    return {
        "corpus_mb": round(text.stat().st_size / 2**20, 1),
        "layout": "one line" if "one-line" in text.name else "paragraphs",
        "mode": "streaming" if streaming else "map-style",
        "steps": results["global_step"],
        "eval_documents": eval_documents if streaming else None,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "seconds": round(time.perf_counter() - start, 1),
        "eval_loss": results["eval_loss"],
    }


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--map-style", action="store_true", help="also run the non-streaming path on the smallest")
    parser.add_argument("--one-line", action="store_true", help="also stream the smallest size as one line")
    parser.add_argument("--threads", action=PositiveInt, default=1, help="the recipe's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_glu-bench-stream-") as tmp:
        tmp = Path(tmp)
        tiny_model(tmp / "model")
        for megabytes in sorted(args.sizes_mb):
            text = tmp / f"corpus-{megabytes}mb.txt"
            write_corpus(text, megabytes << 20)
            run = tmp / f"run-{megabytes}"
            rows.append(run_recipe(tmp / "model", text, run, args.steps, True, args.threads, EVAL_DOCUMENTS))
            if args.map_style and megabytes == min(args.sizes_mb):
                run = tmp / f"map-{megabytes}"
                rows.append(run_recipe(tmp / "model", text, run, args.steps, False, args.threads, EVAL_DOCUMENTS))
            text.unlink()
            if args.one_line and megabytes == min(args.sizes_mb):
                text = tmp / f"one-line-{megabytes}mb.txt"
                write_one_line(text, megabytes)
                run = tmp / f"line-{megabytes}"
                rows.append(run_recipe(tmp / "model", text, run, args.steps, True, args.threads, EVAL_DOCUMENTS))
                text.unlink()

    print("| corpus (MiB) | layout | mode | steps | peak RSS (MiB) | wall (s) |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        cells = [row[key] for key in ("corpus_mb", "layout", "mode", "steps", "peak_rss_mb", "seconds")]
        print("| " + " | ".join(map(str, cells)) + " |")
    streamed = [row for row in rows if row["mode"] == "streaming" and row["layout"] == "paragraphs"]
    growth = streamed[-1]["peak_rss_mb"] - streamed[0]["peak_rss_mb"]
    print(f"\npeak RSS from {streamed[0]['corpus_mb']} to {streamed[-1]['corpus_mb']} MiB of text: {growth:+.1f} MiB")
    summary = {"rows": rows, "streaming_rss_growth_mb": growth, "python": sys.version.split()[0]}
    line = [row for row in rows if row["layout"] == "one line"]
    if line:
        ratio = line[0]["peak_rss_mb"] / streamed[0]["peak_rss_mb"]
        print(f"one line vs paragraphs of {streamed[0]['corpus_mb']} MiB: peak RSS x{ratio:.3f}")
        summary["one_line_rss_ratio"] = round(ratio, 3)
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
