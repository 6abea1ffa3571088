"""hf_glu.finetune: the distillation loss and its gradient-accumulation exactness, data, checkpoints, and the strict
JSON its results are written in."""

import json
import math

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

from hf_glu import GluForCausalLM, finetune
from hf_glu.finetune import (
    DistillationTrainer,
    build_datasets_from_args,
    check_checkpoint,
    check_finetune_args,
    checkpoint_step,
    distillation_loss,
    finetune_arg_parser,
    latest_checkpoint,
    load_model_and_tokenizer,
    perplexity_from_loss,
    token_loss_sums,
)
from hf_glu.jsonio import write_json

from helpers import one_sgd_step_args, ragged_rows, tiny_config


def _logits_and_labels(batch=3, length=10, vocab=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g)
    teacher = torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[1, 6:] = -100
    return student, teacher, labels


def _reference_kl(student, teacher, labels, temperature):
    """KL(teacher‖student) per target token, written out term by term."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t] / temperature, -1)
            q = torch.softmax(student[b, t] / temperature, -1)
            total += (p * (p.log() - q.log())).sum()
            count += 1
    return total / count


def test_distillation_loss_mixes_ce_and_tempered_kl():
    student, teacher, labels = _logits_and_labels()
    ce = torch.tensor(2.5)
    assert distillation_loss(student, teacher, labels, ce, alpha=0.0) == pytest.approx(2.5)
    kl = _reference_kl(student, teacher, labels, temperature=2.0)
    mixed = distillation_loss(student, teacher, labels, ce, alpha=0.25, temperature=2.0)
    assert mixed.item() == pytest.approx(0.75 * 2.5 + 0.25 * 4.0 * kl.item(), rel=1e-5)
    same = distillation_loss(student, student, labels, ce, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_with_num_items_sums_to_the_full_batch_value():
    student, teacher, labels = _logits_and_labels()
    n = int((labels[:, 1:] != -100).sum())
    full = distillation_loss(student, teacher, labels, torch.tensor(0.0), alpha=1.0)
    parts = [
        distillation_loss(student[s], teacher[s], labels[s], torch.tensor(0.0), alpha=1.0, num_items_in_batch=n)
        for s in (slice(0, 1), slice(1, 3))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(alpha=1.5), dict(alpha=0.5, temperature=0.0)])
def test_distillation_loss_rejects_bad_settings(kwargs):
    student, teacher, labels = _logits_and_labels()
    with pytest.raises(ValueError, match="expected a number"):
        distillation_loss(student, teacher, labels, torch.tensor(0.0), **kwargs)


def _distil_one_step(tmp_path, student, teacher, rows, batch, accumulation):
    args = one_sgd_step_args(tmp_path / f"b{batch}a{accumulation}", batch, accumulation)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        teacher=teacher,
        kd_alpha=0.6,
        kd_temperature=2.0,
    )
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


def test_distillation_trainer_is_exact_under_gradient_accumulation(tmp_path):
    config = tiny_config()
    teacher = GluForCausalLM(tiny_config(glu_variant="geglu")).eval()
    state = GluForCausalLM(config).state_dict()
    rows = ragged_rows()
    batch = default_data_collator(rows)

    reference = GluForCausalLM(config)
    reference.load_state_dict(state)
    with torch.no_grad():
        out = reference(**batch)
        expected = distillation_loss(
            out.logits,
            teacher(input_ids=batch["input_ids"]).logits,
            batch["labels"],
            out.loss,
            alpha=0.6,
            temperature=2.0,
        ).item()

    models = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = GluForCausalLM(config)
        model.load_state_dict(state)
        loss = _distil_one_step(tmp_path, model, teacher, rows, batch_size, accumulation)
        assert loss == pytest.approx(expected, rel=1e-4)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_distillation_trainer_evaluates_plain_cross_entropy(tmp_path):
    config = tiny_config()
    student, teacher = GluForCausalLM(config), GluForCausalLM(tiny_config(glu_variant="geglu"))
    rows = ragged_rows()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = DistillationTrainer(
        model=student, args=args, eval_dataset=rows, data_collator=default_data_collator, teacher=teacher, kd_alpha=1.0
    )
    with torch.no_grad():
        ce = student(**default_data_collator(rows)).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ce, rel=1e-5)


def test_token_loss_sums_match_the_mean_loss():
    model = GluForCausalLM(tiny_config())
    batch = default_data_collator(ragged_rows())
    with torch.no_grad():
        out = model(**batch)
    sums, counts = token_loss_sums(out.logits, batch["labels"])
    assert (sums.sum() / counts.sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert perplexity_from_loss(1e6) == float("inf")


def test_latest_checkpoint_skips_incomplete_folders(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20.partial").mkdir()
    assert latest_checkpoint(tmp_path, "trainer_state.json") == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-15"
    assert latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10
    with pytest.raises(ValueError, match="checkpoint-100"):
        checkpoint_step(tmp_path / "final")


@pytest.mark.parametrize("sources", [dict(), dict(model="a", convert_from="b")])
def test_load_model_and_tokenizer_needs_exactly_one_source(sources):
    with pytest.raises(ValueError, match="exactly one"):
        load_model_and_tokenizer(**sources)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shuffle-buffer", "8"], "--shuffle-buffer applies to --streaming only"),
        (["--eval-documents", "5"], "--eval-documents applies to --streaming only"),
        (["--streaming", "--eval-documents", "0"], "--eval-documents=0 is invalid; expected an integer >= 1"),
        (["--streaming", "--shuffle-buffer", "-1"], "--shuffle-buffer=-1 is invalid"),
        (["--preprocessing-workers", "0"], "--preprocessing-workers=0 is invalid"),
    ],
)
def test_data_flags_are_checked(flags, message, capsys):
    parser = finetune_arg_parser("test")
    with pytest.raises(SystemExit):  # a value below 1 is refused by the parser, a combination after it
        check_finetune_args(parser, parser.parse_args(["--model", "m", "--output-dir", "o", *flags]))
    assert message in capsys.readouterr().err


def test_stream_flags_reach_the_data_pipeline(monkeypatch):
    parser = finetune_arg_parser("test")
    seen = {}
    monkeypatch.setattr(finetune, "build_block_datasets", lambda tokenizer, block_size, **kwargs: seen.update(kwargs))
    build_datasets_from_args(None, parser.parse_args(["--model", "m", "--output-dir", "o", "--streaming"]))
    assert seen["streaming"] and seen["eval_documents"] == 100 and seen["shuffle_buffer"] == 0 and seen["endless"]
    args = parser.parse_args(["--model", "m", "--output-dir", "o", "--streaming", "--shuffle-buffer", "8"])
    build_datasets_from_args(None, args, rank=1, world_size=2)
    assert (seen["shuffle_buffer"], seen["rank"], seen["world_size"]) == (8, 1, 2)


def test_check_checkpoint_names_a_damaged_state_file(tmp_path):
    torch.save({"step": torch.arange(1000)}, tmp_path / "optimizer.pt")
    (tmp_path / "trainer_state.json").write_text("{}")
    check_checkpoint(tmp_path)  # complete: accepted
    state = (tmp_path / "optimizer.pt").read_bytes()
    (tmp_path / "optimizer.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(ValueError, match=r"checkpoint file '.*optimizer.pt' is damaged"):
        check_checkpoint(tmp_path)
    (tmp_path / "optimizer.pt").write_bytes(state)
    (tmp_path / "trainer_state.json").write_text('{"global_step": ')
    with pytest.raises(ValueError, match=r"checkpoint file '.*trainer_state.json' is damaged"):
        check_checkpoint(tmp_path)


def test_results_are_strict_json_with_null_for_a_diverged_loss(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"eval_loss": math.nan, "perplexity": math.inf, "log_history": [{"loss": -math.inf}, (1.5,)]})

    def refuse(constant):  # a bare NaN/Infinity in the file would reach this
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    assert loaded == {"eval_loss": None, "perplexity": None, "log_history": [{"loss": None}, [1.5]]}
    assert path.read_text(encoding="utf-8").endswith("}\n")
