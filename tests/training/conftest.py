"""The recipes' tiny models, built once per test module that runs the recipes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import hf_glu
from hf_glu.data import builtin_corpus, train_bpe_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny GPT-2, a tiny Pythia (GPT-NeoX) and a tiny GLU model, each saved with the same BPE tokenizer,
    and a text file."""
    root = tmp_path_factory.mktemp("recipe_assets")
    text = builtin_corpus(max_chars=20_000)
    (root / "train.txt").write_text(text, encoding="utf-8")
    tokenizer = train_bpe_tokenizer(text, vocab_size=300)
    shape = dict(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    ids = dict(bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**shape, **ids)).save_pretrained(root / "gpt2")
    hf_glu.GluForCausalLM(hf_glu.GluConfig(**shape, **ids, pad_token_id=0, n_inner=48)).save_pretrained(root / "glu")
    neox = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25, **ids)  # fmt: skip
    GPTNeoXForCausalLM(neox).save_pretrained(root / "pythia")
    for name in ("gpt2", "glu", "pythia"):
        tokenizer.save_pretrained(root / name)
    return root


