"""`import hf_glu` is lazy: it registers the configs and model names, and builds nothing it does not need."""

import json
import subprocess
import sys
import textwrap

import pytest


def _run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_neither_conversion_nor_family_modeling_code():
    loaded = _run(
        """
        import json, sys
        import hf_glu
        prefixes = ("hf_glu", "transformers.models.", "peft", "torch")
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(prefixes))))
        """
    )
    assert "hf_glu" in loaded
    assert not [m for m in loaded if m.startswith(("hf_glu.convert", "hf_glu.modeling_glu", "peft"))]
    # no more than `import transformers` loads: neither torch nor the Auto mappings (registered into when used)
    assert not [m for m in loaded if m.startswith(("transformers.models.", "torch"))]


# Every order in which a program may reach the Auto classes and hf_glu's own modules: each must find the
# GLU configs and models registered (a registration hook firing inside a half-built module would lose them).
_IMPORT_ORDERS = {
    "hf_glu, then AutoModelForCausalLM": "import hf_glu\nfrom transformers import AutoModelForCausalLM",
    "hf_glu, then AutoConfig": "import hf_glu\nfrom transformers import AutoConfig",
    "AutoConfig, then hf_glu": "from transformers import AutoConfig\nimport hf_glu",
    "AutoModel, then hf_glu": "from transformers import AutoModel\nimport hf_glu",
    "family configs first": "import hf_glu.configuration_glu_families\nfrom transformers import AutoConfig",
    "model class names first (hf_glu.serve)": "import hf_glu\nhf_glu.glu_model_classes()",
}


@pytest.mark.parametrize("order", _IMPORT_ORDERS)
def test_auto_classes_know_glu_models_whatever_the_import_order(order):
    found = _run(
        _IMPORT_ORDERS[order]
        + textwrap.dedent(
            """
            import inspect, json, transformers
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
            config = transformers.AutoConfig.for_model("glu_gpt_neox")
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            print(json.dumps([type(config).__name__, transformers.AutoConfig.for_model("glu_gpt2").model_type,
                              model_class.__name__, inspect.isclass(model_class)]))
            """
        )
    )
    assert found == ["GluGPTNeoXConfig", "glu_gpt2", "GluGPTNeoXForCausalLM", True]


def test_auto_mappings_hand_out_real_classes_built_only_when_read():
    found = _run(
        """
        import inspect, json, sys
        import hf_glu
        import transformers
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, PreTrainedModel

        before = "hf_glu.modeling_glu_families" in sys.modules  # registered, not built
        config = hf_glu.GLU_FAMILY_CONFIGS["gpt_neox"](
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        head, base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], MODEL_MAPPING[type(config)]
        subclass = type("MyModel", (base,), {})  # Transformers' own test_torch_save_load does this
        # (the mapping's values() fails in Transformers 5.25 on a stock entry: read each GLU entry instead)
        glu_values = [MODEL_MAPPING[c] for c in (hf_glu.GluConfig, *hf_glu.GLU_FAMILY_CONFIGS.values())]
        print(json.dumps({
            "built_at_import": before,
            "isinstance": isinstance(model, head),
            "classes": inspect.isclass(head) and inspect.isclass(base),
            "issubclass": issubclass(head, PreTrainedModel) and issubclass(subclass, base),
            "values_are_classes": bool(glu_values) and all(inspect.isclass(v) for v in glu_values),
            "get": MODEL_MAPPING.get(type(config), None) is base,
        }))
        """
    )
    assert found == {"built_at_import": False, "isinstance": True, "classes": True, "issubclass": True,
                     "values_are_classes": True, "get": True}  # fmt: skip


def test_auto_classes_and_lora_targets_work_right_after_import(tmp_path):
    loaded = _run(
        f"""
        import json, sys
        import hf_glu
        from transformers import AutoModelForCausalLM
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

        config = hf_glu.GluConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  bos_token_id=0, eos_token_id=0)
        AutoModelForCausalLM.from_config(config).save_pretrained({str(tmp_path)!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print(json.dumps({{"class": type(model).__name__, "targets": targets.get("glu_gpt2"),
                          "neox": targets.get("glu_gpt_neox"),
                          "families_built": "hf_glu.modeling_glu_families" in sys.modules}}))
        """
    )
    assert loaded["class"] == "GluForCausalLM"
    assert loaded["targets"] == hf_glu_lora_targets()
    assert loaded["neox"][-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert not loaded["families_built"]  # a GPT-2-style checkpoint builds no family class


def hf_glu_lora_targets() -> list[str]:
    import hf_glu

    return hf_glu.LORA_TARGET_MODULES
