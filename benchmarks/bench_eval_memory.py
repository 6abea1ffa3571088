"""Peak memory of ``hf-glu eval --max-tokens N`` as the text file grows: scoring the first N tokens of a 10 MB
file should need the memory of scoring them in a 100 KB one, because eval reads and tokenizes only the prefix
those tokens need, never the whole file.

    nice python benchmarks/bench_eval_memory.py [--sizes-kb 100 10240] [--max-tokens 256] [--repeats 3]

Builds a tiny GLU model and its tokenizer offline, writes text files of the given sizes (the built-in corpus
repeated, each copy numbered), runs ``python -m hf_glu.cli eval MODEL --text-file FILE --max-tokens N`` on each
in a fresh process and reports that process's peak RSS (``wait4``'s ``ru_maxrss``), the median of ``--repeats``
runs. The ratio largest / smallest must be at most ``--bound`` (1.10): exit status 1 otherwise. The JSON result
goes to ``benchmarks/results/bench_eval_memory.json`` unless ``--json`` says elsewhere.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_streaming_data.py: the same tiny model and text
from bench_streaming_data import tiny_model, write_corpus  # noqa: E402

from hf_glu.bad_input import OneLineParser, PositiveInt  # noqa: E402
from hf_glu.jsonio import write_json  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_eval_memory.json"


def run_eval(model: Path, text: Path, max_tokens: int, threads: int) -> dict:
    command = [sys.executable, "-m", "hf_glu.cli", "eval", str(model), "--text-file", str(text),
               "--max-tokens", str(max_tokens)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak, not this process's
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"hf-glu eval failed on {text.name}:\n{stderr[-2000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start, "result": json.loads(stdout)}


def main() -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=[100, 10_240])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the median peak is reported")
    parser.add_argument("--threads", action=PositiveInt, default=1, help="torch threads of eval (OMP_NUM_THREADS)")
    parser.add_argument("--bound", type=float, default=1.10, help="largest / smallest peak RSS allowed")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_glu-bench-eval-") as tmp:
        tmp = Path(tmp)
        tiny_model(tmp / "model")
        for kilobytes in sorted(args.sizes_kb):
            text = tmp / f"text-{kilobytes}kb.txt"
            write_corpus(text, kilobytes << 10)
            runs = [run_eval(tmp / "model", text, args.max_tokens, args.threads) for _ in range(args.repeats)]
            rows.append({
                "text_kb": round(text.stat().st_size / 1024, 1),
                "max_tokens": args.max_tokens,
                "tokens_scored": runs[0]["result"]["tokens"],
                "perplexity": runs[0]["result"]["perplexity"],
                "peak_rss_mb_runs": [round(run["peak_rss_mb"], 1) for run in runs],
                "peak_rss_mb": round(statistics.median(run["peak_rss_mb"] for run in runs), 1),
                "seconds": round(statistics.median(run["seconds"] for run in runs), 2),
            })  # fmt: skip
            text.unlink()

    print("| text (KiB) | --max-tokens | peak RSS (MiB), median | runs (MiB) | wall (s) |")
    print("| ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        print(f"| {row['text_kb']} | {row['max_tokens']} | {row['peak_rss_mb']} | {row['peak_rss_mb_runs']} | "
              f"{row['seconds']} |")  # fmt: skip
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    largest, smallest = rows[-1]["text_kb"], rows[0]["text_kb"]
    print(f"\npeak RSS {largest} KiB vs {smallest} KiB of text: x{ratio:.3f} (bound x{args.bound})")
    same_scores = len({(row["tokens_scored"], row["perplexity"]) for row in rows}) == 1
    summary = {
        "command": f"hf-glu eval MODEL --text-file FILE --max-tokens {args.max_tokens}",
        "rows": rows,
        "rss_ratio": round(ratio, 3),
        "bound": args.bound,
        "same_scores": same_scores,  # the same first tokens scored, whatever the file's size
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, summary)
    print(f"wrote {args.json}")
    return 0 if ratio <= args.bound and same_scores else 1


if __name__ == "__main__":
    sys.exit(main())
