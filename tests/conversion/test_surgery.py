"""GPT-2 → GLU surgery in memory: config carried over, weights mapped, each init scheme within its bound."""

import math
import re

import pytest
import torch
from transformers import (
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.activations import ACT2FN

from hf_glu import (
    GluForCausalLM,
    GluForSequenceClassification,
    GluForTokenClassification,
    GluModel,
    convert_gpt2,
)
from hf_glu.convert import ConversionError
from hf_glu.convert.init_schemes import (
    CALIBRATED_VARIANTS,
    DOCUMENTED_BOUNDS_GELU_NEW,
    UnitMap,
    fit_unit_map,
    unit_output,
)
from hf_glu.convert.pipeline import convert_to_folder
from hf_glu.glu import GluParams

from helpers import tiny_gpt2, train_steps

HEADS = {
    GPT2LMHeadModel: GluForCausalLM,
    GPT2Model: GluModel,
    GPT2ForSequenceClassification: GluForSequenceClassification,
    GPT2ForTokenClassification: GluForTokenClassification,
}
EXACT = {"geglu_tanh": "gelu_new", "geglu": "gelu", "reglu": "relu", "swiglu": "silu"}
CONFIG_OPTIONS = [
    {},
    {"scale_attn_by_inverse_layer_idx": True, "layer_norm_epsilon": 1e-3},
    {"reorder_and_upcast_attn": True, "n_inner": 40, "tie_word_embeddings": False},
    {"scale_attn_weights": False, "layer_norm_epsilon": 1e-6, "n_layer": 3},
]




def _outputs(model, ids, token_type_ids=None):
    out = model(ids, token_type_ids=token_type_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("options", CONFIG_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("source_cls", list(HEADS), ids=lambda c: c.__name__)
def test_exact_schemes_reproduce_every_head(source_cls, options):
    ids = torch.randint(1, 101, (2, 24))
    token_types = torch.randint(0, 3, (2, 24))
    for variant, activation in EXACT.items():
        source = tiny_gpt2(source_cls, activation_function=activation, **options)
        converted = convert_gpt2(source, variant, eval_tokens=64)
        assert type(converted) is HEADS[source_cls]
        with torch.no_grad():
            expected, got = _outputs(source, ids, token_types), _outputs(converted, ids, token_types)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert converted.conversion_report["max_abs_output_diff"] < 1e-5


def test_every_gpt2_option_is_carried_over():
    options = dict(
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
        scale_attn_weights=False,
        n_inner=40,
        layer_norm_epsilon=1e-3,
        tie_word_embeddings=False,
        resid_pdrop=0.05,
        embd_pdrop=0.02,
        attn_pdrop=0.03,
        bos_token_id=5,
        eos_token_id=6,
        pad_token_id=7,
        initializer_range=0.03,
    )
    source = tiny_gpt2(GPT2ForSequenceClassification, **options)
    config = convert_gpt2(source, "geglu_tanh", eval_tokens=16).config
    for field, value in options.items():
        assert getattr(config, field) == value, field
    assert config.num_labels == 3 and config.glu_variant == "geglu_tanh" and config.mlp_bias


def test_conv1d_weights_are_transposed_and_c_attn_split():
    source = tiny_gpt2()
    converted = convert_gpt2(source, "swiglu", eval_tokens=16)
    src, dst = source.transformer.h[1], converted.transformer.h[1]
    q, k, v = src.attn.c_attn.weight.t().chunk(3, dim=0)
    torch.testing.assert_close(dst.attn.k_proj.weight, k, rtol=0, atol=0)
    torch.testing.assert_close(dst.attn.v_proj.bias, src.attn.c_attn.bias[64:], rtol=0, atol=0)
    torch.testing.assert_close(dst.attn.o_proj.weight, src.attn.c_proj.weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(dst.mlp.down_proj.weight, src.mlp.c_proj.weight.t(), rtol=0, atol=0)
    assert converted.lm_head.weight is converted.transformer.wte.weight


# |perplexity ratio - 1| each approximate scheme may cost before fine-tuning: the README's ≤ 1.01 for the
# GELU-like maps, bilinear's fitted quadratic a little more, ReLU's missing negative lobe up to its +51%.
PERPLEXITY_BOUNDS = {"geglu": 0.01, "swiglu": 0.01, "glu": 0.01, "swiglu_oai": 0.01, "bilinear": 0.05, "reglu": 0.6}


@pytest.mark.parametrize("variant", sorted(PERPLEXITY_BOUNDS))
def test_approximate_schemes_stay_inside_their_bound(variant):
    converted = convert_gpt2(tiny_gpt2(spread=0.3), variant, eval_tokens=128)
    report = converted.conversion_report
    for layer in report["layers"]:
        assert layer["max_unit_error"] <= layer["unit_map"]["bound"] + 1e-5, layer
        if variant in DOCUMENTED_BOUNDS_GELU_NEW:
            assert layer["unit_map"]["bound"] <= DOCUMENTED_BOUNDS_GELU_NEW[variant]
    ratio = report["perplexity"]["ratio"]
    assert math.isfinite(ratio) and abs(ratio - 1) <= PERPLEXITY_BOUNDS[variant], ratio


@pytest.mark.parametrize("variant", sorted(DOCUMENTED_BOUNDS_GELU_NEW))
def test_fixed_maps_hold_their_bound_for_all_z(variant):
    m = fit_unit_map(variant, "gelu_new", GluParams())
    z = torch.linspace(-60, 60, 200_001, dtype=torch.float64)
    error = (unit_output(variant, GluParams(), m, z) - ACT2FN["gelu_new"](z)).abs().max().item()
    assert error <= DOCUMENTED_BOUNDS_GELU_NEW[variant] + 1e-12


def test_swiglu_preserve_uses_the_minimax_scale_and_a_plain_swiglu():
    m = fit_unit_map("swiglu", "gelu_new", GluParams())
    assert m.gate_scale == pytest.approx(1.7745, abs=2e-3) and m.up_scale == 0.0
    assert m.bound == pytest.approx(1.42e-2, abs=5e-4)
    converted = convert_gpt2(tiny_gpt2(), "swiglu", eval_tokens=16)
    assert converted.config.glu_beta == 1.0  # the scale lives in the weights
    assert torch.count_nonzero(converted.transformer.h[0].mlp.up_proj.weight) == 0


def test_converted_model_trains_and_the_up_weights_move():
    converted = convert_gpt2(tiny_gpt2(), "swiglu", eval_tokens=16)
    converted.train()
    ids = torch.randint(1, 101, (4, 32))
    losses = train_steps(converted, torch.optim.AdamW(converted.parameters(), lr=1e-3), ids, 5)
    assert losses[-1] < losses[0]
    assert torch.count_nonzero(converted.transformer.h[0].mlp.up_proj.weight) > 0


def test_random_init_keeps_attention_and_takes_any_width():
    source = tiny_gpt2()
    converted = convert_gpt2(source, "swiglu", init="random", intermediate_size=85, eval_tokens=16)
    assert converted.config.intermediate_size == 85
    assert converted.transformer.h[0].mlp.gate_proj.weight.shape == (85, 32)
    torch.testing.assert_close(converted.transformer.wte.weight, source.transformer.wte.weight, rtol=0, atol=0)
    q = source.transformer.h[0].attn.c_attn.weight.t()[:32]
    torch.testing.assert_close(converted.transformer.h[0].attn.q_proj.weight, q, rtol=0, atol=0)
    again = convert_gpt2(source, "swiglu", init="random", intermediate_size=85, eval_tokens=16)
    torch.testing.assert_close(again.transformer.h[1].mlp.up_proj.weight, converted.transformer.h[1].mlp.up_proj.weight)


def test_torch_dtype_sets_the_result_dtype():
    converted = convert_gpt2(tiny_gpt2(), "geglu_tanh", torch_dtype="bfloat16", eval_tokens=16)
    assert converted.dtype == torch.bfloat16 and converted.conversion_report["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda: tiny_gpt2(add_cross_attention=True), {}, "add_cross_attention"),
        (lambda: tiny_gpt2(GPT2DoubleHeadsModel), {}, "GPT2LMHeadModel, GPT2Model"),
        (lambda: tiny_gpt2(activation_function="tanh"), {}, "activation_function='tanh'"),
        (lambda: tiny_gpt2(), {"variant": "nope"}, "expected one of"),
        (lambda: tiny_gpt2(), {"init": "zeros"}, "init='zeros'"),
        (lambda: tiny_gpt2(), {"intermediate_size": 129}, "larger than the source's MLP width 128"),
        (lambda: tiny_gpt2(), {"torch_dtype": "int8"}, "dtype='int8'"),
        (lambda: torch.nn.Linear(2, 2), {}, "supported classes"),
    ],
)
def test_bad_sources_and_options_are_refused_clearly(make, kwargs, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        convert_gpt2(make(), **{"variant": "swiglu", **kwargs})


def test_non_finite_weights_are_refused():
    source = tiny_gpt2()
    with torch.no_grad():
        source.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ConversionError, match="non-finite"):
        convert_gpt2(source, "swiglu")


# A stated error bound: "<bound> … (for|on) z in [<low>, <high>]" in the card.
_BOUND_CLAIM = re.compile(r"(\d[\d.e+-]*)(?: per intermediate unit)? (?:for|on) z in \[(-?[\d.e+-]+), (-?[\d.e+-]+)\]")


def _stated_bounds(card: str, num_layers: int) -> list[tuple[int, float, float, float]]:
    """Every (layer, bound, low, high) the card states: a table row's claim is its layer's; a sentence's is the
    layer it names, or every layer when it names none."""
    claims = []
    for line in card.splitlines():
        row = re.match(r"\| (\d+) \|", line)
        for sentence in [line] if row else re.split(r"(?<=[.;])\s", line):
            for bound, low, high in _BOUND_CLAIM.findall(sentence):
                named = [int(row[1])] if row else [int(i) for i in re.findall(r"layer (\d+)", sentence)]
                claims += [(i, float(bound), float(low), float(high)) for i in named or range(num_layers)]
    return claims


@pytest.mark.parametrize(
    "activation, variant", [("relu", "swiglu_oai"), ("gelu_new", "swiglu_oai"), ("gelu_new", "bilinear"),
                            ("gelu_new", "swiglu")],
)  # fmt: skip
def test_each_stated_bound_holds_on_its_layers_own_range(activation, variant, tmp_path):
    source = tiny_gpt2(spread=0.3, activation_function=activation)
    with torch.no_grad():  # layers of different reach: layer 1's pre-activations span a narrower range
        source.transformer.h[1].mlp.c_fc.weight.mul_(0.4)
    conversion = convert_to_folder(source, tmp_path / "dst", variant, eval_tokens=64)
    layers = conversion.report["layers"]
    if variant in CALIBRATED_VARIANTS:
        assert layers[0]["unit_map"]["fit_range"] != layers[1]["unit_map"]["fit_range"]
    card = (tmp_path / "dst" / "README.md").read_text()
    claims = _stated_bounds(card, len(layers))
    assert {layer for layer, *_ in claims} == {0, 1}, card
    for layer, bound, low, high in claims:
        m = layers[layer]["unit_map"]
        unit_map = UnitMap(**{**m, "fit_range": tuple(m["fit_range"])})
        z = torch.linspace(low, high, 200_001, dtype=torch.float64)
        error = (unit_output(variant, GluParams(), unit_map, z) - ACT2FN[activation](z)).abs().max().item()
        assert error <= bound, f"layer {layer}: {error} > {bound} on [{low}, {high}]"
        assert layers[layer]["max_unit_error"] <= bound + 1e-5
