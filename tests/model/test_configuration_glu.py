"""GluConfig: defaults, standard names, round trip, and clear errors for bad values."""

import pytest
from transformers import AutoConfig, GPT2Config

from hf_glu import GluConfig


def test_standard_names_map_to_gpt2_fields():
    c = GluConfig(n_embd=64, n_head=4, n_layer=3, n_positions=128, n_inner=100)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (64, 4, 3)
    assert (c.max_position_embeddings, c.intermediate_size) == (128, 100)


def test_n_inner_none_means_four_times_width_like_gpt2():
    assert GluConfig(n_embd=64, n_head=4).intermediate_size == 256


def test_gpt2_field_defaults_match_gpt2config():
    ours, theirs = GluConfig(), GPT2Config()
    for field in (
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "resid_pdrop", "embd_pdrop", "attn_pdrop",
        "layer_norm_epsilon", "initializer_range", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn", "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_cache",
    ):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field


def test_round_trip_through_autoconfig(tmp_path):
    c = GluConfig(glu_variant="swiglu_oai", glu_alpha=1.5, glu_limit=5.0, mlp_bias=False, glu_kernel="eager")
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GluConfig)
    for field in ("glu_variant", "glu_alpha", "glu_limit", "mlp_bias", "glu_kernel", "n_inner"):
        assert getattr(loaded, field) == getattr(c, field)


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("glu_variant", "swish", "expected one of"),
        ("glu_kernel", "cuda", "expected one of \\['auto', 'eager', 'triton'\\]"),
        ("glu_beta", 0.0, "finite number > 0"),
        ("glu_beta", float("nan"), "finite number > 0"),
        ("glu_alpha", -1.0, "finite number > 0"),
        ("glu_limit", float("inf"), "finite number > 0"),
        ("n_embd", 30, "multiple of n_head"),
        ("n_layer", 0, "integer > 0"),
        ("n_inner", -4, "integer > 0"),
        ("vocab_size", 10.5, "integer > 0"),
        ("resid_pdrop", 1.5, "in \\[0, 1\\]"),
        ("layer_norm_epsilon", 0, "finite number > 0"),
        ("mlp_bias", "yes", "True or False"),
        ("scale_attn_weights", 1, "True or False"),
    ],
)
def test_bad_values_raise_valueerror_naming_the_field(field, value, accepted):
    with pytest.raises(ValueError, match=f"{field}=.*{accepted}"):
        GluConfig(n_head=4, **{field: value})


def test_unknown_variant_lists_every_known_one():
    with pytest.raises(ValueError) as err:
        GluConfig(glu_variant="swish")
    for name in ("glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu", "swiglu_oai"):
        assert f"'{name}'" in str(err.value)
