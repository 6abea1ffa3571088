"""A from-scratch ``Glu<Family>`` model starts as its family's own model starts.

Every parameter outside the MLP keeps the family's name, so its mean and spread at init are compared with
the stock class's; the GLU projections are compared with the family's MLP projections they replace:
``gate_proj``/``up_proj`` with the input projection, ``down_proj`` with the output projection (which some
families scale, as GPT-2 does, by 1/sqrt(2 * layers)).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hf_glu import FAMILIES, GLU_FAMILY_CONFIGS, GLU_FAMILY_MODELS

from helpers import FAMILY_CONFIGS

# Wide enough that a weight's sample std is within ~3% of its init std; deep enough that 1/sqrt(2 * layers)
# scaling (0.5 at 2 layers) is far outside that.
_WIDTHS = dict(hidden_size=64, intermediate_size=256)
_TOLERANCE = 0.15


def _widen(config: tf.PretrainedConfig) -> tf.PretrainedConfig:
    # attribute_map points the family's own names (n_embd, d_model, ffn_dim...) at these
    for name, value in _WIDTHS.items():
        if hasattr(config, name) or name in config.attribute_map:
            setattr(config, name, value)
    family = FAMILIES[config.model_type]
    for name in ("n_inner", "ffn_dim", "ffn_hidden_size", "dff"):
        if hasattr(config, name) and getattr(config, name) is not None:
            setattr(config, name, _WIDTHS["intermediate_size"])
    assert family.width(config) >= 128, f"{config.model_type}: MLP too narrow for init statistics"
    return config


def _stats(tensor: torch.Tensor) -> tuple[float, float]:
    t = tensor.detach().double().flatten()
    return t.mean().item(), t.std().item() if t.numel() > 1 else 0.0


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _TOLERANCE * max(abs(a), abs(b)) + 2e-3


def _mlp_source_name(name: str, model_type: str) -> str | None:
    """The stock parameter a GLU MLP parameter stands in for (gate/up: the input projection)."""
    family = FAMILIES[model_type]
    for glu, source in (("gate_proj", family.proj_in), ("up_proj", family.proj_in), ("down_proj", family.proj_out)):
        marker = f".{glu}."
        if marker in name:
            prefix, _, leaf = name.partition(marker)
            if family.mlp is None:  # inline: the GLU MLP sits at layer.<mlp attribute>, the source on the layer
                prefix = prefix.rpartition(".")[0]
            return f"{prefix}.{source}.{leaf}"
    return None


# Families whose stock classes themselves leave tensors uninitialised when built on the meta device (Transformers
# 5.25: OpenAI GPT's Conv1D weights hold whatever the memory held): nothing to compare the GLU classes with.
_STOCK_META_INIT_BROKEN = {"openai-gpt"}


@pytest.mark.parametrize("route", ["in_memory", "meta_device"])
@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForCausalLM"])
@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_glu_family_initialises_as_its_family(model_type, auto_class, route):
    """Built in memory, or on the meta device and filled by ``from_pretrained`` with no weights (every tensor then
    comes from ``_init_weights`` alone), as Transformers does for a checkpoint missing some tensors."""
    if route == "meta_device" and model_type in _STOCK_META_INIT_BROKEN:
        pytest.skip(f"the stock {model_type} classes leave tensors uninitialised on the meta device")
    torch.manual_seed(0)
    stock_config = _widen(FAMILY_CONFIGS[model_type]())
    stock = getattr(tf, FAMILIES[model_type].heads[auto_class])(stock_config)
    stock_params = dict(stock.named_parameters())

    glu_config = GLU_FAMILY_CONFIGS[model_type](**stock_config.to_dict(), glu_variant="swiglu")
    torch.manual_seed(0)
    glu_class = GLU_FAMILY_MODELS[model_type][auto_class]
    if route == "in_memory":
        glu = glu_class(glu_config)
    else:
        glu = glu_class.from_pretrained(None, config=glu_config, state_dict={})

    wrong = []
    compared = 0
    for name, param in glu.named_parameters():
        source = _mlp_source_name(name, model_type) or name
        if source not in stock_params:
            if name.endswith("bias"):  # bias-free families gain an up bias for exactness; GLU init zeroes it
                assert torch.count_nonzero(param) == 0, f"{name}: biases start at zero"
                continue
            raise AssertionError(f"{model_type}: {name} has no stock counterpart {source}")
        compared += 1
        got, want = _stats(param), _stats(stock_params[source])
        if not (_close(got[0], want[0]) and _close(got[1], want[1])):
            wrong.append(f"{name}: mean/std {got[0]:.4f}/{got[1]:.4f}, family {want[0]:.4f}/{want[1]:.4f}")
    assert compared > 10
    assert not wrong, f"{model_type} initialises unlike its family:\n" + "\n".join(wrong)
