"""`hf-glu convert` as a user runs it: the round trip in fresh processes with the card, the evaluation-text and
sharding options, and `--no-eval` writing a loadable sharded checkpoint."""

import json
import textwrap

import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_glu import convert_checkpoint
from hf_glu.cli import main
from hf_glu.data import builtin_corpus

from helpers import BLOCK_HF_GLU, run_cli, saved_family

IDS = [[5, 17, 99, 3, 42, 8, 250, 11, 64, 7]]


def test_round_trip_in_fresh_processes(saved_gpt2, tmp_path):
    dst = tmp_path / "glu-model"
    result = run_cli(["convert", str(saved_gpt2), str(dst), "--variant", "geglu_tanh"], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = convert_checkpoint(str(saved_gpt2), "geglu_tanh")(torch.tensor(IDS)).logits

    # Installed: the Auto classes know the GLU model because hf_glu is imported.
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    torch.testing.assert_close(loaded(torch.tensor(IDS)).logits, expected, atol=1e-6, rtol=0)
    assert loaded.generation_config.max_new_tokens == 7

    # Without hf_glu: the checkpoint's own code, through trust_remote_code.
    script = BLOCK_HF_GLU + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(dst)!r})
        torch.save(model(torch.tensor({IDS})).logits, "logits.pt")
        """
    )
    result = run_cli([], tmp_path, prelude=script)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=0)

    # The card's YAML parses and carries the report's numbers.
    report = json.loads((dst / "conversion_report.json").read_text())
    header = (dst / "README.md").read_text().split("---")[1]
    metadata = yaml.safe_load(header)
    assert metadata["library_name"] == "transformers" and "geglu_tanh" in metadata["tags"]
    assert metadata["pipeline_tag"] == "text-generation"
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == round(report["perplexity"]["converted"], 4)
    assert metrics[1]["value"] == round(report["perplexity"]["source"], 4)
    assert report["max_abs_logit_diff"] < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".glu-model")]  # no temp folder left


def test_eval_text_and_sharding_options(saved_gpt2, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(builtin_corpus(3_000))
    dst = tmp_path / "out"
    args = ["convert", str(saved_gpt2), str(dst), "--variant", "swiglu", "--eval-text", str(text)]
    assert main([*args, "--max-shard-size", "20KB", "--eval-tokens", "64"]) == 0
    assert (dst / "model.safetensors.index.json").is_file()
    assert json.loads((dst / "conversion_report.json").read_text())["eval_data"] == "user text"
    assert AutoModelForCausalLM.from_pretrained(dst).config.glu_variant == "swiglu"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_no_eval_honours_max_shard_size_with_a_loadable_index(tmp_path):
    from safetensors import safe_open

    src = saved_family(tmp_path / "src")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["convert", str(src), str(whole), "--variant", "geglu", "--no-eval"]) == 0
    args = ["convert", str(src), str(sharded), "--variant", "geglu", "--no-eval", "--max-shard-size", "20KB"]
    assert main(args) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    sizes = {}
    for name in files:
        with safe_open(sharded / name, "pt") as f:
            nbytes = [f.get_tensor(k).nbytes for k in f.keys()]
            assert sum(nbytes) <= 20_000 or len(nbytes) == 1, (name, nbytes)  # one tensor may exceed it alone
            sizes.update(zip(f.keys(), nbytes, strict=True))
            assert all(index["weight_map"][k] == name for k in f.keys())
    with safe_open(whole / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(sizes) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(sizes.values())
    ids = torch.randint(0, 101, (1, 12))
    from_shards = _logits(AutoModelForCausalLM.from_pretrained(sharded).eval(), ids)
    assert torch.equal(from_shards, _logits(AutoModelForCausalLM.from_pretrained(whole).eval(), ids))
    assert (from_shards - _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)).abs().max() < 1e-4
