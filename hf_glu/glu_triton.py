"""The fused GLU path and the one place that decides between it and the eager reference.

Copied into checkpoints for ``trust_remote_code`` users: imports only torch, transformers and ``.glu``;
triton is optional and imported inside ``try:``.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # CPU-only installs: the eager path serves
    TRITON_AVAILABLE = False


def fused_path_wanted(glu_kernel: str, x: torch.Tensor) -> bool:
    """Whether a GLU MLP given ``glu_kernel`` should run the fused path on input ``x``.

    ``"auto"`` fuses on CUDA when triton imports; ``"triton"`` always fuses (on CPU tensors this needs
    ``TRITON_INTERPRET=1``); ``"eager"`` never does.
    """
    if glu_kernel == "eager":
        return False
    if glu_kernel == "triton":
        if not TRITON_AVAILABLE:
            raise ImportError("glu_kernel='triton' needs triton; install it with `pip install 'hf-glu[gpu]'`")
        return True
    return TRITON_AVAILABLE and x.is_cuda


def fused_glu_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole GLU MLP through the fused kernels."""
    raise NotImplementedError("the fused Triton GLU path is not built yet; use glu_kernel='eager' or 'auto'")
