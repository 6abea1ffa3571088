"""The sliding-window perplexity against an independent computation: one forward pass per scored token."""

import math

import pytest
import torch

from hf_glu import GluForCausalLM
from hf_glu.convert.perplexity import perplexity, windows

from helpers import tiny_config


def _token_by_token(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Each token's log-probability from its own forward pass over exactly the context the guide gives it:
    the window that first contains it, from that window's start (the window's first token is never scored)."""
    total, count, previous_end = 0.0, 0, 0
    n = ids.shape[-1]
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        for t in range(max(previous_end, begin + 1), end):
            with torch.no_grad():
                logits = model(ids[:, begin:t], use_cache=False).logits[0, -1].double()
            total -= torch.log_softmax(logits, dim=-1)[ids[0, t]].item()
            count += 1
        previous_end = end
        if end == n:
            break
    return total, count


@pytest.mark.parametrize("length, max_length, stride", [(40, 16, 8), (40, 16, 16), (37, 10, 3), (9, 16, 8)])
def test_sliding_window_matches_token_by_token(length, max_length, stride):
    model = GluForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 101, (1, length))
    result = perplexity(model, ids, max_length=max_length, stride=stride)
    total, count = _token_by_token(model, ids, max_length, stride)
    assert result["tokens"] == count
    if stride < max_length:  # overlapping windows score every token but the first, once each
        assert count == length - 1
    else:  # as in the guide, a window's first token has no context in it and goes unscored
        assert count == length - math.ceil(length / stride)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_cover_every_token_once():
    scored = []
    previous_end = 0
    for begin, end, target_len in windows(100, 32, 12):
        assert end - target_len == previous_end and end - begin <= 32
        scored += range(end - target_len, end)
        previous_end = end
    assert scored == list(range(100))
