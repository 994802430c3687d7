"""Load the released CAST checkpoints (twke18/CAST) into our models through an explicit key map.

Layouts handled (shared/reference/cast_reference.md section 6):
- ``moco``: MoCo-v3 ``.pth.tar`` with ``state_dict`` keys ``module.base_encoder.*`` (backbone + projector
  ``head.{0..7}``), ``module.momentum_encoder.*`` and ``module.predictor.*``;
- ``linear_probe``: ``state_dict`` with ``module.`` + backbone + ``head`` Linear;
- ``deit``: ``{'model': backbone + head}``; ``segmenter``: ``{'model': 'encoder.*' + 'decoder.*'}``;
- ``spml``: ``{'embedding_model': 'vit_backbone.*', 'prediction_model': ...}``;
- ``state_dict``: a bare backbone state dict.
Backbone names: ``patch_embed.proj.N`` -> ``stem.proj.N``; ``blocks.i`` and its aliases ``blocksS.i``
(sliced, global numbering) or ``blocksS.j`` (cast_seg, per-stage numbering) -> ``blocks.i``;
``poolL.pool_block.*`` -> ``pools.{L-1}.*``;
``block_fusion.proj_blocks.{0.norm,2}`` -> ``fusion.{norm,proj}`` (``KEY_TABLE``, read in both directions:
``to_original_checkpoint`` writes our weights back in the ``deit`` and ``moco`` layouts).
This is the only module of ``cast.models`` that does IO.
"""

from __future__ import annotations

import argparse
import bisect
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import nn

from cast.models.cast import CAST
from cast.models.positions import resize_table

Tensor = torch.Tensor


@dataclass
class LoadReport:
    """What happened to every key. ``extras`` holds the non-backbone weights of the checkpoint, keyed by
    role: ``projector``/``predictor`` (MoCo MLPs, original ``Sequential`` indices), ``momentum_encoder``
    (mapped to our keys), ``momentum_projector``, ``decoder`` (Segmenter), ``classifier`` (SPML)."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"layout={self.layout}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)}"]
        for name in ("missing", "unexpected", "mismatched", "resized"):
            keys = getattr(self, name)
            if keys:
                lines.append(
                    f"  {name} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                )
        if self.extras:
            lines.append("  extras: " + ", ".join(f"{k} ({len(v)} tensors)" for k, v in self.extras.items()))
        return "\n".join(lines)


def read_checkpoint(src: str) -> dict[str, Any]:
    """torch.load (weights_only, CPU) of a path or URL opened through fsspec."""
    # DeiT checkpoints store their argparse Namespace under 'args'; it is plain data, so allow it.
    with fsspec.open(src, "rb") as handle, torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{src}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_head(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate an MLP projector (``head.N.*``) from the backbone; a Linear head (``head.weight``) stays."""
    projector = {k[5:]: v for k, v in state.items() if re.match(r"head\.\d+\.", k)}
    backbone = {k: v for k, v in state.items() if not re.match(r"head\.\d+\.", k)}
    return backbone, projector


def split_layout(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(layout name, backbone state dict in original names, extras in original names)."""
    extras: dict[str, dict[str, Tensor]] = {}
    if "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
        if any(k.startswith("module.base_encoder.") for k in state):
            backbone, projector = _split_head(_strip(state, "module.base_encoder."))
            momentum, momentum_projector = _split_head(_strip(state, "module.momentum_encoder."))
            extras = {
                "projector": projector,
                "predictor": _strip(state, "module.predictor."),
                "momentum_encoder": momentum,
                "momentum_projector": momentum_projector,
            }
            return "moco", backbone, {k: v for k, v in extras.items() if v}
        if state and all(k.startswith("module.") for k in state):
            return "linear_probe", _strip(state, "module."), extras
        return "state_dict", state, extras
    if "model" in checkpoint:
        state = checkpoint["model"]
        if any(k.startswith("encoder.") for k in state):
            return "segmenter", _strip(state, "encoder."), {"decoder": _strip(state, "decoder.")}
        return "deit", state, extras
    if "embedding_model" in checkpoint:
        state = checkpoint["embedding_model"]
        extras = {"classifier": dict(checkpoint.get("prediction_model", {}))}
        return "spml", _strip(state, "vit_backbone."), extras
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        if all(k.startswith("module.") for k in checkpoint):
            checkpoint = _strip(checkpoint, "module.")
        backbone, projector = _split_head(checkpoint)
        return "state_dict", backbone, {"projector": projector} if projector else extras
    raise ValueError(
        f"unrecognised checkpoint layout; top-level keys: {sorted(checkpoint)[:10]} "
        "(expected 'state_dict', 'model', 'embedding_model' or a bare state dict)"
    )


def _stage_numbering(keys: list[str], model: CAST) -> dict[int, int]:
    """Offset to add to ``blocksS.j`` indices: 0 when they are global (sliced), the stage start when
    they restart at 0 per stage (cast_seg)."""
    starts = (0,) + model.stage_ends[:-1]
    lowest: dict[int, int] = {}
    for key in keys:
        match = re.match(r"blocks(\d+)\.(\d+)\.", key)
        if match:
            stage, index = int(match[1]), int(match[2])
            lowest[stage] = min(lowest.get(stage, index), index)
    offsets = {}
    for stage, low in lowest.items():
        start = starts[stage - 1] if stage - 1 < len(starts) else 0
        offsets[stage] = 0 if low == start else start
    return offsets


# One renaming table for both directions: (original prefix, our prefix). "{}" is a pooling level, 1-based in
# the original (pool1..pool4) and 0-based in ours (pools.0..3). Keys under _SAME_NAMES keep their names;
# transformer blocks (flat, sliced aliases or per-stage numbering) are handled apart.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("patch_embed.proj.", "stem.proj."),
    ("pool{}.pool_block.", "pools.{}."),
    ("block_fusion.proj_blocks.0.norm.", "fusion.norm."),
    ("block_fusion.proj_blocks.2.", "fusion.proj."),
)
_SAME_NAMES = ("cls_token", "pos_embed", "blocks.", "head.", "norm.")


def _same_name(key: str) -> bool:
    return key in _SAME_NAMES[:2] or key.startswith(_SAME_NAMES[2:])


def _rename(key: str, to_ours: bool) -> str | None:
    """``key`` renamed through ``KEY_TABLE`` (original -> ours, or ours -> original); None if no row fits."""
    for original, ours in KEY_TABLE:
        source, target, shift = (original, ours, -1) if to_ours else (ours, original, 1)
        match = re.match(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
        if match:
            return target.format(*(int(g) + shift for g in match.groups())) + key[match.end() :]
    return None


def map_backbone_keys(
    state: dict[str, Tensor], model: CAST
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Original backbone names -> ours. Returns (mapped, ignored source keys, unexpected source keys)."""
    has_flat_blocks = any(k.startswith("blocks.") for k in state)
    offsets = _stage_numbering(list(state), model)
    has_final_norm = isinstance(model.norm, nn.LayerNorm)
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in state.items():
        target = None
        if key == "pe_token" or (key.startswith("norm.") and not has_final_norm):
            ignored.append(key)  # zeros (MoCo cls position) / a final norm the dense models never use
            continue
        if _same_name(key):
            target = key
        elif match := re.match(r"blocks(\d+)\.(\d+)\.(.+)", key):
            if has_flat_blocks:
                ignored.append(key)  # alias of blocks.i (the sliced Sequentials share modules)
                continue
            target = f"blocks.{offsets[int(match[1])] + int(match[2])}.{match[3]}"
        else:
            target = _rename(key, to_ours=True)
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = value
    return mapped, ignored, unexpected


def backbone_to_original(state: dict[str, Tensor], model: CAST) -> dict[str, Tensor]:
    """Our names -> the original's (the inverse of ``map_backbone_keys``), the key set the original model's
    ``state_dict()`` has: ``blocks.i`` plus its sliced alias ``blocksS.i`` for ``cast.py``/``cast_deit.py``,
    only ``blocksS.j`` (per-stage numbering) for the fused ``cast_seg`` models, ``pe_token`` (zeros) beside
    sin-cos positions. ``model`` gives the structure only (stages, fusion, position kind)."""
    starts = (0,) + model.stage_ends[:-1]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if match := re.match(r"blocks\.(\d+)\.(.+)", key):
            index = int(match[1])
            stage = bisect.bisect_right(model.stage_ends, index)
            if model.uses_fusion:
                out[f"blocks{stage + 1}.{index - starts[stage]}.{match[2]}"] = value
            else:
                out[key] = out[f"blocks{stage + 1}.{index}.{match[2]}"] = value
        elif _same_name(key):
            out[key] = value
        elif (renamed := _rename(key, to_ours=False)) is not None:
            out[renamed] = value
        else:
            raise ValueError(f"backbone_to_original: {key!r} is not a CAST backbone key (no original name)")
    if model.config.pos_embed == "sincos":
        out["pe_token"] = torch.zeros(1, 1, model.embed_dim, dtype=model.cls_token.dtype, device="cpu")
    return out


EXPORT_LAYOUTS = ("deit", "moco")


def to_original_checkpoint(state: dict[str, Tensor], model: CAST, layout: str, **meta: Any) -> dict[str, Any]:
    """Our weights as the original code saves them, for its loaders. ``deit``: ``state`` is a CAST state
    dict, written as ``{'model': ...}`` (``best_checkpoint.pth``); ``moco``: ``state`` is our MoCo module's
    (``base_encoder.*`` with the projector as ``head.N``, ``momentum_encoder.*``, ``predictor.*``), written
    as ``{'state_dict': 'module.'-prefixed}`` (``checkpoint_XXXX.pth.tar``) with ``model`` the encoder.
    ``meta`` (epoch, arch, ...) goes beside at the top level."""
    if layout == "deit":
        if any(k.startswith(("base_encoder.", "momentum_encoder.")) for k in state):
            raise ValueError(
                "to_original_checkpoint: a MoCo state (base_encoder.*) in layout 'deit'; use layout 'moco'"
            )
        return {"model": backbone_to_original(state, model), **meta}
    if layout == "moco":
        out: dict[str, Tensor] = {}
        for part in ("base_encoder", "momentum_encoder"):
            encoder = _strip(state, f"{part}.")
            if not encoder:
                raise ValueError(f"to_original_checkpoint: layout 'moco' needs {part}.* keys (a MoCo run)")
            out.update({f"module.{part}.{k}": v for k, v in backbone_to_original(encoder, model).items()})
        out.update({f"module.{k}": v for k, v in state.items() if k.startswith("predictor.")})
        left = [k for k in state if not k.startswith(("base_encoder.", "momentum_encoder.", "predictor."))]
        if left:
            raise ValueError(f"to_original_checkpoint: keys outside the MoCo modules: {left[:8]}")
        return {"state_dict": out, **meta}
    raise ValueError(f"to_original_checkpoint: layout {layout!r} is not one of {EXPORT_LAYOUTS}")


def _fit_positions(value: Tensor, ours: Tensor, has_cls_row: bool) -> Tensor | None:
    """Bicubically resize a square position grid to our grid size (as SPML did for 512 px)."""
    cls_rows = 1 if has_cls_row else 0
    src_cells, dst_cells = value.shape[1] - cls_rows, ours.shape[1] - cls_rows
    src_side, dst_side = round(src_cells**0.5), round(dst_cells**0.5)
    if src_side**2 != src_cells or dst_side**2 != dst_cells or value.shape[2] != ours.shape[2]:
        return None
    grid = resize_table(value[0, cls_rows:], (src_side, src_side), (dst_side, dst_side)).reshape(
        1, -1, value.shape[2]
    )
    return torch.cat([value[:, :cls_rows], grid], dim=1)


def fit_position_table(state: dict[str, Tensor], model: CAST) -> str | None:
    """Resize ``state['pos_embed']`` in place to ``model``'s grid when only its size differs (a 224-px
    checkpoint into a 512-px model); returns a note of what was resized, None when nothing was."""
    value, own = state.get("pos_embed"), model.state_dict().get("pos_embed")
    if value is None or own is None or value.shape == own.shape:
        return None
    resized = _fit_positions(value, own, has_cls_row=model.config.pos_embed == "learned")
    if resized is None:
        return None
    state["pos_embed"] = resized
    return f"pos_embed {tuple(value.shape)} -> {tuple(resized.shape)}"


def load_original_checkpoint(src: str | dict[str, Any], model: CAST, *, strict: bool = False) -> LoadReport:
    """Load an original CAST checkpoint (path/URL via fsspec, or an already loaded dict) into ``model``.

    Returns a ``LoadReport``; with ``strict=True`` it raises ValueError unless every model key was filled
    and every checkpoint key was placed. A Linear head loads when its shape fits; MLP heads go to extras.
    """
    checkpoint = read_checkpoint(src) if isinstance(src, str) else src
    layout, backbone, extras = split_layout(checkpoint)
    mapped, ignored, unexpected = map_backbone_keys(backbone, model)
    report = LoadReport(layout=layout, ignored=ignored, unexpected=unexpected)
    if "momentum_encoder" in extras:
        extras["momentum_encoder"] = map_backbone_keys(extras["momentum_encoder"], model)[0]
    report.extras = extras
    own = model.state_dict()
    accepted: dict[str, Tensor] = {}
    resized = fit_position_table(mapped, model)
    if resized:
        report.resized.append(resized)
    for key, value in mapped.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            report.mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
            continue
        accepted[key] = value
    result = model.load_state_dict(accepted, strict=False)
    report.loaded = sorted(accepted)
    report.missing = sorted(result.missing_keys)
    if strict and not report.complete:
        raise ValueError(f"load_original_checkpoint: incomplete load\n{report}")
    return report
