"""Numeric precision of forward passes: bf16 autocast on CUDA GPUs that have it, fp16 autocast with a
gradient scaler on those that do not (V100, T4), float32 everywhere else.

Training and evaluation run their forwards under the same rule, so a model is evaluated in the
precision it was trained in. ``PRECISIONS`` names the choices a config can force (``auto`` picks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """One resolved choice: ``name`` is bf16 | fp16 | fp32 on ``device_type``."""

    name: str
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16 (its 5-bit exponent underflows small gradients); a pass-through
        scaler otherwise, so the training step is the same code in every precision."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def metrics(self) -> dict[str, int]:
        """Stated in every training report: which autocast the run's numbers come from."""
        return {"precision_bf16": int(self.name == "bf16"), "precision_fp16": int(self.name == "fp16")}


def resolve(device: torch.device | str, choice: str = "auto", enabled: bool = True) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, else fp16 on CUDA, else fp32. A forced ``bf16`` or
    ``fp16`` also runs on the CPU (autocast supports both there; the tests use it)."""
    device = torch.device(device)
    if choice not in PRECISIONS:
        raise ValueError(f"precision {choice!r} is not one of {PRECISIONS}")
    if not enabled:
        return Precision("fp32", device.type)
    if choice == "auto":
        if device.type != "cuda":
            choice = "fp32"
        else:
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return Precision(choice, device.type)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The automatic choice's autocast on ``device`` (when ``enabled``), for evaluation."""
    return resolve(device, "auto", enabled).autocast()
