"""`import hf_glu` is lazy: it registers the configs and model names, and builds nothing it does not need."""

import json
import subprocess
import sys
import textwrap


def _run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_neither_conversion_nor_family_modeling_code():
    loaded = _run(
        """
        import json, sys
        import hf_glu
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("hf_glu", "transformers.models.", "peft")))))
        """
    )
    assert "hf_glu" in loaded
    assert not [m for m in loaded if m.startswith(("hf_glu.convert", "hf_glu.modeling_glu", "peft"))]
    family_modeling = [m for m in loaded if m.startswith("transformers.models.") and ".modeling_" in m]
    assert family_modeling == ["transformers.models.auto.modeling_auto"]  # the Auto mappings themselves


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
