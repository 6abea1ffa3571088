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


# The GLU heads of the GPT-2-style model family, as the README lists them.
_GPT2_HEADS = {"AutoModel": "GluModel", "AutoModelForCausalLM": "GluForCausalLM",
               "AutoModelForSequenceClassification": "GluForSequenceClassification",
               "AutoModelForTokenClassification": "GluForTokenClassification"}  # fmt: skip


@pytest.mark.parametrize("order", _IMPORT_ORDERS)
def test_auto_classes_know_every_glu_config_and_head_whatever_the_import_order(order):
    """Every GLU model type through AutoConfig, and every head of each through its Auto class's mapping, as a real
    class: asked after the imports of ``order``, in a fresh process."""
    found = _run(
        _IMPORT_ORDERS[order]
        + textwrap.dedent(
            """
            import inspect, json, transformers
            from hf_glu.configuration_glu_families import FAMILIES

            heads = {"glu_gpt2": GPT2_HEADS}
            heads.update({f"glu_{t}": {a: f"Glu{b}" for a, b in f.heads.items()} for t, f in FAMILIES.items()})
            found = {}
            for model_type, expected in heads.items():
                config_class = type(transformers.AutoConfig.for_model(model_type))
                for auto, name in expected.items():
                    model_class = getattr(transformers, auto)._model_mapping[config_class]
                    found[f"{model_type} {auto}"] = [model_class.__name__ == name, inspect.isclass(model_class)]
            print(json.dumps(found))
            """
        ).replace("GPT2_HEADS", json.dumps(_GPT2_HEADS))
    )
    assert len({key.split()[0] for key in found}) == 19 and len(found) >= 2 * 19  # GPT-2 and 18 families
    assert {key: value for key, value in found.items() if value != [True, True]} == {}


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
