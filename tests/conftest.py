"""Shared test setup: offline Hub, deterministic seeds, tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_glu  # noqa: E402


def tiny_config(**overrides) -> hf_glu.GluConfig:
    """A GLU decoder small enough for many CPU tests per second; dropout off so outputs are deterministic."""
    fields = dict(
        vocab_size=101,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return hf_glu.GluConfig(**fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
