"""Optimizers and per-iteration schedules of the reference recipes.

lr = base_lr x global batch / base_batch; linear warmup from ``warmup_start_lr``, then a half-cosine
(MoCo-v3, DeiT) or a polynomial decay (mmseg / SPML segmentation) to ``min_lr``, evaluated every
optimizer step. Param groups may carry ``lr_scale`` (per-group multipliers, SPML's head x10).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cast.train.config import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule of the reference scripts."""
    return cfg.base_lr * global_batch / cfg.base_batch


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return sched.warmup_start_lr + (peak_lr - sched.warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if sched.kind == "poly":
        return sched.min_lr + (peak_lr - sched.min_lr) * (1.0 - progress) ** sched.poly_power
    return sched.min_lr + (peak_lr - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool) -> list[dict]:
    """Trainable params; with ``exclude_bias_norm``, 1-D tensors and ``no_weight_decay()`` names get wd 0."""
    skip = set()
    if exclude_bias_norm:
        inner = getattr(model, "module", model)
        for owner_prefix, owner in inner.named_modules():
            if hasattr(owner, "no_weight_decay"):
                prefix = f"{owner_prefix}." if owner_prefix else ""
                skip |= {prefix + name for name in owner.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in getattr(model, "module", model).named_parameters():
        if not param.requires_grad:
            continue
        if exclude_bias_norm and (param.ndim <= 1 or name in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW (MoCo: wd on all params; DeiT: exclusions) or SGD with momentum (linear probe, segmentation);
    ``groups`` (an objective's own param groups) replace the default ones."""
    if groups is None:
        groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm_from_wd)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
