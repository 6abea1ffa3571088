"""recipes/finetune_accelerate.py with --tp-size 2 and --fsdp-size 2 on two CPU processes (gloo, torchrun), for a
GLU GPT-2 and a converted Pythia (GPT-NeoX): the per-step losses equal the one-process recipe's, a sharded
checkpoint written at step 2 resumes to the same step-3 loss, and final/ loads in one process with the logits of
the trained sharded model. One python launch runs the one-process references, one torchrun launch every sharded run.

Tolerances: the sharded runs do the one-process arithmetic in another order (TP all-reduces partial matmul
sums, FSDP2 reduce-scatters the gradients of two half-batches), which moves fp32 results by ~1e-7 relative;
four AdamW steps on that stay within 1e-5 of the one-process losses. A resumed run repeats the same sharded
arithmetic from restored state, so its step-3 and step-4 losses and its final eval loss must match to 1e-6. final/
holds the gathered weights exactly: its logits match the sharded model's to 1e-5 (matmul order only)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import hf_glu
from hf_glu.data import builtin_corpus, train_bpe_tokenizer
from hf_glu.finetune import check_finetune_args, finetune_arg_parser

SCRIPT = Path(__file__).parent / "run_recipe_jobs.py"
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BATCH = 4  # per process; an FSDP2=2 run's global batch is 2 * BATCH, a TP=2 run's BATCH (both ranks see it)
MODES = {"tp": ["--tp-size", "2"], "fsdp": ["--fsdp-size", "2"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A GLU GPT-2 with its head tied to the embedding (as GPT-2) and a GLU Pythia converted from a tiny GPT-NeoX
    (untied, as Pythia), without dropout, saved with one BPE tokenizer; a text file; token ids for the logits
    check."""
    root = tmp_path_factory.mktemp("sharded_recipe_assets")
    text = builtin_corpus(max_chars=20_000)
    (root / "train.txt").write_text(text, encoding="utf-8")
    tokenizer = train_bpe_tokenizer(text, vocab_size=300)
    ids = dict(bos_token_id=0, eos_token_id=0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # masks differ once activations are split
    torch.manual_seed(0)
    glu = hf_glu.GluConfig(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                           pad_token_id=0, tie_word_embeddings=True, **ids, **no_dropout)  # fmt: skip
    hf_glu.GluForCausalLM(glu).save_pretrained(root / "glu")
    neox = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25, tie_word_embeddings=False,
                         **ids)  # fmt: skip
    GPTNeoXForCausalLM(neox).save_pretrained(root / "pythia")
    tokenizer.save_pretrained(root / "pythia")
    hf_glu.convert_checkpoint(root / "pythia", "geglu", eval_tokens=16, tokenizer=tokenizer).save_pretrained(
        root / "neox"
    )
    for name in ("glu", "neox"):
        tokenizer.save_pretrained(root / name)
    torch.save(torch.randint(1, len(tokenizer), (2, 16)), root / "ids.pt")
    return root


def recipe_argv(assets: Path, model: str, output_dir: Path, batch: int, *extra: str) -> list[str]:
    return ["--model", str(assets / model), "--train-file", str(assets / "train.txt"), "--block-size", "32",
            "--eval-fraction", "0.2", "--lr", "3e-3", "--batch-size", str(batch), "--max-steps", "4",
            "--save-steps", "2", "--logging-steps", "1", "--output-dir", str(output_dir), *extra]  # fmt: skip


def launch(launcher: list[str], assets: Path, jobs: list[dict], name: str) -> None:
    spec = assets / f"{name}.json"
    spec.write_text(json.dumps({"ids": str(assets / "ids.pt"), "jobs": jobs}))
    done = subprocess.run([*launcher, str(SCRIPT), str(spec)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(assets):
    """One-process references (the Accelerate path: TP=2 sees BATCH per step, FSDP2=2 sees 2 * BATCH, and the
    seeded sampler orders the blocks as the two-process DistributedSampler does), then every sharded run and its
    resume from checkpoint-2 (checkpoint-4 deleted first) in one torchrun launch."""
    references, sharded = [], []
    for model in ("glu", "neox"):
        for mode, flags in MODES.items():
            batch = BATCH if mode == "tp" else 2 * BATCH
            references.append({"argv": recipe_argv(assets, model, assets / f"one-{model}-{mode}", batch), "tag": "run"})
            out = assets / f"{model}-{mode}"
            sharded.append({"argv": recipe_argv(assets, model, out, BATCH, *flags), "tag": "run"})
            resume = recipe_argv(assets, model, out, BATCH, *flags, "--resume")
            sharded.append({"argv": resume, "tag": "resumed", "remove": [str(out / "checkpoint-4")]})
    # A stream under FSDP2: each process reads its own part of the documents (and a resume reads up to step 2).
    out = assets / "glu-fsdp-stream"
    stream = recipe_argv(assets, "glu", out, BATCH, *MODES["fsdp"], "--streaming", "--eval-documents", "20")
    sharded.append({"argv": stream, "tag": "run", "record_blocks": True})
    sharded.append({"argv": [*stream, "--resume"], "tag": "resumed", "remove": [str(out / "checkpoint-4")]})
    launch([sys.executable], assets, references, "references")
    launch([TORCHRUN, "--nproc_per_node", "2"], assets, sharded, "sharded")
    return assets


def losses(results_file: Path) -> list[float]:
    return [h["loss"] for h in json.loads(results_file.read_text())["log_history"] if "loss" in h]


@pytest.mark.parametrize("model", ["glu", "neox"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_sharded_recipe_trains_as_one_process(runs, model, mode):
    sharded = json.loads((runs / f"{model}-{mode}" / "results-run.json").read_text())
    assert sharded["num_processes"] == 2 and sharded["global_step"] == 4
    one = runs / f"one-{model}-{mode}" / "results-run.json"
    assert losses(runs / f"{model}-{mode}" / "results-run.json") == pytest.approx(losses(one), abs=1e-5)


@pytest.mark.parametrize("model", ["glu", "neox"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_sharded_checkpoint_resumes_to_the_same_third_step(runs, model, mode):
    out = runs / f"{model}-{mode}"
    checkpoint = out / "checkpoint-2"
    assert {"state.json", "scheduler.pt", "rng-rank0.pt", "rng-rank1.pt", ".metadata"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per process
    assert not list(out.glob("*.partial"))
    resumed = json.loads((out / "results-resumed.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert losses(out / "results-resumed.json") == pytest.approx(losses(out / "results-run.json")[2:], abs=1e-6)
    # The step-3 loss depends on the restored weights alone, the step-4 loss also on the optimizer moments (and
    # the learning rate, which the optimizer state holds), the eval loss after step 4 also on the scheduler.
    first = json.loads((out / "results-run.json").read_text())
    assert resumed["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("model", ["glu", "neox"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_final_folder_loads_in_one_process_with_the_sharded_logits(runs, model, mode):
    final = runs / f"{model}-{mode}" / "final"
    # FSDP2's generated class must not leak into the folder: auto_map names our modules, no torch sources copied.
    config = json.loads((final / "config.json").read_text())
    assert not config["auto_map"]["AutoModelForCausalLM"].startswith("_fsdp")
    assert not list(final.glob("_fsdp*.py"))
    assert (final / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        logits = loaded(torch.load(runs / "ids.pt")).logits
    expected = torch.load(runs / f"{model}-{mode}" / "sharded-logits-resumed.pt")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_streamed_fsdp_processes_train_on_disjoint_blocks_and_resume(runs):
    out = runs / "glu-fsdp-stream"
    blocks = [json.loads((out / f"blocks-run-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(blocks[0]) == len(blocks[1]) == 4 * BATCH  # 4 steps of BATCH blocks on each process
    assert not {tuple(b) for b in blocks[0]} & {tuple(b) for b in blocks[1]}
    first = losses(out / "results-run.json")
    assert len(first) == 4 and all(math.isfinite(loss) for loss in first)
    resumed = json.loads((out / "results-resumed.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert losses(out / "results-resumed.json") == pytest.approx(first[2:], abs=1e-6)


@pytest.mark.parametrize(
    ("world_size", "flags", "message"),
    [
        ("1", ["--tp-size", "0"], "--tp-size=0 is invalid"),
        ("1", ["--fsdp-size", "2"], "must equal the number of processes (1)"),
        ("4", ["--tp-size", "2", "--fsdp-size", "3"], "must equal the number of processes (4)"),
        ("2", ["--tp-size", "2", "--lora"], "--lora is not supported with --tp-size/--fsdp-size"),
    ],
)
def test_sharding_flags_are_checked(world_size, flags, message, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    parser = finetune_arg_parser("test")
    with pytest.raises(SystemExit):  # a value below 1 is refused by the parser, a combination after it
        check_finetune_args(parser, parser.parse_args(["--model", "m", "--output-dir", "o", *flags]))
    assert message in capsys.readouterr().err
