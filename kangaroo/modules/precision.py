"""Which tensors follow the compute dtype: the one rule training and loading share.

Training in bf16 (FSDP2's ``param_dtype``) casts the parameters and the float buffers inside the
sharded blocks (EVA's zero key bias is concatenated into a bf16 qkv bias), and leaves the
position tables outside the blocks in fp32: the language model's RoPE frequencies
(``rotary_emb.inv_freq``) and the vision tower's RoPE (``rope.*``). Rounding those to bf16 moves
the fastest RoPE phases by radians at 22K positions, so a model loaded in bf16 keeps them in
fp32 too (``cast_model``), and the served model computes what the trained one did.
"""

from __future__ import annotations

import torch
from torch import nn

FP32_BUFFER_NAMES = ("inv_freq", "original_inv_freq")
"""Buffer names (the last dotted part) that stay fp32 wherever they live."""
FP32_BUFFER_MODULES = ("rope", "rotary_emb")
"""Modules whose float buffers stay fp32."""


def keeps_fp32(name: str) -> bool:
    """Whether the buffer called ``name`` (a ``named_buffers`` name) stays fp32 in a bf16 model."""
    parts = name.split(".")
    return parts[-1] in FP32_BUFFER_NAMES or any(part in FP32_BUFFER_MODULES for part in parts[:-1])


def cast_buffers(module: nn.Module, dtype: torch.dtype, prefix: str = "") -> None:
    """Casts ``module``'s float buffers to ``dtype``, except those that ``keeps_fp32``."""
    for name, owner in module.named_modules(prefix=prefix.rstrip(".")):
        for key, buffer in owner._buffers.items():
            if buffer is None or not buffer.is_floating_point() or buffer.dtype == dtype:
                continue
            if not keeps_fp32(f"{name}.{key}" if name else key):
                owner._buffers[key] = buffer.to(dtype)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its float parameters in ``dtype`` and its buffers cast as ``cast_buffers``
    says (``model.to(dtype)`` would round the RoPE tables too)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    cast_buffers(model, dtype)
    return model
