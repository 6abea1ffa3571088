"""Perplexity with a sliding window, as in Transformers' "Perplexity of fixed-length models" guide.

Each window holds up to ``max_length`` tokens and moves by ``stride``; only the tokens a window adds
(its last ``end - previous_end``) are scored, so every token is predicted once, with up to
``max_length - stride`` tokens of context carried over from the previous window.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def windows(seq_len: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, target_len)`` for each window over ``seq_len`` tokens."""
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(
            f"max_length={max_length}, stride={stride} are invalid; expected max_length >= 2, 1 <= stride <= max_length"
        )
    previous_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        yield begin, end, end - previous_end
        previous_end = end
        if end == seq_len:
            break


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_len: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the last ``target_len`` tokens of a window and their count.

    The first token of the window has no prediction, so a window scores at most ``len - 1`` tokens.
    """
    n = min(target_len, input_ids.shape[-1] - 1)
    if n <= 0:
        return 0.0, 0
    predictions = logits[0, -n - 1 : -1].float()
    targets = input_ids[0, -n:]
    nll = torch.nn.functional.cross_entropy(predictions, targets, reduction="sum")
    return nll.item(), n


@torch.inference_mode()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, max_length: int, stride: int) -> dict:
    """Sliding-window perplexity of a causal LM on ``input_ids`` (shape ``[1, seq_len]``)."""
    if input_ids.shape[-1] < 2:
        raise ValueError("the text is too short: perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for begin, end, target_len in windows(input_ids.shape[-1], max_length, stride):
        ids = input_ids[:, begin:end].to(device)
        nll, n = window_nll(model(ids, use_cache=False).logits, ids, target_len)
        total, count = total + nll, count + n
    model.train(was_training)
    return {
        "perplexity": math.exp(total / count),
        "nll": total / count,
        "tokens": count,
        "max_length": max_length,
        "stride": stride,
    }
