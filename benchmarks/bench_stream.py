"""Streaming conversion (`hf-glu convert --no-eval`, or `--max-memory SIZE` with the full fidelity report) of a
checkpoint larger than we would like in memory.

Writes a random Pythia-1.4B-shaped GPT-NeoX checkpoint (1.41B parameters, bf16, ~2.8 GB) in ~1 GB
safetensors shards, tensor by tensor (the generator never holds the model either), then converts it in a
fresh process as a user would and measures the wall time and that process's peak RSS (wait4's rusage)
against the checkpoint's size. The goal is a peak under half the checkpoint. The checkpoint is written by a
child process too: Linux carries a parent's resident size at fork into the child's peak (``ru_maxrss``), so
a parent that held the generated weights would inflate the figure.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_stream.py [--variant geglu] [--out FILE]
    HF_HUB_OFFLINE=1 nice .venv/bin/python benchmarks/bench_stream.py --max-memory 1GB  # bench_stream_max_memory.json

With ``--max-memory`` the conversion runs the layer-by-layer fidelity pass (max |Δlogit|, perplexities of source
and converted, per-layer MLP error, in bf16 as Transformers loads the checkpoint), and its figures are recorded
beside the peak RSS and wall time.

Needs ~6 GB of free disk in the temporary folder (source and result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_glu.bad_input import OneLineParser
from hf_glu.convert.safetensors_io import Planned, write_streamed
from hf_glu.jsonio import strict_json, write_json

SHARD_BYTES = 1 << 30


def pythia_1_4b() -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192,
        max_position_embeddings=2048, rotary_pct=0.25, dtype="bfloat16",
    )  # fmt: skip


def write_random_checkpoint(folder: Path) -> int:
    """A random checkpoint of the shape in ~1 GB shards, written one tensor at a time; returns its size."""
    config = pythia_1_4b()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPTNeoXForCausalLM(config).state_dict().items()}
    shards: list[list[Planned]] = [[]]
    size = 0
    for index, (name, shape) in enumerate(shapes.items()):
        generator = torch.Generator().manual_seed(index)
        produce = lambda shape=shape, g=generator: (torch.randn(shape, generator=g) * 0.02).bfloat16()  # noqa: E731
        planned = Planned(name, shape, torch.bfloat16, produce)
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + planned.nbytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append(planned)
        size += planned.nbytes
    weight_map = {}
    folder.mkdir(parents=True)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streamed(folder / name, shard, metadata={"format": "pt"})
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    write_json(folder / "model.safetensors.index.json", index)
    config.architectures = ["GPTNeoXForCausalLM"]
    config.save_pretrained(folder)
    return size


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="geglu")
    parser.add_argument("--out", default=None, help="(default: bench_stream.json, with --max-memory "
                        "bench_stream_max_memory.json, beside this script)")  # fmt: skip
    parser.add_argument("--max-memory", default=None, metavar="SIZE", help="measure the full report layer by layer")
    parser.add_argument("--eval-tokens", type=int, default=None, help="with --max-memory (default: the CLI's, 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the conversion (OMP_NUM_THREADS)")
    parser.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)  # the child that writes the source
    args = parser.parse_args()
    if args.generate:
        print(write_random_checkpoint(Path(args.generate)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "pythia-1.4b"), Path(tmp, "glu")
        generated = subprocess.run([sys.executable, __file__, "--generate", str(src)], capture_output=True, text=True)
        if generated.returncode:
            raise SystemExit(f"generating the checkpoint failed:\n{generated.stderr[-3000:]}")
        size = int(generated.stdout.split()[-1])
        command = [sys.executable, "-m", "hf_glu.cli", "convert", str(src), str(dst), "--variant", args.variant]
        if args.max_memory is None:
            command.append("--no-eval")
        else:
            command += ["--max-memory", args.max_memory]
            command += [] if args.eval_tokens is None else ["--eval-tokens", str(args.eval_tokens)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = str(args.threads)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"conversion failed: {' '.join(command)}")
        output = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        shards = len(list(src.glob("*.safetensors")))
        report = json.loads((dst / "conversion_report.json").read_text())
    peak = usage.ru_maxrss * 1024
    result = {
        "shape": "pythia-1.4b (GPT-NeoX), bf16, random",
        "variant": args.variant,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "checkpoint_bytes": size,
        "source_shards": shards,
        "output_bytes": output,
        "convert_seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / size, 3),
        "goal_peak_under_half_checkpoint": peak < size / 2,
        "load_average_1m_before": round(load, 2),
        "command": "hf-glu " + " ".join(command[3:]).replace(str(Path(tmp)), "$TMP"),
        "threads": args.threads,
    }
    if args.max_memory is not None:  # the report's figures, measured layer by layer
        keys = ("dtype", "eval_tokens", "max_abs_logit_diff", "max_mlp_relative_error", "perplexity", "fidelity_pass")
        result["fidelity"] = {key: report[key] for key in keys}
    else:
        result["fidelity"] = report["evaluation"]
    print(strict_json(result))
    default = "bench_stream.json" if args.max_memory is None else "bench_stream_max_memory.json"
    write_json(args.out or Path(__file__).with_name(default), result)


if __name__ == "__main__":
    main()
