"""GLU surgery for every GPT-2-style family: exact, generating, saving, loading anywhere, training, LoRA.

Each family's tiny source (tests/helpers.py) switches on what is unusual about it; the conversions use
the variant that reproduces its activation exactly, so the converted model must match the source.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer

import hf_glu
from hf_glu import FAMILIES, GLU_FAMILY_CONFIGS, GLU_FAMILY_MODELS, convert_checkpoint
from hf_glu.configuration_glu_families import mlp_attribute
from hf_glu.convert import ConversionError
from hf_glu.convert.surgery import FamilySurgery
from hf_glu.modeling_glu import GluMLP

from helpers import (
    CORE_FAMILIES,
    FAMILY_CONFIGS,
    assert_reloads_without_hf_glu,
    exact_variant,
    one_sgd_step_args,
    ragged_rows,
    tiny_source,
)

ALL_FAMILIES = list(FAMILY_CONFIGS)


def _output(out) -> torch.Tensor:
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits])
    return out.last_hidden_state


def _converted_lm(model_type: str):
    source = tiny_source(model_type)
    return source, convert_checkpoint(source, exact_variant(model_type, source.config), eval_tokens=32)


def test_the_table_covers_every_family_fixture_and_the_eight_core_families():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)
    assert set(CORE_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_exact_conversion_reproduces_every_head(model_type):
    ids = torch.randint(1, 101, (2, 12))
    for auto_class, source_class in FAMILIES[model_type].heads.items():
        source = tiny_source(model_type, auto_class)
        variant = exact_variant(model_type, source.config)
        converted = convert_checkpoint(source, variant, eval_tokens=32)
        assert type(converted) is GLU_FAMILY_MODELS[model_type][auto_class]
        assert type(converted).__name__ == f"Glu{source_class}"
        with torch.no_grad():
            expected, got = _output(source(ids)), _output(converted(ids))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{model_type} {auto_class}")
        assert converted.conversion_report["max_abs_output_diff"] < 1e-5


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_only_the_mlp_changes(model_type):
    source, converted = _converted_lm(model_type)
    mlps = [m for m in converted.modules() if isinstance(m, GluMLP)]
    assert len(mlps) == source.config.num_hidden_layers
    glu_names = {"gate_proj", "up_proj", "down_proj"}
    source_state, converted_state = source.state_dict(), converted.state_dict()
    kept = {k for k in converted_state if not glu_names & set(k.split("."))}
    surgery = FamilySurgery(FAMILIES[model_type])
    module_names = {id(m): name for name, m in source.named_modules()}
    projections = [module_names[id(p)] for layer in surgery.source_layers(source) for p in surgery.source_mlp(layer)]
    dropped = {k for k in source_state if k.rsplit(".", 1)[0] in projections}
    assert kept == set(source_state) - dropped, "tensors outside the MLP must keep their names"
    for key in kept:
        assert torch.equal(converted_state[key], source_state[key]), key


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_greedy_generate_with_cache_equals_without(model_type):
    _, converted = _converted_lm(model_type)
    prompt = torch.randint(1, 101, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = converted.generate(prompt, use_cache=True, **kwargs)
    without = converted.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (1, 11)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_save_and_reload_through_the_auto_classes(model_type, tmp_path):
    _, converted = _converted_lm(model_type)
    converted.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"glu_{model_type}"
    assert set(config["auto_map"]) == {"AutoConfig", *FAMILIES[model_type].heads}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(converted)
    ids = torch.randint(1, 101, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, converted(ids).logits)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_one_trainer_step_moves_the_up_weights(model_type, tmp_path):
    _, converted = _converted_lm(model_type)
    converted.train()
    up_before = [m.up_proj.weight.detach().clone() for m in converted.modules() if isinstance(m, GluMLP)]
    Trainer(model=converted, args=one_sgd_step_args(tmp_path, batch=4, accumulation=1),
            train_dataset=ragged_rows()).train()  # fmt: skip
    up_after = [m.up_proj.weight for m in converted.modules() if isinstance(m, GluMLP)]
    assert all(not torch.equal(a, b) for a, b in zip(up_before, up_after, strict=True))


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_lora_with_the_default_targets_runs_forward_and_backward(model_type):
    _, converted = _converted_lm(model_type)
    model = get_peft_model(converted, LoraConfig(r=4, lora_alpha=8))
    targeted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {"gate_proj", "up_proj", "down_proj"} <= targeted
    assert targeted & set(FAMILIES[model_type].attention), "the attention projections are targeted too"
    ids = torch.randint(1, 101, (2, 10))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.count_nonzero(g) for g in grads)


def test_process_without_hf_glu_loads_every_family_with_trust_remote_code(tmp_path):
    assert_reloads_without_hf_glu({t: _converted_lm(t)[1] for t in ALL_FAMILIES}, tmp_path)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_tensor_parallel_plans_name_the_glu_projections(model_type):
    plan = GLU_FAMILY_CONFIGS[model_type].base_model_tp_plan
    family = FAMILIES[model_type]
    if not plan:
        return  # the family ships no plan in this Transformers version
    mlp_entries = {k: v for k, v in plan.items() if ".mlp." in k or ".ffn." in k}
    assert {k.rsplit(".", 1)[-1]: v for k, v in mlp_entries.items()} == {
        "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"
    }  # fmt: skip
    replaced = {family.proj_in, family.proj_out} - {"gate_proj", "up_proj", "down_proj"}  # Nemotron's up_proj stays
    assert not any(k.rsplit(".", 1)[-1] in replaced for k in mlp_entries)


def test_bias_free_sources_get_an_up_bias_for_the_constant_path():
    source = tiny_source("falcon")
    converted = convert_checkpoint(source, "geglu", eval_tokens=16)
    mlp = converted.transformer.h[0].mlp
    assert mlp.gate_proj.bias is None and mlp.down_proj.bias is None
    assert torch.equal(mlp.up_proj.bias, torch.ones_like(mlp.up_proj.bias))
    assert converted.config.glu_up_bias is True and converted.config.glu_bias is False


@pytest.mark.parametrize("variant", ["swiglu", "glu"])
def test_approximate_variants_convert_other_families_within_their_bound(variant):
    source = tiny_source("gpt_neox", spread=0.3)
    report = convert_checkpoint(source, variant, eval_tokens=128).conversion_report
    for layer in report["layers"]:
        assert layer["max_unit_error"] <= layer["unit_map"]["bound"] + 1e-5, layer
    assert report["perplexity"]["ratio"] < 1.05


def test_random_init_keeps_the_rest_and_takes_any_width():
    source = tiny_source("opt")
    converted = convert_checkpoint(source, "swiglu", init="random", intermediate_size=40, eval_tokens=16)
    assert converted.config.glu_width == 40
    assert converted.model.decoder.layers[0].mlp.gate_proj.weight.shape == (40, 32)
    q = source.model.decoder.layers[1].self_attn.q_proj.weight
    assert torch.equal(converted.model.decoder.layers[1].self_attn.q_proj.weight, q)


def test_relu2_sources_refuse_variants_that_cannot_preserve_them():
    with pytest.raises(ConversionError, match="relu2"):
        convert_checkpoint(tiny_source("persimmon"), "swiglu", eval_tokens=16)


def test_unsupported_model_types_get_one_line_listing_the_supported_ones(tmp_path):
    AutoConfig.for_model("llama", vocab_size=11, hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path)
    expected = "model_type='llama' in .* is not supported; supported: gpt2, gpt_neo"
    with pytest.raises(ConversionError, match=expected) as e:
        convert_checkpoint(tmp_path, "swiglu")
    assert "\n" not in str(e.value) and "nemotron" in str(e.value)


def test_a_family_checkpoint_folder_converts_with_its_legacy_names(tmp_path):
    source = tiny_source("gpt_neox")
    source.save_pretrained(tmp_path / "src")
    converted = convert_checkpoint(tmp_path / "src", "geglu", eval_tokens=16)
    ids = torch.randint(1, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, atol=1e-5, rtol=0)


def test_each_family_exports_its_glu_config_and_a_glu_subclass_of_every_stock_head():
    for model_type, family in FAMILIES.items():
        config_class = hf_glu.GLU_FAMILY_CONFIGS[model_type]
        assert config_class.model_type == f"glu_{model_type}"
        models = hf_glu.GLU_FAMILY_MODELS[model_type]
        assert set(models) == set(family.heads), model_type
        for auto, stock_name in family.heads.items():
            glu_class = models[auto]
            assert glu_class.__name__ == f"Glu{stock_name}" and glu_class.config_class is config_class
            assert issubclass(glu_class, getattr(transformers, stock_name)), (model_type, auto)


def test_cli_converts_a_non_gpt2_family_folder(tmp_path, capsys):
    from hf_glu.cli import main

    source = tiny_source("falcon")
    source.save_pretrained(tmp_path / "falcon")
    assert main(["convert", str(tmp_path / "falcon"), str(tmp_path / "out"), "--variant", "geglu",
                 "--eval-tokens", "32"]) == 0  # fmt: skip
    assert "GluFalconForCausalLM" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["source_model_type"] == "falcon" and report["max_abs_logit_diff"] < 1e-5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`dense_4h_to_h(act(dense_h_to_4h(x)))`" in card and "`up_proj` was given one" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(1, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, source(ids).logits, atol=1e-5, rtol=0)


def _shard(model, folder, max_shard_size="40KB"):
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    assert (folder / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("model_type", ["gpt_neox", "falcon", "openai-gpt", "opt"])
def test_no_eval_streams_a_sharded_checkpoint_to_the_same_model(model_type, tmp_path):
    from hf_glu.cli import main

    source = tiny_source(model_type)
    _shard(source, tmp_path / "src")
    variant = exact_variant(model_type, source.config)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", variant, "--no-eval"]) == 0
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    in_memory = convert_checkpoint(source, variant, eval_tokens=16)
    assert type(streamed) is type(in_memory)
    streamed_state, memory_state = streamed.state_dict(), in_memory.state_dict()
    assert set(streamed_state) == set(memory_state)
    for key, value in memory_state.items():
        assert torch.equal(streamed_state[key], value), key
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["evaluation"].startswith("skipped (--no-eval)") and "max_abs_logit_diff" not in report
    assert "**Not measured.**" in (tmp_path / "out" / "README.md").read_text()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == len(list((tmp_path / "src").glob("model-*")))


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: _shard(tiny_source("gpt_neox"), d), ["--variant", "bilinear"], "fitted on pre-activations"),
        (lambda d: _shard(tiny_source("gpt_neox"), d), ["--variant", "geglu", "--init", "random"], "--init"),
        (lambda d: tiny_source("phi").save_pretrained(d, safe_serialization=True), ["--variant", "geglu_tanh",
         "--eval-tokens", "8"], "--eval-tokens"),
    ],
)
def test_no_eval_refuses_what_it_cannot_do_in_one_line(make, args, message, tmp_path, capsys):
    from hf_glu.cli import main

    make(tmp_path / "src")
    capsys.readouterr()  # the source's own save output
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), *args, "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_no_eval_refuses_an_index_pointing_outside_the_folder(tmp_path, capsys):
    from hf_glu.cli import main

    _shard(tiny_source("gpt_neox"), tmp_path / "src")
    index = tmp_path / "src" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", "geglu", "--no-eval"]) == 2
    assert "outside the checkpoint folder" in capsys.readouterr().err


_EAGER = {"attn_implementation": "eager"}


def _eval_ids(vocab_size: int, n: int) -> torch.Tensor:
    """The token ids a conversion evaluates on when the source has no tokenizer (seeded random ids)."""
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits.float()


# Rotary families saved in half precision: their fp32 `inv_freq`-style buffers must stay fp32 in the converted
# model (a whole-model `.to(dtype)` rounded them), and every figure must be the one users will see.
@pytest.mark.parametrize(
    "model_type, dtype",
    [("gpt_neox", torch.bfloat16), ("gpt_neox", torch.float16), ("gptj", torch.bfloat16), ("phi", torch.float16),
     ("falcon", torch.bfloat16), ("codegen", torch.float16)],
)  # fmt: skip
def test_a_half_precision_source_converts_to_what_users_load(model_type, dtype, tmp_path):
    from hf_glu.convert.pipeline import convert_to_folder

    tiny_source(model_type).to(dtype).save_pretrained(tmp_path / "src")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype="auto")
    variant = exact_variant(model_type, source.config)
    conversion = convert_to_folder(str(tmp_path / "src"), tmp_path / "dst", variant, eval_tokens=32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=True)
    returned = convert_checkpoint(str(tmp_path / "src"), variant, eval_tokens=32)
    assert returned.dtype == reloaded.dtype == dtype
    # Buffers keep the dtype the class gives them, as Transformers' loading leaves them.
    for name, buffer in reloaded.named_buffers():
        assert returned.get_buffer(name).dtype == buffer.dtype and torch.equal(returned.get_buffer(name), buffer), name
    ids = _eval_ids(source.config.vocab_size, 32)
    expected = _logits(reloaded, ids)
    assert torch.equal(_logits(returned, ids), expected) and torch.equal(_logits(conversion.model, ids), expected)
    # The report's figure is the one between the two models as users load them: SRC with dtype="auto", DST reloaded.
    report = conversion.report
    assert (expected - _logits(source, ids)).abs().max().item() == report["max_abs_logit_diff"]
    card = (tmp_path / "dst" / "README.md").read_text()
    assert ("exactly" in card) == (report["max_abs_logit_diff"] == 0.0), card
    if model_type in ("gpt_neox", "falcon"):  # erf GELU rounds once in any dtype: the converted model is exact
        assert report["max_abs_logit_diff"] == 0.0


def test_a_cast_instance_converts_to_what_reloading_its_checkpoint_gives(tmp_path):
    from hf_glu.convert.pipeline import convert_to_folder

    source = tiny_source("gpt_neox").to(torch.bfloat16)  # `.to` rounds the rotary frequencies too
    conversion = convert_to_folder(source, tmp_path / "dst", "geglu", eval_tokens=32)
    # Reloaded with the instance's attention implementation (tiny_source's eager), which the conversion keeps.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=True, **_EAGER)
    ids = _eval_ids(source.config.vocab_size, 32)
    assert torch.equal(_logits(conversion.model, ids), _logits(reloaded, ids))
    stated = conversion.report["max_abs_logit_diff"]
    assert (_logits(reloaded, ids) - _logits(source, ids)).abs().max().item() == stated


@pytest.mark.parametrize("model_type, init", [*((t, "preserve") for t in ALL_FAMILIES), ("gptj", "random")])
def test_the_converted_model_equals_its_reloaded_checkpoint(model_type, init, tmp_path):
    from hf_glu.convert.pipeline import convert_to_folder

    source = tiny_source(model_type).to(torch.bfloat16)  # a cast instance: its buffers are rounded, if it has any
    variant = exact_variant(model_type, source.config)
    conversion = convert_to_folder(source, tmp_path / "dst", variant, init, eval_tokens=16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=True, **_EAGER)
    ids = _eval_ids(source.config.vocab_size, 16)
    assert torch.equal(_logits(conversion.model, ids), _logits(reloaded, ids))
    assert (_logits(reloaded, ids) - _logits(source, ids)).abs().max().item() <= conversion.report["max_abs_logit_diff"]


# Every capability question Transformers (and vLLM's Transformers backend) asks of a model class. The first is
# answered by reading the source file of the class's module and cached on the class asked first: asked of the
# stock class first, a subclass inherits that answer; asked of the subclass first, it reads the subclass's file.
_CAPABILITY_SCRIPT = """
import json, sys
from hf_glu.modeling_glu_families import GLU_FAMILY_MODELS
FLAGS = ("_supports_attention_backend", "_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn")
answers = {}
for heads in GLU_FAMILY_MODELS.values():
    for glu_class in heads.values():
        stock = glu_class.family_class
        for cls in ((stock, glu_class) if sys.argv[1] == "stock-first" else (glu_class, stock)):
            can_set = cls._can_set_attn_implementation(), cls._can_set_experts_implementation()
            answers[cls.__name__] = [*can_set, *(getattr(cls, flag) for flag in FLAGS)]
print(json.dumps(answers))
"""


@pytest.mark.parametrize("order", ["stock-first", "glu-first"])
def test_every_glu_class_answers_capability_questions_as_its_stock_class(order):
    run = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, order], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads(run.stdout)
    for heads in GLU_FAMILY_MODELS.values():
        for glu_class in heads.values():
            assert answers[glu_class.__name__] == answers[glu_class.family_class.__name__], glu_class.__name__
    # The families whose attention does not use Transformers' interface (vLLM refuses them by this answer).
    for stock in ("GPTNeoModel", "BloomModel", "MptModel", "XGLMModel", "OpenAIGPTModel", "GPTNeoXJapaneseModel"):
        assert answers[f"Glu{stock}"][0] is False, stock


def _safetensors_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("route", ["in-memory", "streamed"])
@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_every_tensor_outside_the_mlp_keeps_the_name_its_source_file_used(model_type, route, tmp_path):
    """Compared in the files, not in the models' state dicts: a family whose load renames a key (GPT-NeoX's head is
    `embed_out` in its files, `lm_head` in the model) is written back under the file's name, as its own save does."""
    from hf_glu.cli import main

    source = tiny_source(model_type)
    source.save_pretrained(tmp_path / "src")
    options = ["--no-eval"] if route == "streamed" else ["--eval-tokens", "8"]
    variant = exact_variant(model_type, source.config)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--variant", variant, *options]) == 0
    family = FAMILIES[model_type]
    # A projection of the MLP module, or of the layer itself where the family writes its MLP inline (OPT's fc1).
    owner = rf"(\.{mlp_attribute(family)}|\.\d+)"
    source_mlp = re.compile(rf"{owner}\.({family.proj_in}|{family.proj_out})\.(weight|bias)$")
    glu = re.compile(rf"\.{mlp_attribute(family)}\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
    kept = {k for k in _safetensors_keys(tmp_path / "src") if not source_mlp.search(k)}
    written = {k for k in _safetensors_keys(tmp_path / "out") if not glu.search(k)}
    assert written == kept
