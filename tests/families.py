"""One tiny source model per GPT-2-style family, each with its unusual options switched on.

Shared by the family tests (tests/test_families.py) and the CLI test of a non-GPT-2 conversion.
"""

from __future__ import annotations

import torch
import transformers as tf

from hf_glu import FAMILIES
from hf_glu.convert.init_schemes import EXACT_SOURCES

_COMMON = dict(vocab_size=101, bos_token_id=0, eos_token_id=0, pad_token_id=0)

# model_type -> the config of a tiny source exercising what is unusual about the family
FAMILY_CONFIGS = {
    # local attention on every other layer, tied head
    "gpt_neo": lambda: tf.GPTNeoConfig(
        **_COMMON, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
        attention_types=[[["global", "local"], 1]], window_size=4, resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0,
    ),
    # partial rotary, parallel attention + MLP, untied head
    "gptj": lambda: tf.GPTJConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    "codegen": lambda: tf.CodeGenConfig(
        **_COMMON, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # partial rotary, sequential residual (parallel is the default), untied head
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False,
    ),
    # multi-query attention
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, multi_query=True, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # partial rotary, q/k layer norms, parallel block, biased untied head
    "phi": lambda: tf.PhiConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, partial_rotary_factor=0.5, qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0,
    ),
    # new decoder architecture (grouped KV, two norms), bias-free
    "falcon": lambda: tf.FalconConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, ffn_hidden_size=48, bias=False, max_position_embeddings=64,
    ),
    # post-LN, projected embeddings, inline MLP
    "opt": lambda: tf.OPTConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False, dropout=0.0,
    ),
    # ALiBi, residual added inside the MLP
    "bloom": lambda: tf.BloomConfig(**_COMMON, hidden_size=32, n_layer=2, n_head=4),
    # grouped KV, sliding window
    "starcoder2": lambda: tf.Starcoder2Config(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, use_bias=True, residual_dropout=0.0,
    ),
    # ALiBi, bias-free, residual inside the MLP
    "mpt": lambda: tf.MptConfig(**_COMMON, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, no_bias=True),
    # scaled embeddings, inline MLP
    "biogpt": lambda: tf.BioGptConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, scale_embedding=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),
    "xglm": lambda: tf.XGLMConfig(
        **_COMMON, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, max_position_embeddings=64, dropout=0.0,
    ),
    # Conv1D projections, post-LN
    "openai-gpt": lambda: tf.OpenAIGPTConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # the MLP as an nn.Sequential, embeddings scaled by sqrt(width)
    "ctrl": lambda: tf.CTRLConfig(
        **_COMMON, n_positions=64, n_embd=32, dff=48, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
    ),
    # bias-free MLP, width as a multiple of the hidden size
    "gpt_neox_japanese": lambda: tf.GPTNeoXJapaneseConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
        max_position_embeddings=64,
    ),
    # squared ReLU, q/k layer norms, partial rotary
    "persimmon": lambda: tf.PersimmonConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, qk_layernorm=True, partial_rotary_factor=0.5,
    ),
    # squared ReLU, grouped KV, bias-free MLP
    "nemotron": lambda: tf.NemotronConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, partial_rotary_factor=0.5,
    ),
}  # fmt: skip

# The eight families the issue names first; the rest are the stretch.
CORE_FAMILIES = ("gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "phi", "falcon", "opt", "bloom")


def exact_variant(model_type: str, config) -> str:
    """The GLU variant that reproduces the family's activation exactly."""
    activation = FAMILIES[model_type].activation(config)
    return next(variant for variant, sources in EXACT_SOURCES.items() if activation in sources)


def tiny_source(model_type: str, auto_class: str = "AutoModelForCausalLM", spread: float = 0.2, **overrides):
    """A tiny family model whose weights are spread wider than init, so the activation's curve matters."""
    config = FAMILY_CONFIGS[model_type]()
    # Question answering needs 2 labels (start, end): 5.17's GPT-J sizes its QA layer by num_labels.
    labels = 2 if auto_class == "AutoModelForQuestionAnswering" else 3
    for key, value in {"num_labels": labels, **overrides}.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    model = getattr(tf, FAMILIES[model_type].heads[auto_class])(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * spread)
    return model.eval()
