"""Hostile and careless input to the fine-tuning recipes and their data path: every refusal is exit status 2 with
one line naming the input and what is accepted, and leaves the output folder as it was; damaged data or
checkpoints are repaired or refused, never trained on silently."""

import json
import logging
import os
import runpy
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import AutoTokenizer

import hf_glu
from hf_glu.training_data import build_block_datasets

from helpers import RECIPES, recipe_command

BOTH = ["finetune_trainer.py", "finetune_accelerate.py"]


def run_in_process(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run a recipe as ``python recipes/<script> ...`` does, in this process (no interpreter start-up);
    returns its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(RECIPES / script), run_name="__main__")
    finally:  # leave no Accelerate singletons behind for the next run
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return exit_info.value.code, capsys.readouterr().err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else ["<absent>"]


def assert_refused(status: int, stderr: str, script: str, *fragments: str) -> None:
    """Exit 2, no traceback, and the error in one line that holds every fragment."""
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def recipe_argv(script: str, assets: Path, out: Path, *args: str) -> list[str]:  # noqa: F811
    return recipe_command(script, assets, out, "--model", str(assets / "glu"), *args, launcher=())


@pytest.mark.parametrize("script", BOTH)
@pytest.mark.parametrize(("block", "expected"), [("0", "--block-size=0 is invalid"), ("65", "--block-size=65")])
def test_a_block_size_the_model_cannot_take_is_refused(assets, tmp_path, monkeypatch, capsys, script, block, expected):  # noqa: F811
    out = tmp_path / "out"
    argv = recipe_argv(script, assets, out, "--max-steps", "1")
    argv[argv.index("--block-size") + 1] = block
    status, stderr = run_in_process(script, argv, monkeypatch, capsys)
    assert_refused(status, stderr, script, expected, "expected an integer >= 2 and <= 64")
    assert listing(out) == ["<absent>"]


def test_accelerate_refuses_fewer_train_blocks_than_one_batch(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "out"
    script = "finetune_accelerate.py"
    status, stderr = run_in_process(
        script, recipe_argv(script, assets, out, "--batch-size", "4096"), monkeypatch, capsys
    )
    assert_refused(status, stderr, script, "fewer than one batch of --batch-size 4096", "smaller --batch-size")
    assert listing(out) == ["<absent>"]  # the folder is created only once every check has passed


@pytest.mark.parametrize("script", BOTH)
def test_resuming_from_a_damaged_checkpoint_names_the_file(assets, tmp_path, monkeypatch, capsys, script):  # noqa: F811
    out = tmp_path / "out"
    argv = recipe_argv(script, assets, out, "--max-steps", "2", "--save-steps", "2")
    assert run_in_process(script, argv, monkeypatch, capsys)[0] == 0
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    before = listing(out)
    status, stderr = run_in_process(script, [*argv[:-4], "--max-steps", "4", "--resume"], monkeypatch, capsys)
    assert_refused(status, stderr, script, f"checkpoint file '{weights}' is damaged", "without --resume")
    assert listing(out) == before


def test_tensor_parallel_degree_must_divide_the_heads(tmp_path, monkeypatch, capsys):
    model = tmp_path / "three-heads"
    hf_glu.GluForCausalLM(
        hf_glu.GluConfig(vocab_size=50, n_embd=24, n_head=3, n_layer=1, n_positions=32)
    ).save_pretrained(model)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc_per_node 2
    out = tmp_path / "out"
    argv = [str(RECIPES / "finetune_accelerate.py"), "--model", str(model), "--tp-size", "2", "--output-dir", str(out)]
    status, stderr = run_in_process("finetune_accelerate.py", argv, monkeypatch, capsys)
    assert_refused(status, stderr, "finetune_accelerate.py", "--tp-size=2 does not divide the 3 attention heads",
                   str(model), "expected one of [1, 3]")  # fmt: skip
    assert listing(out) == ["<absent>"]


def test_accelerate_reruns_into_a_folder_holding_an_older_checkpoint(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    script = "finetune_accelerate.py"
    out = tmp_path / "out"
    argv = recipe_argv(script, assets, out, "--max-steps", "2", "--save-steps", "2")
    assert run_in_process(script, argv, monkeypatch, capsys)[0] == 0
    old = (out / "checkpoint-2" / "model.safetensors").read_bytes()
    (out / "checkpoint-7.partial").mkdir()  # left by a run killed mid-save
    status, stderr = run_in_process(script, [*argv, "--seed", "1"], monkeypatch, capsys)
    assert status == 0, stderr[-3000:]
    assert not list(out.glob("*.partial"))  # its own save's and the dead run's
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() != old  # this run's checkpoint replaced it


def test_rows_without_the_text_field_are_refused_naming_the_first(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    rows = [{"text": "A first document."}, {"body": "no text here"}, {"text": None}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "out"
    script = "finetune_accelerate.py"
    argv = recipe_argv(script, assets, out, "--data-cache-dir", str(tmp_path / "cache"))
    argv[argv.index("--train-file") + 1] = str(data)
    status, stderr = run_in_process(script, argv, monkeypatch, capsys)
    assert_refused(status, stderr, script, f"{data}: row 2 (counting from 1) has no 'text' field", "--text-column")
    assert listing(out) == ["<absent>"]
    tokenizer = AutoTokenizer.from_pretrained(assets / "glu")
    with pytest.raises(ValueError, match="row 2 .* has no 'text' field"):  # a stream: as it is read
        train, _ = build_block_datasets(tokenizer, 8, train_file=data, streaming=True, eval_documents=1)
        next(iter(train))


def test_a_damaged_packing_cache_is_rebuilt_with_one_line_naming_it(assets, tmp_path, caplog):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(assets / "glu")

    def blocks() -> tuple[list[list[int]], Path]:
        train, _ = build_block_datasets(tokenizer, 8, train_file=assets / "train.txt", cache_dir=tmp_path / "cache")
        return train[:]["input_ids"].tolist(), Path(train.cache_files[0]["filename"])

    expected, arrow = blocks()
    with pa.memory_map(str(arrow)) as source:
        batches = list(pa.ipc.open_stream(source))
    assert len(batches) > 1
    sink = pa.BufferOutputStream()  # the file as if cut after its first batch: it reads without an error
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        writer.write_batch(batches[0])
    cut_short = sink.getvalue().to_pybytes()
    for damaged, reason in ((cut_short, f"{batches[0].num_rows} blocks where {len(expected)} were written"),
                            (cut_short[:-100], "Expected to be able to read")):  # fmt: skip
        replacement = arrow.with_suffix(".tmp")
        replacement.write_bytes(damaged)
        os.replace(replacement, arrow)  # a new file: the memory map of the first read stays valid
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_glu.training_data"):
            assert blocks() == (expected, arrow)
        (line,) = [record.getMessage() for record in caplog.records]
        assert line.startswith(f"packing cache {arrow} is damaged (") and reason in line, line
        assert line.endswith("; rebuilding it")


@pytest.mark.parametrize("script", BOTH)
@pytest.mark.parametrize(
    ("other", "difference"),
    [
        ("pythia", "tensor(s) this model has no place for, e.g. gpt_neox."),  # another family
        ("--lora", "it lacks 28 of this model's tensors, e.g. base_model.model.transformer.h.0.attn.k_proj.lora_A"),
        ("saved with --lora", "lora_A"),  # an adapter's checkpoint, the whole model trained now
    ],
)
def test_resuming_from_another_model_s_checkpoint_names_it_and_the_difference(
    assets, tmp_path, monkeypatch, capsys, script, other, difference  # noqa: F811
):
    """--resume from a checkpoint another model wrote: exit 2, one line naming the checkpoint and what differs
    (it was a traceback: Accelerate's size mismatch, or torch's "parameter group that doesn't match" under Trainer),
    the folder as it was."""
    out = tmp_path / "out"
    model = assets / "pythia" if other == "pythia" else assets / "glu"
    argv = recipe_command(script, assets, out, "--model", str(model), "--max-steps", "2", "--save-steps", "2",
                          *(["--lora"] if other == "saved with --lora" else []), launcher=())  # fmt: skip
    assert run_in_process(script, argv, monkeypatch, capsys)[0] == 0
    before = listing(out)
    again = recipe_argv(script, assets, out, "--max-steps", "4", "--save-steps", "2", "--resume")
    again += ["--lora"] if other == "--lora" else []
    status, stderr = run_in_process(script, again, monkeypatch, capsys)
    assert_refused(status, stderr, script, f"checkpoint '{out / 'checkpoint-2'}' was saved from another model",
                   difference, "without --resume")  # fmt: skip
    assert listing(out) == before


def test_a_sharded_checkpoint_of_another_model_is_refused_naming_the_difference(assets, tmp_path):  # noqa: F811
    """The sharded (TP/FSDP) route's checkpoint, a torch.distributed.checkpoint: its tensors' global shapes are
    read from its metadata and compared before any shard is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import AutoModelForCausalLM

    from hf_glu.finetune import check_checkpoint_fits

    glu = AutoModelForCausalLM.from_pretrained(assets / "glu")
    wider = hf_glu.GluForCausalLM(hf_glu.GluConfig(**{**glu.config.to_dict(), "n_inner": 64}))
    checkpoint = tmp_path / "checkpoint-2"
    optimizer = torch.optim.AdamW(glu.parameters())
    model_state, optimizer_state = get_state_dict(glu, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint))
    check_checkpoint_fits(checkpoint, glu)  # its own model: accepted
    with pytest.raises(ValueError) as refused:
        check_checkpoint_fits(checkpoint, wider)
    assert f"checkpoint '{checkpoint}' was saved from another model: " in str(refused.value)
    assert "transformer.h.0.mlp.gate_proj.weight is [48, 32] there, [64, 32] here" in str(refused.value)


@pytest.mark.parametrize("script", BOTH)
def test_a_bad_flag_value_is_one_line_without_the_usage_block(assets, tmp_path, monkeypatch, capsys, script):  # noqa: F811
    out = tmp_path / "out"
    status, stderr = run_in_process(script, recipe_argv(script, assets, out, "--max-steps", "0"), monkeypatch, capsys)
    assert_refused(status, stderr, script, "--max-steps=0 is invalid", "expected an integer >= 1")
    assert len(stderr.strip().splitlines()) == 1, stderr  # argparse's usage block is not repeated before it
    assert listing(out) == ["<absent>"]
