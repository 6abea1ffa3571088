"""The fine-tuning recipes end to end on CPU, in subprocesses as a user runs them: loss falls,
checkpoints are written and a SIGKILLed run resumes from one, two-process DDP keeps the ranks in
step, LoRA saves a reloadable adapter, distillation changes the loss; and the accelerate configs
hold only keys accelerate accepts."""

import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from transformers import AutoModelForCausalLM

import hf_glu
from hf_glu.data import builtin_corpus
from hf_glu.finetune import checkpoint_step, latest_checkpoint, weights_digest

from helpers import RECIPES, REPO, recipe_command

CONFIGS = RECIPES / "accelerate_configs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMEOUT = 300


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def train_losses(log_history: list[dict]) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h]


def assert_final_folder_loads(output_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    assert isinstance(model, hf_glu.GluForCausalLM)
    assert (output_dir / "final" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    return model


def kill_after_first_checkpoint(command: list[str], output_dir: Path, marker: str | None) -> int:
    """Start ``command``, SIGKILL it once a complete checkpoint exists, return the step it resumes from."""
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while latest_checkpoint(output_dir, marker) is None:
            assert process.poll() is None, f"the run ended before a checkpoint:\n{process.stderr.read()[-5000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed: raise --max-steps"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return checkpoint_step(latest_checkpoint(output_dir, marker))


@pytest.mark.parametrize(
    ("script", "marker"), [("finetune_trainer.py", "trainer_state.json"), ("finetune_accelerate.py", None)]
)
def test_recipe_trains_and_resumes_after_sigkill(assets, tmp_path, script, marker):
    max_steps = 150
    args = ["--model", str(assets / "glu"), "--max-steps", str(max_steps), "--save-steps", "10"]
    args += ["--logging-steps", "5", "--grad-accum", "2"]
    command = recipe_command(script, assets, tmp_path, *args)
    saved_step = kill_after_first_checkpoint(command, tmp_path, marker)
    assert 10 <= saved_step < max_steps
    assert not (tmp_path / "final").exists()

    resumed = run([*command, "--resume"])
    assert f"resuming from {tmp_path / f'checkpoint-{saved_step}'} (step {saved_step})" in resumed.stdout
    report = results(tmp_path)
    assert report["resumed_from_step"] == saved_step
    assert report["global_step"] == max_steps
    steps = [h["step"] for h in report["log_history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps  # no step trained twice
    if script == "finetune_accelerate.py":  # its log holds only this run's steps: it started after the checkpoint
        assert steps[0] == saved_step + 5
    losses = train_losses(report["log_history"])
    assert losses[-1] < losses[0] - 0.3
    assert report["perplexity"] == pytest.approx(math.exp(report["eval_loss"]))
    assert latest_checkpoint(tmp_path, marker) == tmp_path / f"checkpoint-{max_steps}"
    assert_final_folder_loads(tmp_path)


def streaming_command(script: str, assets: Path, output_dir: Path, text: Path, *args: str) -> list[str]:
    command = recipe_command(script, assets, output_dir, "--model", str(assets / "glu"), "--streaming", *args)
    command[command.index("--train-file") + 1] = str(text)
    return command


@pytest.mark.parametrize("script", ["finetune_trainer.py", "finetune_accelerate.py"])
def test_streaming_recipe_trains_and_resumes_to_the_same_losses(assets, tmp_path, script):
    # A stream of 23 blocks (under 6 batches), 8 steps: the run goes round it, and the resumed run must find its
    # place again in the second pass (the Trainer skips batches within one "epoch": the recipes' stream never ends).
    text = tmp_path / "short.txt"
    text.write_text(builtin_corpus(max_chars=1_500), encoding="utf-8")
    out = tmp_path / "out"
    args = ["--eval-documents", "2", "--shuffle-buffer", "8", "--max-steps", "8", "--save-steps", "3"]
    command = streaming_command(script, assets, out, text, *args, "--logging-steps", "1", "--save-total-limit", "5")
    run(command)
    first = results(out)
    assert first["global_step"] == 8 and math.isfinite(first["eval_loss"])
    for later_checkpoint in out.glob("checkpoint-*"):
        if checkpoint_step(later_checkpoint) > 3:
            shutil.rmtree(later_checkpoint)
    run([*command, "--resume"])
    resumed = results(out)
    assert resumed["resumed_from_step"] == 3
    later = [h["loss"] for h in resumed["log_history"] if "loss" in h and h["step"] > 3]
    assert later == pytest.approx(train_losses(first["log_history"])[3:], abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)


def test_accelerate_recipe_without_a_checkpoint_saves_into_a_new_output_dir(assets, tmp_path):
    out = tmp_path / "new" / "run"  # does not exist yet, and no checkpoint will create it
    run(recipe_command("finetune_accelerate.py", assets, out, "--model", str(assets / "glu"), "--max-steps", "2",
                       "--save-steps", "100"))  # fmt: skip
    assert not list(out.glob("checkpoint-*")) and results(out)["global_step"] == 2
    assert_final_folder_loads(out)


@pytest.mark.parametrize("script", ["finetune_trainer.py", "finetune_accelerate.py"])
def test_a_stream_held_out_entirely_is_refused_in_one_line(assets, tmp_path, script):
    command = streaming_command(script, assets, tmp_path / "out", assets / "train.txt", "--eval-documents", "100000")
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{script}: error: the training stream makes no full block after the first 100000 documents" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_accelerate_recipe_two_process_ddp_keeps_ranks_identical(assets, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--model", str(assets / "glu"), "--max-steps", "20", "--save-steps", "10", "--logging-steps", "5"]
    run(recipe_command("finetune_accelerate.py", assets, tmp_path, *args, launcher=launcher))

    report = results(tmp_path)
    assert report["num_processes"] == 2
    losses = train_losses(report["log_history"])
    assert losses[-1] < losses[0]
    # Each rank trained on its own shard of every batch: equal weights mean the gradients were synced.
    digests = [(tmp_path / f"weights-rank{rank}.sha256").read_text().strip() for rank in (0, 1)]
    assert digests[0] == digests[1]
    assert weights_digest(assert_final_folder_loads(tmp_path)) == digests[0]


def test_trainer_recipe_lora_saves_a_reloadable_adapter_and_merges(assets, tmp_path):
    args = ["--model", str(assets / "glu"), "--lora", "--lr", "1e-2", "--max-steps", "30", "--save-steps", "30"]
    run(recipe_command("finetune_trainer.py", assets, tmp_path, *args, "--logging-steps", "5"))

    losses = train_losses(results(tmp_path)["log_history"])
    assert losses[-1] < losses[0]
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(hf_glu.LORA_TARGET_MODULES)  # the registered defaults

    base = AutoModelForCausalLM.from_pretrained(assets / "glu")
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    final = assert_final_folder_loads(tmp_path).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        untrained = AutoModelForCausalLM.from_pretrained(assets / "glu")(input_ids=ids).logits
        torch.testing.assert_close(final(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(final(input_ids=ids).logits, untrained, atol=1e-4)


def test_trainer_recipe_distillation_changes_the_loss_and_converges(assets, tmp_path):
    # SwiGLU from a GELU GPT-2 is an approximate conversion: the case distillation is for.
    base = ["--convert-from", str(assets / "gpt2"), "--variant", "swiglu", "--max-steps", "20", "--save-steps", "20"]
    base += ["--logging-steps", "1", "--grad-accum", "2"]
    run(recipe_command("finetune_trainer.py", assets, tmp_path / "plain", *base))
    kd = ["--distill-from", str(assets / "gpt2"), "--kd-alpha", "0.5", "--kd-temperature", "2.0"]
    run(recipe_command("finetune_trainer.py", assets, tmp_path / "kd", *base, *kd))

    plain, distilled = (train_losses(results(tmp_path / name)["log_history"]) for name in ("plain", "kd"))
    assert distilled[0] != pytest.approx(plain[0], rel=1e-3)  # same model, data and seed: only the KL term differs
    assert sum(distilled[-3:]) / 3 < sum(distilled[:3]) / 3 - 0.2
    assert math.isfinite(results(tmp_path / "kd")["perplexity"])
    assert_final_folder_loads(tmp_path / "kd")


def test_accelerate_recipe_converts_another_family_and_trains_lora_with_distillation(assets, tmp_path):
    source = str(assets / "pythia")
    args = ["--convert-from", source, "--variant", "swiglu", "--lora", "--distill-from", source, "--max-steps", "6"]
    run(recipe_command("finetune_accelerate.py", assets, tmp_path / "out", *args, "--save-steps", "6"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert type(final).__name__ == "GluGPTNeoXForCausalLM"
    assert math.isfinite(results(tmp_path / "out")["perplexity"])


def _launch_option_names() -> set[str]:
    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_config_holds_only_keys_accelerate_accepts(name):
    path = CONFIGS / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    options = _launch_option_names()
    # `accelerate launch` turns each nested key into the launch option of that name (fsdp_config keys
    # gain an fsdp_ prefix) and would silently ignore one it does not know.
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            option = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert option in options, f"{path.name}: {section}.{key} is not an accelerate launch option"
    assert f"--config_file recipes/accelerate_configs/{name}.yaml" in (RECIPES / "README.md").read_text()


def test_fsdp2_config_wraps_the_glu_block():
    fsdp = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    model = hf_glu.GluForCausalLM(hf_glu.GluConfig(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    blocks = [m for m in model.modules() if type(m).__name__ == fsdp["fsdp_transformer_layer_cls_to_wrap"]]
    assert len(blocks) == model.config.n_layer


class _RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: no Hub is reachable offline, so record the calls instead."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


@pytest.mark.parametrize("script", ["finetune_trainer.py", "finetune_accelerate.py"])
def test_recipe_pushes_the_final_folder(assets, tmp_path, monkeypatch, script):
    import hf_glu.hub

    monkeypatch.setattr(hf_glu.hub, "HfApi", _RecordingHfApi)
    monkeypatch.setattr(_RecordingHfApi, "calls", [])
    args = ["--model", str(assets / "glu"), "--max-steps", "2", "--save-steps", "2", "--push-to-hub", "me/tiny-glu"]
    monkeypatch.setattr(sys, "argv", recipe_command(script, assets, tmp_path, *args, "--private", launcher=()))
    try:
        with pytest.raises(SystemExit) as exit_info:  # the recipe ends with its exit status, as from a shell
            runpy.run_path(str(RECIPES / script), run_name="__main__")
        assert exit_info.value.code == 0
    finally:  # the recipe ran in this process: leave no Accelerate singletons behind for later tests
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    (create, repo, options), (upload, upload_repo, upload_options) = _RecordingHfApi.calls
    assert (create, repo, options["private"]) == ("create_repo", "me/tiny-glu", True)
    assert (upload, upload_repo) == ("upload_folder", "me/tiny-glu")
    assert Path(upload_options["folder_path"]) == tmp_path / "final"


@pytest.mark.parametrize("script", ["finetune_trainer.py", "finetune_accelerate.py"])
def test_recipes_answer_bad_input_in_one_line(assets, tmp_path, script):
    command = recipe_command(script, assets, tmp_path / "out", "--model", str(tmp_path / "no-such-model"))
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")
