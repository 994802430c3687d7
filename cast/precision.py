"""Numeric precision of forward passes: bf16 autocast on CUDA, float32 everywhere else.

Training and evaluation run their forwards under the same rule, so a model is evaluated in the
precision it was trained in.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device (when ``enabled``), else no change."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
