"""Build a CAST model for evaluation or inference from a checkpoint (path or any fsspec URL).

Accepted: a training checkpoint of ours (a ``checkpoint_*`` folder, or a run folder: its newest
complete checkpoint; a MoCo run contributes its base encoder, a dense fine-tuning run its encoder); a
state dict in our key names (bare, or under ``model``/``state_dict``, ``module.`` prefixes allowed); or a
released original checkpoint (MoCo ``.pth.tar``, DeiT ``.pth``, linear-probe, Segmenter, SPML) through
``cast.models.load_original_checkpoint``. The backbone must load completely; heads and projectors may
be absent (the encoder's embedding is what we evaluate).
"""

from __future__ import annotations

import logging
import re

import fsspec
import torch
from torch import nn

from cast.artifacts import latest_checkpoint, read_state
from cast.models import CAST, create_model, load_original_checkpoint
from cast.models.original_checkpoint import fit_position_table, read_checkpoint, split_layout

log = logging.getLogger(__name__)


def _is_head(key: str) -> bool:
    return key.startswith("head.")


def _read(location: str) -> dict:
    """The saved dict of a checkpoint: ``state.pt`` of our checkpoint or run folder, else the file."""
    fs, path = fsspec.core.url_to_fs(location)
    return read_state(latest_checkpoint(location)) if fs.isdir(path) else read_checkpoint(location)


def own_state_dict(checkpoint: dict, model: CAST) -> dict[str, torch.Tensor] | None:
    """The state dict inside ``checkpoint`` if it uses our key names (most of the model's keys appear
    verbatim after dropping ``module.``), else None (an original layout)."""
    for container in ("model", "state_dict"):
        if isinstance(checkpoint.get(container), dict):
            checkpoint = checkpoint[container]
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return None
    state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    # a MoCo run: the query encoder is the one evaluated (as the reference does); a dense fine-tuning
    # run (DenseSegmenter): its encoder, without the decoder
    for encoder in ("base_encoder.", "encoder."):
        if any(k.startswith(encoder) for k in state):
            state = {k.removeprefix(encoder): v for k, v in state.items() if k.startswith(encoder)}
            break
    ours = model.state_dict()
    return state if sum(k in state for k in ours) >= 0.9 * len(ours) else None


def _load(source: str | dict, model: CAST) -> tuple[list[str], list[str], str]:
    """Load weights; returns (missing backbone keys, mismatched keys, description). Position tables are
    resized to the model's grid in either layout."""
    checkpoint = source if isinstance(source, dict) else _read(source)
    state = own_state_dict(checkpoint, model)
    if state is None:
        report = load_original_checkpoint(checkpoint, model)
        return [k for k in report.missing if not _is_head(k)], report.mismatched, str(report)
    state = dict(state)
    resized = fit_position_table(state, model)
    ours = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                  for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    fitting = {k: v for k, v in state.items() if k in ours and v.shape == ours[k].shape}
    result = model.load_state_dict(fitting, strict=False)
    unexpected = sorted(set(state) - set(ours))
    description = (f"our layout: loaded {len(fitting)} tensors; missing {result.missing_keys[:8]}; "
                   f"unexpected {unexpected[:8]}; mismatched {mismatched[:8]}"
                   + (f"; resized {resized}" if resized else ""))
    return [k for k in result.missing_keys if not _is_head(k)], mismatched, description


def load_model(model_name: str, checkpoint: str | None, *, device: str | torch.device = "cpu",
               seed: int = 0, **model_options) -> CAST:
    """``model_name`` (a registered variant, with ``model_options`` such as ``img_size``) with the weights
    of ``checkpoint``, or randomly initialised from ``seed`` when it is None (a reproducible baseline:
    the same seed gives the same weights, whatever the caller's RNG state); in eval mode on ``device``.

    Raises ValueError naming the checkpoint when backbone weights are missing or do not fit.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(model_name, **{"num_classes": 0, **model_options})
    if checkpoint is not None:
        description = load_backbone(checkpoint, model)
        log.info("loaded %s into %s: %s", checkpoint, model_name, description)
    return model.eval().to(device)


def load_segmenter(model_name: str, checkpoint: str | None, *, decoder: str, num_classes: int,
                   decoder_options: dict | None = None, device: str | torch.device = "cpu", seed: int = 0,
                   **model_options):
    """A ``DenseSegmenter`` (dense ``model_name`` + ``decoder``) with the weights of a fine-tuning run of
    ours (``checkpoint``: run or checkpoint folder, every key must load), or randomly initialised from
    ``seed``; in eval mode on ``device``."""
    from cast.models.decoders import DenseSegmenter, build_decoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = create_model(model_name, **{"num_classes": 0, **model_options})
        model = DenseSegmenter(encoder, build_decoder(decoder, num_classes, encoder.embed_dim,
                                                      **(decoder_options or {})))
    if checkpoint is not None:
        state = _read(checkpoint)
        state = state.get("model", state)
        try:
            model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        except RuntimeError as error:
            raise ValueError(f"{checkpoint}: not a {model_name} + {decoder} ({num_classes} classes) "
                             f"segmentation checkpoint ({str(error).splitlines()[0]})") from error
    return model.eval().to(device)


def load_backbone(checkpoint: str | dict, model: CAST, new: tuple[str, ...] = ()) -> str:
    """Load every backbone weight of ``checkpoint`` (a location, or a checkpoint dict already read) into
    ``model``, any layout of the module doc; returns what was loaded. Heads may be absent, and so may keys
    under the ``new`` prefixes (e.g. ``fusion.``: a classification checkpoint into a dense model keeps its
    freshly initialised block fusion; the description names them). ValueError naming the checkpoint when
    another backbone weight is missing or does not fit."""
    missing, mismatched, description = _load(checkpoint, model)
    fresh = [k for k in missing if k.startswith(new)] if new else []
    missing = [k for k in missing if k not in fresh]
    if fresh:
        owners = sorted({k.split(".")[0] for k in fresh})
        description += f"\nnew (freshly initialised): {len(fresh)} tensors of {owners}"
    if missing or mismatched:
        name = checkpoint if isinstance(checkpoint, str) else "checkpoint"
        raise ValueError(f"{name}: does not fit {model.pretrained_cfg.get('architecture', 'the model')} "
                         f"(pass the model it was trained as)\n{description}")
    return description


def checkpoint_location(location: str) -> str:
    """The file or checkpoint folder ``location`` names (a run folder: its newest complete checkpoint);
    FileNotFoundError naming it when there is nothing to load there."""
    fs, path = fsspec.core.url_to_fs(location)
    if fs.isdir(path):
        return latest_checkpoint(location)
    if not fs.exists(path):
        raise FileNotFoundError(f"{location}: no such checkpoint file or folder")
    return location


def projector_state(checkpoint_url: str) -> dict[str, torch.Tensor]:
    """The MoCo projector MLP of a checkpoint, in ``nn.Sequential`` indices (``0.weight``, ``1.running_mean``,
    ...): ``base_encoder.head.*`` of our MoCo runs, ``module.base_encoder.head.*`` of a released one.
    ValueError naming the checkpoint when it holds none (not a MoCo checkpoint)."""
    checkpoint = _read(checkpoint_url)
    layout, _, extras = split_layout(checkpoint)
    state = extras.get("projector", {})
    if not state:
        for container in ("model", "state_dict"):
            nested = checkpoint.get(container)
            if isinstance(nested, dict):
                prefix = "base_encoder.head."
                state = {k.removeprefix("module.")[len(prefix):]: v for k, v in nested.items()
                         if k.removeprefix("module.").startswith(prefix)}
                if state:
                    break
    if not any(re.match(r"\d+\.weight$", key) for key in state):
        raise ValueError(f"{checkpoint_url}: holds no MoCo projector (base_encoder.head.N.*; layout "
                         f"{layout}); use the fused tokens instead (--embedding fused)")
    return state


def build_projector(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The MoCo-v3 projector a state dict describes, rebuilt from its shapes: a Linear for each 2-D
    ``N.weight``, a BatchNorm1d for each ``N.running_mean`` (affine when it has ``N.weight``), a ReLU in
    every gap of the numbering; loaded and in eval mode (running statistics, as the reference evaluates)."""
    indices = sorted({int(key.split(".", 1)[0]) for key in state})
    layers: list[nn.Module] = []
    for index in range(indices[-1] + 1):
        weight = state.get(f"{index}.weight")
        if f"{index}.running_mean" in state:
            width = state[f"{index}.running_mean"].numel()
            layers.append(nn.BatchNorm1d(width, affine=weight is not None))
        elif weight is not None and weight.dim() == 2:
            layers.append(nn.Linear(weight.shape[1], weight.shape[0], bias=f"{index}.bias" in state))
        else:
            layers.append(nn.ReLU())
    projector = nn.Sequential(*layers)
    projector.load_state_dict(state, strict=True)
    return projector.eval()
